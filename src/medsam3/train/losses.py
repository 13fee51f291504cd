"""SAM 3 detection losses for fine-tuning transformers' Sam3Model, which ships without a loss.

Per image the queries are matched one-to-one to the ground-truth instances (HungarianMatcher); then

- classification: IoU-aware BCE (SAM 3's "IABCE"): a matched query's target is the soft score
  p^alpha * IoU^(1 - alpha) (at least 0.01), weighted by pos_weight; unmatched queries are negatives
  down-weighted by p^gamma; averaged over all queries of the batch;
- presence: sigmoid focal form (alpha 0.5, gamma 0, i.e. half a BCE) on the presence logit, target
  "the image has at least one instance"; an absent concept trains presence towards 0;
- boxes: L1 on normalised cxcywh plus 1 - GIoU, matched queries only;
- masks: sigmoid focal (mean over pixels) plus Dice, matched queries only, at the prediction's
  resolution (targets are area-downsampled and thresholded: see `resize_masks`);
- semantic: BCE plus Dice of `semantic_seg` against the union of the instance masks.

Box and mask sums are divided by the number of target boxes in the batch (summed over processes
under torch.distributed, at least 1), as DETR does.

Auxiliary losses: Sam3Model returns only the last decoder layer's logits and boxes. The decoder
itself computes every layer's normalised query states, input reference boxes and presence logits,
and `dot_product_scoring` is called on all layers at once, so `DecoderLayerRecorder` keeps those with
forward hooks and rebuilds each layer's boxes with `detr_decoder.box_head` exactly as the model
does for the last one. Classification, presence and box terms are applied to each earlier layer;
masks are only decoded for the last layer, so there is no auxiliary mask term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from medsam3.train.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, check_xyxy, paired_box_iou_and_giou
from medsam3.train.matcher import HungarianMatcher, Match


@dataclass
class LossWeights:
    """Weights and shape parameters of every term; defaults follow the SAM 3 training recipe.

    The semantic weights (20 / 30) follow another group's SAM 3 medical fine-tune: dense supervision
    converges much faster than matched instance losses when a small model is trained from scratch.
    `one_to_many` scales box and mask terms on SAM 3's top-k auxiliary matching; it is off by default
    because transformers' Sam3Model has no separate one-to-many queries, so these terms land on the
    same queries the one-to-one loss trains (they still give extra localisation signal).
    """

    cls: float = 20.0
    cls_iou_aware: bool = True  # SAM 3's soft targets; False: matched queries target 1 (from scratch)
    cls_pos_weight: float = 10.0
    cls_alpha: float = 0.25
    cls_gamma: float = 2.0
    presence: float = 20.0
    presence_alpha: float = 0.5
    presence_gamma: float = 0.0
    bbox_l1: float = 5.0
    giou: float = 2.0
    mask_focal: float = 200.0
    mask_dice: float = 10.0
    mask_alpha: float = 0.25
    mask_gamma: float = 2.0
    semantic_bce: float = 20.0
    semantic_dice: float = 30.0
    aux: float = 1.0
    one_to_many: float = 0.0
    one_to_many_k: int = 4


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
) -> torch.Tensor:
    """SAM 3's IoU-aware classification loss, averaged over all (B, Q) entries.

    `positive` (B, Q) bool marks matched queries; `positive_iou` (B, Q) their box IoU with the target.
    Positives regress to the detached soft target p^alpha * IoU^(1 - alpha) (floor 0.01), so a query's
    score learns to reflect how well it localises; negatives are BCE towards 0 scaled by p^gamma.
    `query_weight` (B, Q) masks entries out (0) without changing the denominator.
    ``iou_aware=False`` gives matched queries the hard target 1: a network trained from scratch has
    poor boxes for a long time, and soft targets then keep every score low.
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
    return loss.mean()


@torch.no_grad()
def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks (N, H, W) -> float {0, 1} masks (N, h, w) on the prediction's grid.

    Area interpolation gives each output pixel the fraction of it the mask covers; >= 0.5 is inside.
    Losses are computed at the prediction's resolution (288 px for 1008 px input) rather than
    upsampling logits to the label's: that is where the model decides, it is ~12x cheaper per matched
    mask, and the label resize needs no gradient. An instance too small to cover half of any
    output pixel keeps its best-covered pixel, so no target silently becomes empty.
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


def _prepare_targets(targets: Sequence[Mapping[str, Any]], batch: int, device: torch.device) -> list[_Target]:
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for a batch of {batch} predictions")
    prepared = []
    for i, target in enumerate(targets):
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        check_xyxy(boxes, f"target {i} boxes")
        masks = target.get("masks")
        if masks is not None:
            masks = torch.as_tensor(masks, device=device)
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
        prepared.append(_Target(boxes, masks, present))
    return prepared


class Sam3DetectionLoss(nn.Module):
    """Matched detection + mask + presence + semantic loss for Sam3Model outputs.

    `forward(outputs, targets, aux_outputs=None)` returns (total, terms): `total` is the weighted sum
    to backpropagate; `terms` maps each unweighted term ("loss_cls", "loss_presence", "loss_bbox",
    "loss_giou", "loss_mask", "loss_dice", "loss_semantic_bce", "loss_semantic_dice", auxiliary ones
    suffixed "_aux{layer}", one-to-many ones "_o2m") to a detached scalar for logging.

    `outputs` is a Sam3ImageSegmentationOutput or a mapping with pred_logits (B, Q), pred_boxes
    (B, Q, 4) xyxy in [0, 1], pred_masks (B, Q, h, w) logits, presence_logits (B, 1) and
    semantic_seg (B, 1, h', w') logits. `targets` holds one dict per image: "boxes" (N, 4) xyxy in
    [0, 1], "masks" (N, H, W) at any resolution, optional "present" (must equal N > 0).
    `aux_outputs` are earlier decoder layers' outputs from `DecoderLayerRecorder.layer_outputs()`.

    `negatives_in_absent_images`: in an image without the concept all queries are trained as
    negatives (True, default). Meta's trainer instead leaves those queries to the presence head
    (False), since the final score multiplies query and presence probabilities.
    """

    def __init__(
        self,
        weights: LossWeights | None = None,
        matcher: HungarianMatcher | None = None,
        negatives_in_absent_images: bool = True,
    ):
        super().__init__()
        self.weights = weights if weights is not None else LossWeights()
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.negatives_in_absent_images = negatives_in_absent_images

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

        matches = self._detection_terms(outputs, prepared, num_boxes, "", 1.0, add)
        self._mask_terms(_get(outputs, "pred_masks"), prepared, matches, num_boxes, "", 1.0, add)
        self._semantic_terms(_get(outputs, "semantic_seg"), prepared, add)
        for layer, layer_outputs in enumerate(aux_outputs or ()):
            self._detection_terms(layer_outputs, prepared, num_boxes, f"_aux{layer}", w.aux, add)
        if w.one_to_many > 0:
            logits = pred_logits.detach().float()
            presence = _get(outputs, "presence_logits")
            o2m = self.matcher.one_to_many(
                logits,
                pred_boxes.detach().float(),
                [t.boxes for t in prepared],
                None if presence is None else presence.detach(),
                k=w.one_to_many_k,
            )
            self._box_terms(pred_boxes.float(), prepared, o2m, num_boxes, "_o2m", w.one_to_many, add)
            pred_masks = _get(outputs, "pred_masks")
            self._mask_terms(pred_masks, prepared, o2m, num_boxes, "_o2m", w.one_to_many, add)
        total = torch.stack(weighted).sum() if weighted else pred_logits.sum() * 0.0
        return total, terms

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
        if not self.negatives_in_absent_images:
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

    def _mask_terms(self, pred_masks, prepared, matches, num_boxes, suffix, scale, add) -> None:
        if pred_masks is None:
            return
        w = self.weights
        size = tuple(pred_masks.shape[-2:])
        src, tgt = [], []
        for b, (query_idx, target_idx) in enumerate(matches):
            if query_idx.numel() == 0:
                continue
            src.append(pred_masks[b, query_idx].float())
            tgt.append(resize_masks(prepared[b].masks[target_idx], size))
        if src:
            src_all, tgt_all = torch.cat(src), torch.cat(tgt)
            focal = sigmoid_focal_loss(src_all, tgt_all, alpha=w.mask_alpha, gamma=w.mask_gamma, reduction="none")
            focal = focal.flatten(1).mean(1).sum() / num_boxes
            dice = dice_loss(src_all, tgt_all).sum() / num_boxes
        else:
            focal = dice = pred_masks.sum() * 0.0
        add(f"loss_mask{suffix}", focal, scale * w.mask_focal)
        add(f"loss_dice{suffix}", dice, scale * w.mask_dice)

    def _semantic_terms(self, semantic_seg, prepared, add) -> None:
        if semantic_seg is None:
            return
        w = self.weights
        logits = semantic_seg.float()[:, 0]
        size = tuple(logits.shape[-2:])
        union = []
        for target in prepared:
            if target.masks is None or target.masks.shape[0] == 0:
                union.append(logits.new_zeros(size))
            else:
                union.append(resize_masks(target.masks.bool().any(0, keepdim=True), size)[0])
        union_t = torch.stack(union)
        add("loss_semantic_bce", F.binary_cross_entropy_with_logits(logits, union_t), w.semantic_bce)
        add("loss_semantic_dice", dice_loss(logits, union_t).mean(), w.semantic_dice)


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
