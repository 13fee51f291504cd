"""The library behind ``medsam3 agent``: read the image, load MedSAM-3, run the agent or the offline path.

The LLM client is made before the model is loaded, so a missing API key or a bad URL fails in a
second instead of after a model load. ``timeout_s`` is one deadline for the agent loop (every LLM
call, retry and round; loading the model is not counted). A run in which the LLM never gave a usable
action raises :class:`~medsam3.agent.loop.AgentError` (exit code 2) after writing its outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

from medsam3.agent.llm_client import ChatClient
from medsam3.agent.loop import AgentResult, require_action, run_agent, run_offline
from medsam3.errors import PromptError
from medsam3.model.concepts import ConceptNormalizer, default_normalizer, normalizer_for
from medsam3.model.presets import DEFAULT_MODEL

DEFAULT_TIMEOUT_S = 300.0  # the whole agent run (--timeout)
REQUEST_TIMEOUT_S = 120.0  # one LLM request, at most (also cut to the time left)


def model_concepts(loaded) -> list[str]:
    """The concepts a loaded model (or its adapter) was tuned on; empty for an open-vocabulary SAM 3."""
    concepts = list(getattr(loaded, "concepts", None) or [])
    adapter = getattr(loaded, "adapter", None) or {}
    for concept in adapter.get("concepts", []) if isinstance(adapter, dict) else []:
        if concept not in concepts:
            concepts.append(concept)
    return concepts


def agent_command(
    image: str | os.PathLike,
    instruction: str,
    out: str | os.PathLike,
    *,
    llm_base_url: str | None = None,
    llm_model: str | None = None,
    llm: str = "openai",
    api_key_env: str = "OPENAI_API_KEY",
    max_rounds: int = 3,
    model: str = DEFAULT_MODEL,
    adapter: str | os.PathLike | None = None,
    device: str = "auto",
    threshold: float = 0.5,
    max_image_side: int = 1024,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    slice_index: int | None = None,
    axis: int = 0,
    window: str | None = None,
) -> AgentResult:
    """Run the MedSAM-3 agent on one image file; write ``out``: mask.png, overlay.png, result.json, trace/.

    ``llm="none"`` skips the LLM: the concept normaliser picks the phrase from the instruction and
    MedSAM-3 runs once. Otherwise ``llm_base_url`` and ``llm_model`` name any OpenAI-compatible
    chat-completions endpoint that takes images.
    """
    from medsam3.data.image_io import read_image

    if not instruction or not instruction.strip():
        raise PromptError("empty --instruction: say what to segment, e.g. 'segment the tumor in the breast'")
    if llm not in ("openai", "none"):
        raise PromptError(f"--llm {llm!r}: use 'openai' (any OpenAI-compatible endpoint) or 'none' (offline)")
    check_timeout(timeout_s)
    client = None
    if llm == "openai":
        if not llm_base_url or not llm_model:
            raise PromptError(
                "the agent needs --llm-base-url and --llm-model (any OpenAI-compatible endpoint), "
                "or --llm none to run offline"
            )
        client = ChatClient(
            llm_base_url,
            llm_model,
            api_key_env=api_key_env,
            max_image_side=max_image_side,
            timeout_s=min(request_timeout_s, timeout_s),
        )
    picture = read_image(image, slice_index=slice_index, axis=axis, window=window)
    predictor, concepts = load_predictor(model, device=device, adapter=adapter, threshold=threshold)
    if client is None:
        normalizer = normalizer_for(concepts) if concepts else default_normalizer()
        return run_offline(picture.rgb, instruction, predictor, normalizer, out_dir=Path(out))
    normalizer: ConceptNormalizer | None = normalizer_for(concepts) if concepts else None
    result = run_agent(
        picture.rgb,
        instruction,
        predictor,
        client,
        max_rounds=max_rounds,
        out_dir=Path(out),
        normalizer=normalizer,
        timeout_s=timeout_s,
    )
    return require_action(result, out)


def load_predictor(model: str, *, device: str, adapter, threshold: float):
    """MedSAM-3's predictor for ``model`` and the concepts it was tuned on."""
    from medsam3.infer.segment import build_predictor

    # The agent normalises its own concepts (its ConceptNormalizer), so none here.
    setup = build_predictor(model, adapter=adapter, device=device, normalize=False, score_threshold=threshold)
    return setup.predictor, model_concepts(setup.loaded)


def check_timeout(timeout_s: float) -> float:
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < float("inf")):
        raise PromptError(f"--timeout {timeout_s}: give the agent run a positive number of seconds (e.g. 300)")
    return float(timeout_s)


def agent_segmenter_factory(
    llm: str,
    llm_base_url: str | None,
    llm_model: str | None,
    api_key_env: str = "OPENAI_API_KEY",
    max_rounds: int = 3,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
):
    """For ``evaluate --agent``: a function wrapping the loaded predictor in the agent.

    ``timeout_s`` is the deadline of each case's agent run.
    """
    from medsam3.agent.segmenter import AgentSegmenter

    if llm not in ("openai", "none"):
        raise PromptError(f"--agent {llm!r}: use 'openai' (any OpenAI-compatible endpoint) or 'none' (offline)")
    check_timeout(timeout_s)
    client = None
    if llm == "openai":
        if not llm_base_url or not llm_model:
            raise PromptError("--agent openai needs --llm-base-url and --llm-model")
        client = ChatClient(
            llm_base_url, llm_model, api_key_env=api_key_env, timeout_s=min(request_timeout_s, timeout_s)
        )

    def wrap(predictor):
        concepts = model_concepts(getattr(predictor, "loaded", None))
        normalizer = normalizer_for(concepts) if concepts else default_normalizer()
        return AgentSegmenter(predictor, normalizer, client, max_rounds=max_rounds, timeout_s=timeout_s)

    return wrap
