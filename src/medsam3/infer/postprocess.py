"""From SAM 3's raw detector outputs to instances at the original image size.

Mirrors ``Sam3Processor.post_process_instance_segmentation`` (score = sigmoid(logit) x
sigmoid(presence), bilinear mask resize, threshold) and adds what a user expects: instances sorted
by score, optional non-maximum suppression, the presence score and the semantic map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import nms

from medsam3.infer.types import Prompt, PromptResult


def instance_scores(pred_logits: torch.Tensor, presence_logits: torch.Tensor | None) -> torch.Tensor:
    """SAM 3's instance score: the query's match probability times the concept's presence."""
    scores = pred_logits.sigmoid()
    if presence_logits is not None:
        scores = scores * presence_logits.sigmoid()
    return scores


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, h, w) mask probabilities to (N, H, W), as SAM 3's processor does."""
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *size))
    return F.interpolate(logits.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)


def to_prompt_result(
    prompt: Prompt,
    pred_logits: torch.Tensor,  # (Q,)
    pred_boxes: torch.Tensor,  # (Q, 4) xyxy normalised
    pred_masks: torch.Tensor,  # (Q, h, w) logits
    presence_logit: torch.Tensor | None,  # (1,)
    semantic_logits: torch.Tensor | None,  # (1, h, w)
    original_size: tuple[int, int],
    score_threshold: float,
    mask_threshold: float,
    nms_iou: float | None = None,
) -> PromptResult:
    height, width = original_size
    scores = instance_scores(pred_logits.float(), None if presence_logit is None else presence_logit.float())
    keep = torch.nonzero(scores > score_threshold).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=pred_boxes.device)
    boxes = pred_boxes[keep].float() * scale
    if nms_iou is not None and len(keep) > 1:
        survivors = nms(boxes, scores[keep], nms_iou)  # already sorted by score
        keep, boxes = keep[survivors], boxes[survivors]
    probs = resize_logits(pred_masks[keep].float().sigmoid(), (height, width))
    semantic = None
    if semantic_logits is not None:
        semantic = resize_logits(semantic_logits.float().sigmoid(), (height, width))[0].cpu().numpy()
    presence = float(presence_logit.float().sigmoid()) if presence_logit is not None else float("nan")
    return PromptResult(
        prompt=prompt,
        presence=presence,
        scores=scores[keep].cpu().numpy().astype(np.float32),
        boxes=boxes.cpu().numpy().astype(np.float32),
        masks=(probs > mask_threshold).cpu().numpy(),
        semantic=semantic,
    )
