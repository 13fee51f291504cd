"""Encode an image once, then answer any number of concept prompts.

SAM 3 spends almost all its compute in the vision encoder (51.7 s of 57 s per 1008 px image on
2 CPU cores). The predictor runs it once per image, keeps the features, caches text features per
phrase, and sends all prompts through the detector in batched passes: prompts without boxes in one
batch, prompts with boxes in another (padded with SAM 3's -10 label), because a geometry prompt
changes what the detector attends to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.errors import InputFileError, PromptError
from medsam3.infer.box_prompts import box_prompt_tensors
from medsam3.infer.postprocess import to_prompt_result
from medsam3.infer.types import Prompt, PromptResult
from medsam3.model.loading import LoadedModel, load_model


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Accept (H,W) or (H,W,3|4) arrays, uint8 or float in [0,1]; return (H,W,3) uint8."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputFileError(name, f"expected an (H, W) or (H, W, 3) image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[..., :3]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputFileError(name, "empty image (0 pixels)")
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if np.isnan(array).any():
            raise InputFileError(name, "image contains NaN values")
        if array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return np.array(array, order="C", copy=True) if not array.flags.writeable else np.ascontiguousarray(array)


def _expand(vision: Sam3VisionEncoderOutput, batch: int) -> Sam3VisionEncoderOutput:
    """View the one image's features as a batch of ``batch`` (no copy)."""

    def grow(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:])

    return Sam3VisionEncoderOutput(
        last_hidden_state=grow(vision.last_hidden_state),
        fpn_hidden_states=tuple(grow(t) for t in vision.fpn_hidden_states),
        fpn_position_encoding=tuple(grow(t) for t in vision.fpn_position_encoding),
    )


class Sam3Predictor:
    """SAM 3 concept segmentation with the vision encoder run once per image."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        nms_iou: float | None = None,
        max_batch: int = 16,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.nms_iou = nms_iou
        self.max_batch = max_batch
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._vision: Sam3VisionEncoderOutput | None = None
        self._original_size: tuple[int, int] | None = None
        self.encode_count = 0  # how many times the vision encoder ran (for tests and benchmarks)

    @classmethod
    def from_spec(cls, spec: str = "nano", *, device: str = "auto", adapter=None, **kwargs) -> Sam3Predictor:
        return cls(load_model(spec, device=device, adapter=adapter), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- image -------------------------------------------------------------------------------
    def pixel_values(self, rgb: np.ndarray) -> torch.Tensor:
        """SAM 3's preprocessing: stretch to the model's square input, scale, normalise."""
        batch = self.processor.image_processor(images=rgb, return_tensors="pt")
        return batch["pixel_values"].to(self.device, self.dtype)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Run the vision encoder on ``image`` and keep its features for the prompts to come."""
        rgb = as_rgb_uint8(image)
        self._vision = self.model.get_vision_features(pixel_values=self.pixel_values(rgb))
        self._original_size = (int(rgb.shape[0]), int(rgb.shape[1]))
        self.encode_count += 1

    def set_features(self, vision: Sam3VisionEncoderOutput, original_size: tuple[int, int]) -> None:
        """Use features computed elsewhere (a feature cache, a video propagator)."""
        self._vision = vision
        self._original_size = original_size

    @property
    def original_size(self) -> tuple[int, int]:
        if self._original_size is None:
            raise RuntimeError("call set_image() before predict()")
        return self._original_size

    # -- text --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _text_features(self, phrases: Iterable[str]) -> None:
        missing = sorted({p for p in phrases if p not in self._text_cache})
        if not missing:
            return
        tokens = self.processor.tokenizer(missing, padding="max_length", max_length=32, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        features = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        for i, phrase in enumerate(missing):
            self._text_cache[phrase] = (features[i : i + 1], mask[i : i + 1])

    # -- prompts -----------------------------------------------------------------------------
    def predict(
        self,
        prompts: Sequence[Prompt | str],
        *,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        nms_iou: float | None = None,
    ) -> list[PromptResult]:
        """Every instance of every prompt's concept in the current image, in prompt order."""
        if self._vision is None:
            raise RuntimeError("call set_image() before predict()")
        prompts = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in prompts]
        if not prompts:
            raise PromptError("no prompt given: name at least one concept")
        height, width = self.original_size
        for prompt in prompts:
            prompt.check_inside(height, width)
        self._text_features(p.text for p in prompts)
        settings = dict(
            score_threshold=self.score_threshold if score_threshold is None else score_threshold,
            mask_threshold=self.mask_threshold if mask_threshold is None else mask_threshold,
            nms_iou=self.nms_iou if nms_iou is None else nms_iou,
        )
        results: dict[int, PromptResult] = {}
        text_only = [i for i, p in enumerate(prompts) if not p.boxes]
        with_boxes = [i for i, p in enumerate(prompts) if p.boxes]
        for group in (text_only, with_boxes):
            for start in range(0, len(group), self.max_batch):
                chunk = group[start : start + self.max_batch]
                results.update(zip(chunk, self._run_batch([prompts[i] for i in chunk], settings)))
        return [results[i] for i in range(len(prompts))]

    def predict_one(self, prompt: Prompt | str, **kwargs) -> PromptResult:
        return self.predict([prompt], **kwargs)[0]

    @torch.inference_mode()
    def _run_batch(self, prompts: list[Prompt], settings: dict) -> list[PromptResult]:
        outputs = self.detector_forward(prompts)
        return [
            to_prompt_result(
                prompt,
                outputs.pred_logits[i],
                outputs.pred_boxes[i],
                outputs.pred_masks[i],
                None if outputs.presence_logits is None else outputs.presence_logits[i],
                None if outputs.semantic_seg is None else outputs.semantic_seg[i],
                self.original_size,
                **settings,
            )
            for i, prompt in enumerate(prompts)
        ]

    def detector_forward(self, prompts: list[Prompt]):
        """One detector pass for prompts that all have boxes or all have none (raw SAM 3 outputs)."""
        batch = len(prompts)
        features = torch.cat([self._text_cache[p.text][0] for p in prompts])
        attention = torch.cat([self._text_cache[p.text][1] for p in prompts])
        boxes, labels = self._box_tensors(prompts)
        return self.model(
            vision_embeds=_expand(self._vision, batch),
            text_embeds=BaseModelOutputWithPooling(pooler_output=features),
            attention_mask=attention,
            input_boxes=boxes,
            input_boxes_labels=labels,
        )

    def _box_tensors(self, prompts: list[Prompt]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Boxes as SAM 3 wants them (see box_prompt_tensors); None when no prompt has any."""
        if not any(p.boxes for p in prompts):
            return None, None
        boxes, labels = box_prompt_tensors(
            [p.boxes for p in prompts], [p.box_labels for p in prompts], [self.original_size] * len(prompts)
        )
        return boxes.to(self.device, self.dtype), labels.to(self.device)
