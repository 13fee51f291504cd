"""SAM 3 detection losses for fine-tuning transformers' Sam3Model, which ships without a loss.

The defaults are SAM 3's own recipe (Meta's trainer, facebookresearch/sam3 ``sam3/train/loss``, and
the released fine-tuning config ``roboflow_v100_full_ft_100_images.yaml``; the term-by-term review is
in the project's shared notes). Per image the queries are matched one-to-one to the ground-truth
instances (HungarianMatcher: focal class cost 2, L1 5, GIoU 2), then

- classification, IoU-aware BCE ("IABCE"): a matched query's target is the detached soft score
  p^0.25 * IoU^0.75 (at least 0.01), weighted by pos_weight 10; unmatched queries are negatives,
  BCE towards 0 down-weighted by p^2. Images without the concept contribute no query term (the
  presence head alone says "absent"). Summed and divided by max(Q, 200) x B (SAM 3's
  ``pad_n_queries``: a model with fewer than 200 queries gets the per-query gradient of a 200-query
  one). Weight 20;
- presence: sigmoid focal with alpha 0.5, gamma 0 (= half a BCE) on the presence logit, target "the
  image has at least one instance", mean over images. Weight 20;
- boxes: L1 on normalised cxcywh (weight 5) plus 1 - GIoU (weight 2), matched queries only;
- masks: sigmoid focal (alpha 0.25, gamma 2; mean over pixels; weight 200) plus Dice (+1 smoothing;
  weight 10), matched queries only, the predicted logits upsampled bilinearly to the target masks'
  size (at most the model's input side, as SAM 3's targets are: see `LossWeights.max_mask_side`);
- semantic: sigmoid focal (alpha 0.6, gamma 2; weight 20) plus Dice (weight 30) of ``semantic_seg``
  against the union of the instance masks, at the target size, only on images that contain the
  concept, divided by their number.

Box and mask sums are divided by the number of target boxes in the batch (summed over processes
under torch.distributed, at least 1), as SAM 3 does. Losses run in float32 even under autocast.

Where we differ from SAM 3, and why (each difference is an option of `LossWeights`):
- the semantic term is on by default. SAM 3's released fine-tuning config and the MedSAM3 authors'
  trainer switch it off (the config keeps it, with these values, commented out; the pre-training
  configs are not public), but dense supervision converges far faster than matched instance losses
  for our small detectors trained from scratch (``lite``, ``nano``); set ``semantic=0,
  semantic_dice=0`` for the released fine-tuning recipe;
- no one-to-many ("DAC") supervision: SAM 3 duplicates its queries in training, the copies skip
  self-attention, and a one-to-many matcher supervises them. transformers' Sam3DetrDecoderLayer has
  no such copies; the earlier substitute (extra one-to-many targets on the one-to-one queries) was
  removed because it fought the classification loss, which pushes those same queries to 0;
- SAM 3 multiplies the whole loss by sqrt(batch) in its fine-tuning config; with AdamW and gradient
  clipping that scale has almost no effect, so it is left out.

Auxiliary losses: Sam3Model returns only the last decoder layer's logits and boxes. The decoder
itself computes every layer's normalised query states, input reference boxes and presence logits,
and `dot_product_scoring` is called on all layers at once, so `DecoderLayerRecorder` keeps those with
forward hooks and rebuilds each layer's boxes with `detr_decoder.box_head` exactly as the model
does for the last one. Classification, presence and box terms are applied to each earlier layer
(own matching, weight ``aux``); masks are only decoded for the last layer, so there is no auxiliary
mask term (SAM 3 has none either).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from medsam3.errors import MedSAM3Error
from medsam3.train.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, check_xyxy, paired_box_iou_and_giou
from medsam3.train.matcher import HungarianMatcher, Match

SEMANTIC_FORMS = ("focal", "bce")


@dataclass
class LossWeights:
    """Every loss option in one place; the defaults are SAM 3's values unless a comment says otherwise.

    Classification: ``cls`` (20), IoU-aware soft targets ``cls_iou_aware`` (True; False gives matched
    queries the hard target 1, for a detector trained from scratch whose boxes are poor for a long
    time), ``cls_pos_weight`` 10, ``cls_alpha`` 0.25 (soft target p^alpha * IoU^(1-alpha)),
    ``cls_gamma`` 2 (negatives scaled by p^gamma). ``pad_n_queries`` 200: the sum over queries is
    divided by max(Q, pad_n_queries) x B; 0 averages over the Q queries the model has (heavier by
    200/Q: 6.25x for lite's 32 queries, 25x for nano's 8). ``negatives_in_absent_images`` False: in
    an image without the concept no query is trained (SAM 3); True trains all its queries towards 0,
    which suppresses twice, since the final score is query x presence.

    Presence: ``presence`` 20, focal ``presence_alpha`` 0.5, ``presence_gamma`` 0 (half a BCE).
    Boxes: ``bbox_l1`` 5, ``giou`` 2. Auxiliary decoder layers: ``aux`` 1 (0 turns them off).

    Masks: ``mask_focal`` 200, ``mask_dice`` 10, focal ``mask_alpha`` 0.25, ``mask_gamma`` 2.
    ``mask_at_target`` True (SAM 3: logits upsampled bilinearly to the target masks' grid) or False
    (targets area-downsampled to the logits' grid: cheaper by the upsampling factor squared, coarser
    supervision of thin and tiny structures); ``semantic_at_target`` the same for the semantic map.
    ``max_mask_side`` caps the long side of the target grid (targets area-downsampled to it first):
    None (default) = the model's input side (``Sam3DetectionLoss(input_side=...)``: 1008 for SAM 3,
    256 for lite), 0 = no cap, N = N px. SAM 3's targets are resized with the image to its 1008 px
    input, so "the target size" there is the input side; our targets live on the original canvas
    (512 px for a CT slice, 2000+ for a pathology tile), and supervising finer than the model's input
    costs time without adding anything the model saw (``benchmarks/bench_losses.py``: 4 images x 32
    queries, 64 px logits, one thread on the shared 2-core machine: 0.1-0.3 s per loss call at a
    512 px target, 4-9 s at 2048, against 0.02-0.05 s on the 64 px grid).

    Semantic map: ``semantic`` 20 and ``semantic_dice`` 30 (SAM 3's values for this term; 0 and 0 is
    SAM 3's released fine-tuning recipe), ``semantic_form`` "focal" with ``semantic_alpha`` 0.6,
    ``semantic_gamma`` 2 (SAM 3), ``semantic_on_absent`` False (SAM 3: images without the concept
    give no semantic term). ``semantic_form="bce"`` with ``semantic_on_absent=True`` is this
    project's earlier form (plain BCE on every image, 9x to 235x stronger than the focal form at
    equal weight): it is kept because the bundled ``lite`` and ``nano`` detectors were trained with
    it (``LEGACY_LOSS`` reproduces that whole recipe) and so that the two can be compared.
    """

    cls: float = 20.0
    cls_iou_aware: bool = True
    cls_pos_weight: float = 10.0
    cls_alpha: float = 0.25
    cls_gamma: float = 2.0
    pad_n_queries: int = 200
    negatives_in_absent_images: bool = False
    presence: float = 20.0
    presence_alpha: float = 0.5
    presence_gamma: float = 0.0
    bbox_l1: float = 5.0
    giou: float = 2.0
    mask_focal: float = 200.0
    mask_dice: float = 10.0
    mask_alpha: float = 0.25
    mask_gamma: float = 2.0
    mask_at_target: bool = True
    max_mask_side: int | None = None
    semantic: float = 20.0
    semantic_dice: float = 30.0
    semantic_form: str = "focal"
    semantic_alpha: float = 0.6
    semantic_gamma: float = 2.0
    semantic_on_absent: bool = False
    semantic_at_target: bool = True
    aux: float = 1.0

    def __post_init__(self) -> None:
        if self.semantic_form not in SEMANTIC_FORMS:
            raise MedSAM3Error(
                f"loss option semantic_form must be one of {', '.join(SEMANTIC_FORMS)}, got {self.semantic_form!r}"
            )
        for name in ("pad_n_queries", "max_mask_side"):
            value = getattr(self, name)
            if value is None and name == "max_mask_side":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MedSAM3Error(f"loss option {name} must be a whole number >= 0, got {value!r}")
        weights = ("cls", "cls_pos_weight", "presence", "bbox_l1", "giou", "mask_focal", "mask_dice",
                   "semantic", "semantic_dice", "aux")
        for name in weights:
            if not float(getattr(self, name)) >= 0:
                raise MedSAM3Error(f"loss weight {name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> LossWeights:
        """`LossWeights(**options)` (e.g. ``TrainConfig.loss_weights``) with a one-line error naming an
        unknown option (a typo in a config) instead of a TypeError."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MedSAM3Error(f"unknown loss option(s) {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
        return cls(**options)


# This project's loss before it followed SAM 3 (issue 17), which trained the bundled lite and nano:
# BCE semantic term on every image, all queries negative in absent images, the mean over the model's
# queries, masks at the prediction grid. For comparisons: LossWeights(**LEGACY_LOSS).
LEGACY_LOSS: dict[str, Any] = {
    "semantic_form": "bce",
    "semantic_on_absent": True,
    "negatives_in_absent_images": True,
    "pad_n_queries": 0,
    "mask_at_target": False,
    "semantic_at_target": False,
}


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row soft Dice loss, (N, ...) logits and {0, 1} targets -> (N,); +1 smoothing keeps empty
    targets defined (the loss then pushes the prediction towards empty)."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    inter = (prob * targets).sum(1)
    return 1 - (2 * inter + 1) / (prob.sum(1) + targets.sum(1) + 1)


def iou_aware_bce(
    logits: torch.Tensor,
    positive: torch.Tensor,
    positive_iou: torch.Tensor,
    pos_weight: float,
    alpha: float,
    gamma: float,
    query_weight: torch.Tensor | None = None,
    iou_aware: bool = True,
    pad_n_queries: int = 0,
) -> torch.Tensor:
    """SAM 3's IoU-aware classification loss over (B, Q) logits, summed and divided by B x max(Q, pad_n_queries).

    `positive` (B, Q) bool marks matched queries; `positive_iou` (B, Q) their box IoU with the target.
    Positives regress to the detached soft target p^alpha * IoU^(1 - alpha) (floor 0.01), so a query's
    score learns to reflect how well it localises; negatives are BCE towards 0 scaled by p^gamma.
    `query_weight` (B, Q) masks entries out (0) without changing the denominator (SAM 3 zeroes the
    query terms of images without the concept the same way).
    ``iou_aware=False`` gives matched queries the hard target 1: a network trained from scratch has
    poor boxes for a long time, and soft targets then keep every score low.
    ``pad_n_queries`` 0 is the plain mean over B x Q.
    """
    prob = logits.sigmoid()
    is_pos = positive.to(logits.dtype)
    with torch.no_grad():
        if iou_aware:
            soft = (prob.pow(alpha) * positive_iou.clamp(min=0).pow(1 - alpha)).clamp(min=0.01)
        else:
            soft = torch.ones_like(prob)
        soft = soft * is_pos
    pos = F.binary_cross_entropy_with_logits(logits, soft, reduction="none") * is_pos * pos_weight
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = pos + neg * (1 - is_pos) * prob.pow(gamma)
    if query_weight is not None:
        loss = loss * query_weight
    batch, queries = logits.shape
    return loss.sum() / (batch * max(queries, pad_n_queries))


@torch.no_grad()
def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks (N, H, W) -> float {0, 1} masks (N, h, w) on a coarser grid.

    Area interpolation gives each output pixel the fraction of it the mask covers; >= 0.5 is inside.
    Used for ``mask_at_target=False`` (and the semantic twin) and to bring targets down to ``max_mask_side``. An
    instance too small to cover half of any output pixel keeps its best-covered pixel, so no target
    silently becomes empty.
    """
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return (masks >= 0.5).float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    coverage = F.interpolate(masks[:, None], size=size, mode="area")[:, 0]
    out = coverage >= 0.5
    lost = ~out.flatten(1).any(1) & (masks.flatten(1) > 0).any(1)
    for i in torch.nonzero(lost).flatten().tolist():
        out[i].view(-1)[coverage[i].flatten().argmax()] = True
    return out.float()


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) mask logits -> float32 (N, H, W), bilinear without corner alignment (as SAM 3)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *size))
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _get(outputs: Any, key: str) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    return getattr(outputs, key, None)


def _global_box_count(n_local: int, device: torch.device) -> torch.Tensor:
    """Average number of target boxes per process (DETR's normaliser), at least 1."""
    count = torch.tensor(float(n_local), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count.clamp(min=1.0)


@dataclass
class _Target:
    boxes: torch.Tensor  # (N, 4) xyxy in [0, 1]
    masks: torch.Tensor | None  # (N, H, W) or None when N == 0 and no mask was given
    present: bool
    size: tuple[int, int] | None  # (H, W) of the masks when given, even with N == 0


def _prepare_targets(targets: Sequence[Mapping[str, Any]], batch: int, device: torch.device) -> list[_Target]:
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for a batch of {batch} predictions")
    prepared = []
    for i, target in enumerate(targets):
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        check_xyxy(boxes, f"target {i} boxes")
        masks = target.get("masks")
        size = None
        if masks is not None:
            masks = torch.as_tensor(masks, device=device)
            if masks.ndim == 3:
                size = (int(masks.shape[1]), int(masks.shape[2]))
            if masks.numel() == 0 and boxes.shape[0] == 0:
                masks = None
            elif masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
                raise ValueError(
                    f"target {i}: masks must be (N, H, W) with N = {boxes.shape[0]} boxes, got {tuple(masks.shape)}"
                )
        elif boxes.shape[0] > 0:
            raise ValueError(f"target {i}: {boxes.shape[0]} boxes but no masks")
        present = bool(target.get("present", boxes.shape[0] > 0))
        if present != (boxes.shape[0] > 0):
            raise ValueError(f"target {i}: present={present} but it has {boxes.shape[0]} boxes")
        prepared.append(_Target(boxes, masks, present, size))
    return prepared


class Sam3DetectionLoss(nn.Module):
    """Matched detection + mask + presence + semantic loss for Sam3Model outputs (see the module doc).

    `forward(outputs, targets, aux_outputs=None)` returns (total, terms): `total` is the weighted sum
    to backpropagate; `terms` maps each unweighted term ("loss_cls", "loss_presence", "loss_bbox",
    "loss_giou", "loss_mask", "loss_dice", "loss_semantic", "loss_semantic_dice", auxiliary ones
    suffixed "_aux{layer}") to a detached scalar for logging.

    `outputs` is a Sam3ImageSegmentationOutput or a mapping with pred_logits (B, Q), pred_boxes
    (B, Q, 4) xyxy in [0, 1], pred_masks (B, Q, h, w) logits, presence_logits (B, 1) and
    semantic_seg (B, 1, h', w') logits. `targets` holds one dict per image: "boxes" (N, 4) xyxy in
    [0, 1], "masks" (N, H, W) at any resolution (the model's canvas; (0, H, W) for an absent
    concept), optional "present" (must equal N > 0).
    `aux_outputs` are earlier decoder layers' outputs from `DecoderLayerRecorder.layer_outputs()`.
    All options live in `weights` (`LossWeights`); `input_side` is the model's input side in pixels
    (``LoadedModel.image_size``), the default cap of the mask and semantic loss grid
    (``LossWeights.max_mask_side``).
    """

    def __init__(
        self,
        weights: LossWeights | None = None,
        matcher: HungarianMatcher | None = None,
        input_side: int | None = None,
    ):
        super().__init__()
        self.weights = weights if weights is not None else LossWeights()
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.input_side = input_side

    def forward(
        self,
        outputs: Any,
        targets: Sequence[Mapping[str, Any]],
        aux_outputs: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred_logits = _get(outputs, "pred_logits")
        pred_boxes = _get(outputs, "pred_boxes")
        if pred_logits is None or pred_boxes is None:
            raise ValueError("outputs need pred_logits and pred_boxes")
        device = pred_logits.device
        prepared = _prepare_targets(targets, pred_logits.shape[0], device)
        num_boxes = _global_box_count(sum(t.boxes.shape[0] for t in prepared), device)
        w = self.weights
        weighted: list[torch.Tensor] = []
        terms: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor, weight: float) -> None:
            terms[name] = value.detach()
            if weight != 0:
                weighted.append(weight * value)

        with torch.autocast(device.type, enabled=False):  # losses in float32, whatever the model ran in
            matches = self._detection_terms(outputs, prepared, num_boxes, "", 1.0, add)
            self._mask_terms(_get(outputs, "pred_masks"), prepared, matches, num_boxes, add)
            self._semantic_terms(_get(outputs, "semantic_seg"), prepared, add)
            for layer, layer_outputs in enumerate(aux_outputs or ()):
                self._detection_terms(layer_outputs, prepared, num_boxes, f"_aux{layer}", w.aux, add)
            total = torch.stack(weighted).sum() if weighted else pred_logits.float().sum() * 0.0
        return total, terms

    def semantic_loss(self, semantic_seg: torch.Tensor, targets: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """The weighted semantic terms alone: what trains a head on the semantic map once the
        detector is fixed (``train.semantic_head``)."""
        prepared = _prepare_targets(targets, semantic_seg.shape[0], semantic_seg.device)
        weighted: list[torch.Tensor] = []

        def add(name: str, value: torch.Tensor, weight: float) -> None:
            if weight != 0:
                weighted.append(weight * value)

        with torch.autocast(semantic_seg.device.type, enabled=False):
            self._semantic_terms(semantic_seg, prepared, add)
        return torch.stack(weighted).sum() if weighted else semantic_seg.float().sum() * 0.0

    def _detection_terms(self, outputs, prepared, num_boxes, suffix, scale, add) -> list[Match]:
        """Match, then classification, presence and box terms of one decoder layer."""
        w = self.weights
        logits = _get(outputs, "pred_logits").float()
        boxes = _get(outputs, "pred_boxes").float()
        presence = _get(outputs, "presence_logits")
        matches = self.matcher(
            logits.detach(),
            boxes.detach(),
            [t.boxes for t in prepared],
            None if presence is None else presence.detach(),
        )
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive_iou = torch.zeros_like(logits)
        for b, (query_idx, target_idx) in enumerate(matches):
            if query_idx.numel():
                positive[b, query_idx] = True
                iou, _ = paired_box_iou_and_giou(boxes[b, query_idx].detach(), prepared[b].boxes[target_idx])
                positive_iou[b, query_idx] = iou
        query_weight = None
        if not w.negatives_in_absent_images:
            keep = torch.tensor([t.present for t in prepared], dtype=logits.dtype, device=logits.device)
            query_weight = keep[:, None].expand_as(logits)
        cls = iou_aware_bce(
            logits,
            positive,
            positive_iou,
            w.cls_pos_weight,
            w.cls_alpha,
            w.cls_gamma,
            query_weight,
            iou_aware=w.cls_iou_aware,
            pad_n_queries=w.pad_n_queries,
        )
        add(f"loss_cls{suffix}", cls, scale * w.cls)
        if presence is not None:
            present = torch.tensor([float(t.present) for t in prepared], device=logits.device)
            presence_loss = sigmoid_focal_loss(
                presence.float().reshape(-1),
                present,
                alpha=w.presence_alpha,
                gamma=w.presence_gamma,
                reduction="mean",
            )
            add(f"loss_presence{suffix}", presence_loss, scale * w.presence)
        self._box_terms(boxes, prepared, matches, num_boxes, suffix, scale, add)
        return matches

    def _box_terms(self, boxes, prepared, matches, num_boxes, suffix, scale, add) -> None:
        w = self.weights
        src = torch.cat([boxes[b, q] for b, (q, _) in enumerate(matches)])
        tgt = torch.cat([prepared[b].boxes[t] for b, (_, t) in enumerate(matches)])
        l1 = F.l1_loss(box_xyxy_to_cxcywh(src), box_xyxy_to_cxcywh(tgt), reduction="sum") / num_boxes
        _, giou = paired_box_iou_and_giou(src, tgt)
        add(f"loss_bbox{suffix}", l1, scale * w.bbox_l1)
        add(f"loss_giou{suffix}", (1 - giou).sum() / num_boxes, scale * w.giou)

    def loss_grid(
        self, target_size: tuple[int, int] | None, prediction_size: tuple[int, int], at_target: bool = True
    ) -> tuple[int, int]:
        """The (H, W) grid a mask or semantic term is computed on for one image."""
        w = self.weights
        if not at_target or target_size is None:
            return tuple(prediction_size)
        height, width = target_size
        cap = w.max_mask_side if w.max_mask_side is not None else (self.input_side or 0)
        if cap and max(height, width) > cap:
            scale = cap / max(height, width)
            return max(1, round(height * scale)), max(1, round(width * scale))
        return height, width

    def _mask_terms(self, pred_masks, prepared, matches, num_boxes, add) -> None:
        w = self.weights
        if pred_masks is None or w.mask_focal == w.mask_dice == 0:
            return  # the dense terms are the costly ones: not computed when they do not count
        prediction_size = tuple(pred_masks.shape[-2:])
        focal = dice = pred_masks.float().sum() * 0.0
        for b, (query_idx, target_idx) in enumerate(matches):
            if query_idx.numel() == 0:
                continue
            grid = self.loss_grid(prepared[b].size, prediction_size, w.mask_at_target)
            src = upsample_logits(pred_masks[b, query_idx], grid)
            tgt = resize_masks(prepared[b].masks[target_idx], grid)
            per_mask = sigmoid_focal_loss(src, tgt, alpha=w.mask_alpha, gamma=w.mask_gamma, reduction="none")
            focal = focal + per_mask.flatten(1).mean(1).sum()
            dice = dice + dice_loss(src, tgt).sum()
        add("loss_mask", focal / num_boxes, w.mask_focal)
        add("loss_dice", dice / num_boxes, w.mask_dice)

    def _semantic_terms(self, semantic_seg, prepared, add) -> None:
        """Focal (or BCE) + Dice of the semantic map against the union of the instance masks, per image,
        averaged over the images that count (those with the concept, or all with ``semantic_on_absent``)."""
        w = self.weights
        if semantic_seg is None or w.semantic == w.semantic_dice == 0:
            return
        logits = semantic_seg[:, 0]
        prediction_size = tuple(logits.shape[-2:])
        pixel_term = dice = logits.float().sum() * 0.0
        counted = 0
        for b, target in enumerate(prepared):
            if not target.present and not w.semantic_on_absent:
                continue
            counted += 1
            grid = self.loss_grid(target.size, prediction_size, w.semantic_at_target)
            src = upsample_logits(logits[b : b + 1], grid)
            if target.present:
                union = resize_masks(target.masks.bool().any(0, keepdim=True), grid)
            else:
                union = src.new_zeros(src.shape)
            if w.semantic_form == "focal":
                pixels = sigmoid_focal_loss(
                    src, union, alpha=w.semantic_alpha, gamma=w.semantic_gamma, reduction="mean"
                )
            else:
                pixels = F.binary_cross_entropy_with_logits(src, union)
            pixel_term = pixel_term + pixels
            dice = dice + dice_loss(src, union).sum()
        counted = max(counted, 1)
        add("loss_semantic", pixel_term / counted, w.semantic)
        add("loss_semantic_dice", dice / counted, w.semantic_dice)


class DecoderLayerRecorder:
    """Keeps every DETR decoder layer's logits, boxes and presence during a Sam3Model forward.

    Use as a context manager around the forward, then call `layer_outputs()` before the next one:

        with DecoderLayerRecorder(model) as recorder:
            outputs = model(...)
            total, terms = loss(outputs, targets, aux_outputs=recorder.layer_outputs())

    Works on a bare Sam3Model and on wrappers (peft, DDP) because it finds the decoder and scoring
    modules by type.
    """

    def __init__(self, model: nn.Module):
        from transformers.models.sam3.modeling_sam3 import Sam3DetrDecoder, Sam3DotProductScoring

        decoders = [m for m in model.modules() if isinstance(m, Sam3DetrDecoder)]
        scorers = [m for m in model.modules() if isinstance(m, Sam3DotProductScoring)]
        if len(decoders) != 1 or len(scorers) != 1:
            raise ValueError("DecoderLayerRecorder needs a model with one SAM 3 DETR decoder and one scorer")
        self._decoder = decoders[0]
        self._decoder_output: Any = None
        self._scores: torch.Tensor | None = None
        self._handles = [
            self._decoder.register_forward_hook(self._keep_decoder_output),
            scorers[0].register_forward_hook(self._keep_scores),
        ]

    def _keep_decoder_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._decoder_output = output

    def _keep_scores(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._scores = output

    def layer_outputs(self, include_last: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per decoder layer {"pred_logits" (B, Q), "pred_boxes" (B, Q, 4) xyxy, "presence_logits" (B, 1)},
        first layer first; the last layer (what the model returns) only with `include_last`.
        Clears what was recorded, so the graph is not kept alive after the loss."""
        from transformers.models.sam3.modeling_sam3 import inverse_sigmoid

        if self._decoder_output is None or self._scores is None:
            raise RuntimeError("no forward pass was recorded")
        decoded, scores = self._decoder_output, self._scores
        self._decoder_output = self._scores = None
        offsets = self._decoder.box_head(decoded.intermediate_hidden_states)
        boxes = box_cxcywh_to_xyxy((inverse_sigmoid(decoded.reference_boxes) + offsets).sigmoid())
        logits = scores.squeeze(-1)
        n_layers = logits.shape[0] if include_last else logits.shape[0] - 1
        return [
            {"pred_logits": logits[i], "pred_boxes": boxes[i], "presence_logits": decoded.presence_logits[i]}
            for i in range(n_layers)
        ]

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._decoder_output = self._scores = None

    def __enter__(self) -> DecoderLayerRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
