"""Hungarian matching of SAM 3 queries to ground-truth instances.

DETR-style detectors predict a fixed set of queries; the loss first decides which query answers
which target. The cost is SAM 3's (``BinaryHungarianMatcherV2`` with focal=True; weights from its
model builder): a focal-form classification cost (2.0; alpha 0.25, gamma 2, logs taken with
logsigmoid so that saturated logits stay finite and exact), L1 on normalised cxcywh boxes (5.0) and
negative GIoU (2.0), solved per image with `scipy.optimize.linear_sum_assignment`. Images without
targets get an empty match. Matching is done without gradients.

There is no one-to-many matcher: SAM 3's (top-4 per target, for its duplicated "DAC" queries) needs
decoder queries that transformers' Sam3 decoder does not have (see `medsam3.train.losses`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from medsam3.train.boxes import box_xyxy_to_cxcywh, pairwise_generalized_box_iou

Match = tuple[torch.Tensor, torch.Tensor]
"""(query_idx, target_idx): equal-length int64 tensors; query query_idx[i] answers target target_idx[i]."""


def _empty_match(device: torch.device) -> Match:
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return empty, empty.clone()


class HungarianMatcher:
    """One-to-one assignment of queries to targets, per image.

    `use_presence` (off, as in SAM 3's image model) multiplies each query's probability by the image's
    presence probability in the class cost, as detections are scored at inference
    (score = sigmoid(logit) * sigmoid(presence)).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        use_presence: bool = False,
    ):
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class + cost_bbox + cost_giou == 0:
            raise ValueError("matching costs must be non-negative and not all zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma
        self.use_presence = use_presence

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        target_boxes: torch.Tensor,
        presence_logit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cost (Q, N) of one image: logits (Q,), boxes (Q, 4), targets (N, 4); boxes xyxy in [0, 1]."""
        logits = pred_logits.float()
        log_p = F.logsigmoid(logits)  # log p and log(1 - p), exact where sigmoid saturates
        log_not_p = F.logsigmoid(-logits)
        if self.use_presence and presence_logit is not None:
            log_p = log_p + F.logsigmoid(presence_logit.float().reshape(()))
            # log(1 - p * presence) = log(-expm1(log(p * presence))), floored away from log(0)
            log_not_p = torch.log((-torch.expm1(log_p)).clamp(min=torch.finfo(log_p.dtype).tiny))
        prob = log_p.exp()
        pos = self.alpha * (1 - prob) ** self.gamma * -log_p
        neg = (1 - self.alpha) * prob**self.gamma * -log_not_p
        cost_class = (pos - neg)[:, None]
        pred_boxes = pred_boxes.float()
        target_boxes = target_boxes.float().to(pred_boxes.device)
        cost_bbox = torch.cdist(box_xyxy_to_cxcywh(pred_boxes), box_xyxy_to_cxcywh(target_boxes), p=1)
        cost_giou = -pairwise_generalized_box_iou(pred_boxes, target_boxes)
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    def __call__(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        target_boxes: Sequence[torch.Tensor],
        presence_logits: torch.Tensor | None = None,
    ) -> list[Match]:
        """One-to-one matches per image: logits (B, Q), boxes (B, Q, 4), B target tensors (N_b, 4).

        Each target gets exactly one query while Q >= N; an image with no targets gets an empty match.
        """
        if pred_logits.ndim != 2 or pred_boxes.shape != (*pred_logits.shape, 4):
            raise ValueError(
                f"expected pred_logits (B, Q) and pred_boxes (B, Q, 4), got {tuple(pred_logits.shape)} "
                f"and {tuple(pred_boxes.shape)}"
            )
        if len(target_boxes) != pred_logits.shape[0]:
            raise ValueError(f"{len(target_boxes)} target sets for a batch of {pred_logits.shape[0]}")
        device = pred_logits.device
        matches: list[Match] = []
        for b, targets in enumerate(target_boxes):
            n_targets = targets.shape[0]
            if n_targets == 0:
                matches.append(_empty_match(device))
                continue
            presence = presence_logits[b] if presence_logits is not None else None
            cost = self.cost_matrix(pred_logits[b], pred_boxes[b], targets, presence).cpu().numpy()
            if not np.isfinite(cost).all():
                raise FloatingPointError(
                    "non-finite matching cost: the predictions diverged (try a lower learning rate)"
                )
            query_idx, target_idx = linear_sum_assignment(cost)
            order = np.lexsort((query_idx, target_idx))
            matches.append(
                (
                    torch.as_tensor(query_idx[order], dtype=torch.int64, device=device),
                    torch.as_tensor(target_idx[order], dtype=torch.int64, device=device),
                )
            )
        return matches
