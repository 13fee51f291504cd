"""The agent behind the segmenter protocol, so ``medsam3 evaluate --agent`` scores it like any model.

Each evaluated sample becomes the instruction "segment the <concept>"; the agent (an MLLM loop, or
the offline normaliser with ``llm=None``) returns one final mask, split into connected components
as instances. Each case's run has its own deadline (``timeout_s``); a case where the LLM gave no
usable action, or an LLM error, raises (``evaluate --skip-bad`` skips and lists it). The paper's
comparison (MedSAM-3 T+I vs MedSAM-3 Agent on BUSI) is then one pair of ``evaluate`` runs and a
``compare``.
"""

from __future__ import annotations

import numpy as np

from medsam3.agent.loop import require_action, run_agent, run_offline
from medsam3.data.masks import components, masks_to_boxes
from medsam3.infer.types import Prompt, PromptResult, as_prompts
from medsam3.model.concepts import ConceptNormalizer


class AgentSegmenter:
    """``set_image`` / ``predict`` over the agent loop; boxes in prompts are ignored (the agent plans)."""

    def __init__(
        self, predictor, normalizer: ConceptNormalizer, llm=None, *, max_rounds: int = 3, timeout_s: float | None = None
    ):
        self.predictor = predictor
        self.normalizer = normalizer
        self.llm = llm
        self.max_rounds = max_rounds
        self.timeout_s = timeout_s
        self.loaded = getattr(predictor, "loaded", None)
        self._image: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self._image = image

    def predict(self, prompts, **kwargs) -> list[PromptResult]:
        if self._image is None:
            raise RuntimeError("call set_image() before predict()")
        results = []
        for prompt in as_prompts(prompts):
            instruction = f"segment the {prompt.text}"
            if self.llm is None:
                outcome = run_offline(self._image, instruction, self.predictor, self.normalizer)
            else:
                outcome = require_action(
                    run_agent(
                        self._image,
                        instruction,
                        self.predictor,
                        self.llm,
                        max_rounds=self.max_rounds,
                        normalizer=self.normalizer,
                        timeout_s=self.timeout_s,
                    )
                )
            results.append(_as_result(prompt, outcome.mask))
        return results


def _as_result(prompt: Prompt, mask: np.ndarray) -> PromptResult:
    masks = components(mask)  # 8-connected, as the datasets split their masks
    count = len(masks)
    return PromptResult(
        prompt=prompt,
        presence=1.0 if count else 0.0,
        scores=np.ones(count, dtype=np.float32),
        boxes=masks_to_boxes(masks),
        masks=masks,
    )
