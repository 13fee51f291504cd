"""Box conversions and overlap measures for the detection losses.

Sam3Model predicts boxes as xyxy normalised to [0, 1]; the SAM 3 recipe regresses L1 in normalised
cxcywh and uses GIoU on xyxy. Everything here is a pure function over torch tensors, differentiable
where a loss needs it.
"""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou as _pairwise_giou


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> (..., 4) centre x, centre y, width, height."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre x, centre y, width, height -> (..., 4) x1, y1, x2, y2."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def check_xyxy(boxes: torch.Tensor, what: str = "boxes") -> None:
    """Raise ValueError unless `boxes` is (N, 4), finite, with x2 >= x1 and y2 >= y1.

    GIoU is undefined for inverted boxes, so a bad target must fail loudly here rather than
    surface later as a NaN loss.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{what} must have shape (N, 4), got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{what} contain NaN or infinite coordinates")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{what} must be xyxy with x2 >= x1 and y2 >= y1")


def pairwise_generalized_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """GIoU of every box in `boxes_a` (N, 4) against every box in `boxes_b` (M, 4), xyxy -> (N, M)."""
    return _pairwise_giou(boxes_a, boxes_b)


def paired_box_iou_and_giou(
    boxes_a: torch.Tensor, boxes_b: torch.Tensor, eps: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of row i of `boxes_a` with row i of `boxes_b` (both (N, 4) xyxy) -> two (N,) tensors.

    Losses only need the matched pairs, so this is O(N) instead of the O(N^2) pairwise matrix.
    """
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]).clamp(min=0) * (boxes_a[:, 3] - boxes_a[:, 1]).clamp(min=0)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]).clamp(min=0) * (boxes_b[:, 3] - boxes_b[:, 1]).clamp(min=0)
    inter_lo = torch.maximum(boxes_a[:, :2], boxes_b[:, :2])
    inter_hi = torch.minimum(boxes_a[:, 2:], boxes_b[:, 2:])
    inter_wh = (inter_hi - inter_lo).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    hull_wh = torch.maximum(boxes_a[:, 2:], boxes_b[:, 2:]) - torch.minimum(boxes_a[:, :2], boxes_b[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    giou = iou - (hull - union) / (hull + eps)
    return iou, giou


def masks_to_normalized_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes normalised to [0, 1] around each of `masks` (N, H, W) -> (N, 4).

    Pixel (row r, col c) covers [c, c + 1) x [r, r + 1), so a mask filling the image gives
    (0, 0, 1, 1). An empty mask raises ValueError: it has no box and should not be a target.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}")
    n, height, width = masks.shape
    boxes = torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    for i, mask in enumerate(masks.bool()):
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        if rows.numel() == 0:
            raise ValueError(f"mask {i} is empty, so it has no bounding box")
        boxes[i] = torch.tensor(
            (
                cols[0].item() / width,
                rows[0].item() / height,
                (cols[-1].item() + 1) / width,
                (rows[-1].item() + 1) / height,
            ),
            dtype=torch.float32,
        )
    return boxes
