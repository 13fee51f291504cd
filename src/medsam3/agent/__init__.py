"""MedSAM-3 Agent: an MLLM plans concept prompts and refines MedSAM-3's result; offline concept normaliser.

Modules: ``normalizer`` (free text -> vocabulary concepts, offline sentence encoder), ``llm_client``
(OpenAI-compatible chat-completions through the ``openai`` package: bounded retries, one deadline,
no redirects, capped replies), ``actions`` (the JSON actions and their parsing), ``render``
(numbered overlays, zoomed crops), ``trace`` (what was sent and answered), ``loop`` (``run_agent``,
``run_offline``) and ``command`` (the library behind ``medsam3 agent``).
"""
