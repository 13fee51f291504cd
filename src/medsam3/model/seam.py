"""The one place that talks to the model: images in, phrases in, detector outputs out.

Predictor, trainer, feature cache, volumes, video and evaluation all go through a
:class:`ModelSeam`; none of them preprocesses, tokenises or slices features itself. The backbone
(:mod:`medsam3.model.backbones`) decides how; the seam adds what every caller needs on top: device
and dtype, batching, a per-phrase cache of the frozen text tower's output, box normalisation in the
model's input frame, and feature selection for sub-batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.model.backbones.base import Backbone
from medsam3.model.box_prompts import box_prompt_tensors
from medsam3.model.runtime import OpenVinoTower
from medsam3.model.tower_memo import TowerMemo, image_key, tower_fingerprint, weights_signature


class ModelSeam:
    """A model, its backbone and its device: every model call in the project goes through here."""

    def __init__(self, model: nn.Module, backbone: Backbone, device: torch.device):
        self.model = model
        self.backbone = backbone
        self.device = device
        self._text_states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fast_tower: OpenVinoTower | None = None  # see set_runtime
        self._memo: TowerMemo | None = None  # see share_tower_outputs
        self._fingerprint: tuple[tuple, str] | None = None  # (weights signature, fingerprint)
        self.image_encodes = 0  # images through the frozen image tower (tests and benchmarks count it)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The detector's dtype: what trains, and what every tower output is cast to."""
        return next(self.model.detr_encoder.parameters()).dtype

    @property
    def tower_dtype(self) -> torch.dtype:
        """The frozen image tower's dtype (bf16 on machines where it was measured faster)."""
        return next(iter(self.backbone.frozen_modules(self.model).values())).parameters().__next__().dtype

    def set_tower_dtype(self, dtype: torch.dtype) -> None:
        """Run the pretrained towers in ``dtype``; trainable parts keep theirs (fp32 master weights)."""
        for module in self.backbone.tower_modules(self.model):
            module.to(dtype)
        self.clear_text_cache()
        if self._fast_tower is not None:
            self.set_runtime("openvino")  # reconvert for the new dtype

    @property
    def runtime(self) -> str:
        """What runs the frozen image tower: "openvino" or "torch"."""
        return "openvino" if self._fast_tower is not None else "torch"

    def set_runtime(self, name: str) -> None:
        """Run the exportable image tower with OpenVINO ("openvino") or PyTorch ("torch").

        OpenVINO only ever runs the tower without gradients while it is frozen; otherwise PyTorch does.
        """
        tower = self.backbone.exportable_tower(self.model)
        if name == "openvino" and tower is not None:
            dtype = "bf16" if next(tower.parameters()).dtype == torch.bfloat16 else "fp32"
            self._fast_tower = OpenVinoTower(tower, dtype)
        else:
            self._fast_tower = None

    @property
    def input_size(self) -> int:
        return self.backbone.input_size

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        return self.backbone.canvas_size(height, width)

    @property
    def has_box_decoder(self) -> bool:
        return hasattr(self.model, "box_decoder")

    def tower_fingerprint(self) -> str:
        """What identifies the frozen image tower's output: weights, dtype, runtime, preprocessing.

        Hashing every weight takes seconds for SAM 3, so the hash is kept until a weight is replaced
        or changed in place (its version counter moves), the dtype changes or the runtime does."""
        frozen = self.backbone.frozen_modules(self.model).values()
        signature = (self.runtime, weights_signature(p for module in frozen for p in module.parameters()))
        if self._fingerprint is None or self._fingerprint[0] != signature:
            fingerprint = tower_fingerprint(self.backbone, self.model, self.tower_dtype, self.runtime)
            self._fingerprint = (signature, fingerprint)
        return self._fingerprint[1]

    @property
    def tower_memo(self) -> TowerMemo | None:
        return self._memo

    def share_tower_outputs(self, memo: TowerMemo | None) -> None:
        """Keep the frozen tower's outputs in ``memo`` (None: stop), shared with other seams.

        Outputs are filed under the tower's fingerprint at the time of each call, so seams of models
        that share a frozen tower (a base and its paper-policy adapters) reuse each other's encodings,
        no other seam sees them, and a tower whose weights change stops matching. Calls with gradients
        never use the memo.
        """
        self._memo = memo

    # -- images --------------------------------------------------------------------------------
    def pixel_values(self, rgbs: Sequence[np.ndarray]) -> torch.Tensor:
        return self.backbone.pixel_values(rgbs).to(self.device, self.tower_dtype)

    def embed_images(self, rgbs: Sequence[np.ndarray], *, grad: bool = False) -> tuple[torch.Tensor, ...]:
        """The frozen image tower's output for a batch (what a feature cache stores)."""
        grad = grad and torch.is_grad_enabled()
        if self._memo is not None and not grad:
            return self._remembered(rgbs)
        return self._embed(rgbs, grad)

    def _remembered(self, rgbs: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """Tower outputs from the shared memo, encoding (in one batch) only the images it lacks."""
        tower = self.tower_fingerprint()
        keys = [image_key(rgb) for rgb in rgbs]
        found = [self._memo.get(tower, key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            fresh = self._embed([rgbs[i] for i in missing], False)
            with torch.inference_mode(False):  # plain tensors: usable by any later caller
                for row, index in enumerate(missing):
                    found[index] = tuple(t.clone() for t in self.split_embedding(fresh, row))
                    self._memo.put(tower, keys[index], found[index])
        return tuple(torch.cat([entry[j] for entry in found]) for j in range(len(found[0])))

    def _embed(self, rgbs: Sequence[np.ndarray], grad: bool) -> tuple[torch.Tensor, ...]:
        pixels = self.pixel_values(rgbs)
        if not grad and self._fast_tower is not None and self._fast_tower.usable():
            embedding = (self._fast_tower(pixels),)
        else:
            with torch.set_grad_enabled(grad):
                embedding = self.backbone.image_embedding(self.model, pixels)
        self.image_encodes += len(rgbs)
        return embedding

    def vision_features(self, embedding: tuple[torch.Tensor, ...]) -> Sam3VisionEncoderOutput:
        """The detector's FPN levels from an embedding (runs a trainable neck when the backbone has one)."""
        return self.backbone.vision_features(self.model, tuple(t.to(self.dtype) for t in embedding))

    def encode_images(self, rgbs: Sequence[np.ndarray], *, grad: bool = False) -> Sam3VisionEncoderOutput:
        return self.vision_features(self.embed_images(rgbs, grad=grad))

    @staticmethod
    def select(vision: Sam3VisionEncoderOutput, index: torch.Tensor | Sequence[int]) -> Sam3VisionEncoderOutput:
        """Rows ``index`` of a batched vision output."""
        if not torch.is_tensor(index):
            index = torch.as_tensor(list(index), device=vision.fpn_hidden_states[0].device)
        return Sam3VisionEncoderOutput(
            last_hidden_state=None,
            fpn_hidden_states=tuple(h.index_select(0, index) for h in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.index_select(0, index) for p in vision.fpn_position_encoding),
        )

    @staticmethod
    def expand(vision: Sam3VisionEncoderOutput, batch: int) -> Sam3VisionEncoderOutput:
        """One image's features viewed as a batch of ``batch`` (no copy)."""

        def grow(t: torch.Tensor) -> torch.Tensor:
            return t.expand(batch, *t.shape[1:])

        return Sam3VisionEncoderOutput(
            last_hidden_state=None,
            fpn_hidden_states=tuple(grow(t) for t in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(grow(t) for t in vision.fpn_position_encoding),
        )

    @staticmethod
    def split_embedding(embedding: tuple[torch.Tensor, ...], k: int) -> tuple[torch.Tensor, ...]:
        """Image ``k`` of a batched embedding, as a batch of one (views)."""
        return tuple(t[k : k + 1] for t in embedding)

    # -- text ----------------------------------------------------------------------------------
    def token_count(self, phrase: str) -> int:
        return self.backbone.token_count(phrase)

    def clear_text_cache(self) -> None:
        """Forget cached text-tower outputs (after the tower's weights changed, e.g. an adapter)."""
        self._text_states.clear()

    def cache_phrases(self, phrases: Sequence[str]) -> None:
        """Run the frozen text tower once for all new phrases (one batched pass)."""
        self._frozen_text(list(phrases))

    def _frozen_text(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({p for p in phrases if p not in self._text_states})
        if missing:
            # Outside inference mode: cached states must stay usable by a training step later.
            with torch.inference_mode(False), torch.no_grad():
                ids, mask = self.backbone.tokenize(missing)
                ids, mask = ids.to(self.device), mask.to(self.device)
                states = self.backbone.text_states(self.model, ids, mask).to(self.dtype)
            for i, phrase in enumerate(missing):
                self._text_states[phrase] = (states[i : i + 1], mask[i : i + 1])
        return (
            torch.cat([self._text_states[p][0] for p in phrases]),
            torch.cat([self._text_states[p][1] for p in phrases]),
        )

    def encode_phrases(
        self, phrases: Sequence[str], *, text_tower_frozen: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, L, D), attention mask (B, L)) for the detector.

        With a frozen text tower its output is cached per phrase and only the projection runs (with
        gradients when it trains); otherwise the whole tower runs.
        """
        if text_tower_frozen:
            states, mask = self._frozen_text(phrases)
        else:
            ids, mask = self.backbone.tokenize(list(phrases))
            ids, mask = ids.to(self.device), mask.to(self.device)
            states = self.backbone.text_states(self.model, ids, mask).to(self.dtype)
        return self.backbone.text_features(self.model, states), mask

    # -- boxes and the detector ----------------------------------------------------------------
    def box_tensors(
        self,
        box_sets: Sequence[Sequence[Sequence[float]]],
        label_sets: Sequence[Sequence[int]],
        sizes: Sequence[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """xyxy pixel boxes of images of ``sizes`` -> SAM 3's (B, N, 4) cxcywh in the input frame + labels."""
        clip = list(sizes)
        canvases = [self.canvas_size(h, w) for h, w in sizes]
        boxes, labels = box_prompt_tensors(box_sets, label_sets, canvases, clip_sizes=clip)
        return boxes.to(self.device, self.dtype), labels.to(self.device)

    def detect(
        self,
        vision: Sam3VisionEncoderOutput,
        features: torch.Tensor,
        mask: torch.Tensor,
        boxes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """One detector pass (raw SAM 3 outputs); ``vision`` has one row per prompt."""
        return self.model(
            vision_embeds=vision,
            text_embeds=BaseModelOutputWithPooling(pooler_output=features),
            attention_mask=mask,
            input_boxes=boxes,
            input_boxes_labels=labels,
        )

    @torch.no_grad()
    def box_masks(self, embedding: tuple[torch.Tensor, ...], boxes_input_px: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, S, S) drawn by the backbone's box decoder for boxes in input pixels."""
        dtype = next(self.model.box_decoder.parameters()).dtype
        return self.model.box_decoder(embedding[0].to(dtype), boxes_input_px.to(self.device, dtype)).float()

    @torch.no_grad()
    def box_decode(
        self,
        embedding: tuple[torch.Tensor, ...],
        boxes_input_px: torch.Tensor,
        mask_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The box decoder's mask logits (N, S, S) and IoU estimates (N,); ``mask_logits``: a dense mask prompt."""
        dtype = next(self.model.box_decoder.parameters()).dtype
        dense = None if mask_logits is None else mask_logits.to(self.device, dtype)
        boxes = boxes_input_px.to(self.device, dtype)
        logits, iou = self.model.box_decoder.decode(embedding[0].to(dtype), boxes, dense)
        return logits.float(), iou.float()
