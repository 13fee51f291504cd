"""Encode an image once, then answer any number of concept prompts.

The image encoder is most of the compute (SAM 3: 51.7 s of 57 s per 1008 px image on 2 CPU
cores). The predictor runs it once per image, keeps the features, lets the seam cache text features
per phrase, and sends all prompts through the detector in batched passes: prompts without boxes in
one batch, prompts with boxes in another (padded with SAM 3's -10 label), because a geometry prompt
changes what the detector attends to. Every model call goes through ``loaded.seam``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.data.windowing import as_rgb_uint8
from medsam3.errors import PromptError
from medsam3.infer.postprocess import (
    BOX_DECODER_RESIZE,
    fuse_results,
    mask_probabilities,
    semantic_result,
    to_prompt_result,
)
from medsam3.infer.types import Prompt, PromptResult, as_prompts
from medsam3.model.backbones.base import BOX_MODES, TEXT_MASK_SOURCES
from medsam3.model.loading import LoadedModel, load_model
from medsam3.model.presets import DEFAULT_MODEL


@dataclass
class EncodedImage:
    """One image through the frozen image tower, ready for any number of prompts."""

    embedding: tuple[torch.Tensor, ...] | None  # the frozen tower's output (None: features from elsewhere)
    vision: Sam3VisionEncoderOutput  # the detector's FPN levels, batch of one
    original_size: tuple[int, int]


@dataclass
class BoxDrawing:
    """What the box decoder drew for N boxes on one image."""

    probs: np.ndarray  # (N, H, W) float32 foreground probability in the image's pixels
    iou: np.ndarray  # (N,) the decoder's own estimate of each mask's IoU
    logits: torch.Tensor  # (N, S, S) low-resolution logits in the decoder's frame (a dense prompt for the next)


MASK_SOURCES = ("auto", *TEXT_MASK_SOURCES)


class Sam3Predictor:
    """Concept segmentation with the image encoder run once per image, through the model's seam.

    ``mask_source`` (text prompts): ``detector`` uses the SAM 3 mask decoder's per-query masks;
    ``semantic`` the connected components of its dense semantic map; ``box-decoder`` redraws each
    detected box with the backbone's pretrained box-prompted decoder (lite); ``fusion`` the semantic
    components plus every confident detection they do not cover; ``auto`` is each concept's source as
    measured on validation data when the model was trained (``loaded.mask_sources``), else the
    backbone's default (SAM 3: detector; lite: semantic); under ``auto`` a concept whose source finds
    nothing while the detector has confident instances gets those (never silently dropped).
    ``box_mode`` (text + box prompts, with a box decoder): ``outline`` draws each positive box with the
    box decoder (MedSAM: the box is the object, see ``_outline_prompt_boxes``); ``exemplar`` passes
    it to the detector as SAM 3 does and keeps the concept's text source; ``auto`` is each concept's
    measured choice (``loaded.box_modes``), else ``outline``. An explicit ``mask_source`` decides
    too: ``box-decoder`` outlines, ``semantic``/``detector``/``fusion`` make boxes exemplars.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        nms_iou: float | None = None,
        max_batch: int = 16,
        mask_source: str = "auto",
        box_mode: str = "auto",
    ):
        if mask_source not in MASK_SOURCES:
            raise PromptError(f"unknown mask source '{mask_source}': choose one of {', '.join(MASK_SOURCES)}")
        if box_mode not in ("auto", *BOX_MODES):
            raise PromptError(f"unknown box mode '{box_mode}': choose one of auto, {', '.join(BOX_MODES)}")
        self.loaded = loaded
        self.seam = loaded.seam
        self.model = loaded.model
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        self.nms_iou = nms_iou
        self.max_batch = max_batch
        self.mask_source = mask_source
        self.box_mode = box_mode
        self._image: EncodedImage | None = None
        self._warned: set[str] = set()
        self.encode_count = 0  # images this predictor sent through the image tower (tests and benchmarks)

    @classmethod
    def from_spec(
        cls, spec: str = DEFAULT_MODEL, *, device: str = "auto", adapter=None, towers=None, runtime=None, **kwargs
    ) -> Sam3Predictor:
        return cls(load_model(spec, device=device, adapter=adapter, towers=towers, runtime=runtime), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def text_mask_source(self) -> str:
        return self.seam.backbone.default_mask_source if self.mask_source == "auto" else self.mask_source

    def source_for(self, text: str) -> str:
        """The mask source of one concept: the explicit one, else its measured choice, else the default."""
        if self.mask_source != "auto":
            return self.mask_source
        sources = self.loaded.mask_sources
        return sources.get(text) or sources.get(" ".join(text.lower().split())) or self.text_mask_source

    def box_mode_for(self, text: str) -> str:
        """What a user's box does for one concept (see the class docstring)."""
        if self.box_mode != "auto":
            return self.box_mode
        if self.mask_source != "auto":
            return "outline" if self.mask_source == "box-decoder" else "exemplar"
        modes = self.loaded.box_modes
        return modes.get(text) or modes.get(" ".join(text.lower().split())) or "outline"

    # -- image -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> list[EncodedImage]:
        """Encode a batch of images in one forward (volumes, video); ``set_encoded`` each in turn."""
        rgbs = [as_rgb_uint8(image) for image in images]
        runs = self.seam.image_encodes
        embedding = self.seam.embed_images(rgbs)
        self.encode_count += self.seam.image_encodes - runs  # a shared tower memo may have had some
        encoded = []
        for k, rgb in enumerate(rgbs):
            own = self.seam.split_embedding(embedding, k)
            encoded.append(EncodedImage(own, self.seam.vision_features(own), (int(rgb.shape[0]), int(rgb.shape[1]))))
        return encoded

    def set_encoded(self, encoded: EncodedImage) -> None:
        self._image = encoded

    def set_image(self, image: np.ndarray) -> None:
        """Run the image encoder on ``image`` and keep its features for the prompts to come."""
        self.set_encoded(self.encode([image])[0])

    def set_embedding(self, embedding: tuple[torch.Tensor, ...], original_size: tuple[int, int]) -> None:
        """Use the frozen image tower's output computed elsewhere (a feature cache)."""
        size = (int(original_size[0]), int(original_size[1]))
        self._image = EncodedImage(embedding, self.seam.vision_features(embedding), size)

    def set_features(self, vision: Sam3VisionEncoderOutput, original_size: tuple[int, int]) -> None:
        """Use detector features computed elsewhere (a feature cache, a video propagator)."""
        self._image = EncodedImage(None, vision, original_size)

    @property
    def original_size(self) -> tuple[int, int]:
        if self._image is None:
            raise RuntimeError("call set_image() before predict()")
        return self._image.original_size

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
        if self._image is None:
            raise RuntimeError("call set_image() before predict()")
        prompts = as_prompts(prompts)
        height, width = self.original_size
        for prompt in prompts:
            prompt.check_inside(height, width)
            self._warn_if_truncated(prompt.text)
        self.seam.cache_phrases([p.text for p in prompts])  # every new phrase in one text pass
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

    def _warn_if_truncated(self, text: str) -> None:
        limit = self.seam.backbone.max_text_tokens
        if text not in self._warned and self.seam.token_count(text) > limit:
            self._warned.add(text)
            warnings.warn(f"prompt '{text[:60]}' is longer than the model's {limit} tokens: the rest is cut off",
                          stacklevel=3)  # fmt: skip

    @torch.inference_mode()
    def _run_batch(self, prompts: list[Prompt], settings: dict) -> list[PromptResult]:
        outputs = self.detector_forward(prompts)
        canvas = self.seam.canvas_size(*self.original_size)
        drawable = self.seam.has_box_decoder and self._image.embedding is not None
        results = [self._instances(outputs, i, prompt, canvas, drawable, settings) for i, prompt in enumerate(prompts)]
        if not drawable:
            return results
        return [self._outline_prompt_boxes(r, canvas, settings["mask_threshold"])
                if self.box_mode_for(r.prompt.text) == "outline" else r for r in results]  # fmt: skip

    def _instances(self, outputs, i: int, prompt: Prompt, canvas, drawable: bool, settings: dict) -> PromptResult:
        """One prompt's instances from its mask source (see the class docstring)."""
        source = self.source_for(prompt.text)

        def detected(semantic_instances: bool) -> PromptResult:
            box_masks = self._box_masks if drawable and source in ("box-decoder", "fusion", "semantic") else None
            return to_prompt_result(
                prompt,
                outputs.pred_logits[i],
                outputs.pred_boxes[i],
                outputs.pred_masks[i],
                None if outputs.presence_logits is None else outputs.presence_logits[i],
                None if outputs.semantic_seg is None else outputs.semantic_seg[i],
                self.original_size,
                canvas_size=canvas,
                box_masks=box_masks if not semantic_instances else None,
                semantic_instances=semantic_instances,
                mask_resize=self.seam.backbone.mask_resize,
                **settings,
            )

        if source not in ("semantic", "fusion"):
            result = detected(False)
            if len(result) or self.mask_source != "auto" or result.semantic is None:
                return result
            # the chosen source found nothing: the dense map (gated by presence) still may have
            return semantic_result(
                prompt, result.presence, result.semantic, settings["score_threshold"], settings["mask_threshold"]
            )
        result = detected(source == "semantic")
        if result.semantic is None:  # a model without a semantic head: its detections are all there is
            return result if source == "fusion" else detected(False)
        if source == "semantic" and (len(result) or self.mask_source != "auto"):
            return result
        semantic = result if source == "semantic" else semantic_result(
            prompt, result.presence, result.semantic, settings["score_threshold"], settings["mask_threshold"]
        )
        return fuse_results(semantic, result if source == "fusion" else detected(False))

    def _outline_prompt_boxes(
        self, result: PromptResult, canvas: tuple[int, int], mask_threshold: float
    ) -> PromptResult:
        """A user's positive box outlines one instance, drawn by the box decoder from that very box.

        As in MedSAM (box = the object): with a box decoder the boxed instances are the result, scored by
        the detector's presence; the detector's own detections, whose boxes are less exact than the
        user's, are left out. Negative boxes still steer the detector's presence.
        """
        boxes = [b for b, label in zip(result.prompt.boxes, result.prompt.box_labels) if label == 1]
        if not boxes:
            return result
        height, width = self.original_size
        frame = torch.tensor([canvas[1], canvas[0], canvas[1], canvas[0]], dtype=torch.float32)
        clipped = torch.tensor(boxes, dtype=torch.float32)
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
        logits = self._box_masks(clipped / frame)
        probs = mask_probabilities(logits, canvas, BOX_DECODER_RESIZE)[:, :height, :width]
        drawn = (probs > mask_threshold).cpu().numpy()
        found = drawn.reshape(len(drawn), -1).any(axis=1)
        score = np.float32(result.presence if np.isfinite(result.presence) else 1.0)
        return PromptResult(
            prompt=result.prompt,
            presence=result.presence,
            scores=np.full(int(found.sum()), score, np.float32),
            boxes=clipped[torch.from_numpy(found)].numpy().astype(np.float32).reshape(-1, 4),
            masks=drawn[found],
            semantic=result.semantic,
        )

    @torch.inference_mode()
    def draw_boxes(self, boxes, mask_logits: torch.Tensor | None = None) -> BoxDrawing:
        """The box decoder alone on the current image: xyxy pixel boxes -> masks, with its IoU estimates.

        No text and no detector: what 3D propagation asks on each slice. ``mask_logits`` (N, S, S) in
        the decoder's frame (a ``BoxDrawing.logits`` of a same-sized image) is SAM's dense mask prompt.
        """
        if not self.seam.has_box_decoder or self._image is None or self._image.embedding is None:
            raise PromptError("this model has no box decoder (use lite): boxes cannot be drawn without text")
        height, width = self.original_size
        canvas = self.seam.canvas_size(height, width)
        clipped = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)).clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
        frame = torch.tensor([canvas[1], canvas[0], canvas[1], canvas[0]], dtype=torch.float32)
        logits, iou = self.seam.box_decode(self._image.embedding, clipped / frame * self.seam.input_size, mask_logits)
        probs = mask_probabilities(logits, canvas, BOX_DECODER_RESIZE)[:, :height, :width]
        return BoxDrawing(probs.float().cpu().numpy(), iou.cpu().numpy(), logits)

    def _box_masks(self, boxes_normalised: torch.Tensor) -> torch.Tensor:
        return self.seam.box_masks(self._image.embedding, boxes_normalised * self.seam.input_size)

    @torch.inference_mode()
    def detector_forward(self, prompts: list[Prompt]):
        """One detector pass for prompts that all have boxes or all have none (raw SAM 3 outputs)."""
        features, mask = self.seam.encode_phrases([p.text for p in prompts])
        boxes = labels = None
        if any(p.boxes for p in prompts):
            boxes, labels = self.seam.box_tensors(
                [p.boxes for p in prompts], [p.box_labels for p in prompts], [self.original_size] * len(prompts)
            )
        vision = self.seam.expand(self._image.vision, len(prompts))
        return self.seam.detect(vision, features, mask, boxes, labels)
