"""Hungarian matcher: hand-computed costs and assignments that are obviously right."""

from __future__ import annotations

import math

import pytest
import torch

from medsam3.train.boxes import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    masks_to_normalized_boxes,
    paired_box_iou_and_giou,
    pairwise_generalized_box_iou,
)
from medsam3.train.matcher import HungarianMatcher


def test_box_conversions_round_trip_and_known_values():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.8]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    assert torch.allclose(cxcywh, torch.tensor([[0.3, 0.5, 0.4, 0.6]]))
    assert torch.allclose(box_cxcywh_to_xyxy(cxcywh), xyxy)


def test_paired_iou_and_giou_match_hand_values_and_torchvision():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.6, 0.6, 0.8, 0.8]])
    iou, giou = paired_box_iou_and_giou(a, b)
    # pair 0: b contains a, IoU = 0.25 / 0.5, hull = union -> GIoU = IoU
    # pair 1: disjoint, union 0.08, hull 0.8 * 0.8 = 0.64 -> GIoU = 0 - (0.64 - 0.08) / 0.64
    assert iou.tolist() == pytest.approx([0.5, 0.0], abs=1e-6)
    assert giou.tolist() == pytest.approx([0.5, -(0.64 - 0.08) / 0.64], abs=1e-6)
    assert torch.allclose(giou, pairwise_generalized_box_iou(a, b).diagonal(), atol=1e-6)


def test_masks_to_normalized_boxes_is_tight():
    masks = torch.zeros(2, 10, 20, dtype=torch.bool)
    masks[0, 2:5, 4:10] = True
    masks[1] = True
    boxes = masks_to_normalized_boxes(masks)
    assert boxes.tolist()[0] == pytest.approx([4 / 20, 2 / 10, 10 / 20, 5 / 10])
    assert boxes.tolist()[1] == pytest.approx([0, 0, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        masks_to_normalized_boxes(torch.zeros(1, 4, 4, dtype=torch.bool))


def test_cost_matrix_matches_hand_computation():
    matcher = HungarianMatcher()  # class 2, L1 5, GIoU 2, alpha .25, gamma 2
    box = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
    cost = matcher.cost_matrix(torch.tensor([0.0]), box, box)
    # p = 0.5: pos = .25 * .25 * ln 2, neg = .75 * .25 * ln 2; identical boxes: L1 0, GIoU 1
    class_cost = 0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2)
    assert cost.item() == pytest.approx(2 * class_cost - 2.0, abs=1e-5)

    shifted = torch.tensor([[0.3, 0.2, 0.7, 0.6]])  # cx moves by 0.1; IoU 0.3 / 0.5, hull = union
    cost = matcher.cost_matrix(torch.tensor([0.0]), shifted, box)
    assert cost.item() == pytest.approx(2 * class_cost + 5 * 0.1 - 2 * 0.6, abs=1e-5)

    with_presence = HungarianMatcher(use_presence=True)
    cost = with_presence.cost_matrix(torch.tensor([0.0]), box, box, presence_logit=torch.tensor([0.0]))
    p = 0.25  # sigmoid(0) * sigmoid(0)
    class_cost = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    assert cost.item() == pytest.approx(2 * class_cost - 2.0, abs=1e-5)


def test_class_cost_is_exact_for_saturated_logits():
    """Logs via logsigmoid: at logit -40, -log p = 40 (log(p + eps) would stop at 18.4); at +40, -log(1 - p) = 40."""
    box = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
    cost = HungarianMatcher().cost_matrix(torch.tensor([-40.0, 40.0]), box.repeat(2, 1), box)
    assert torch.isfinite(cost).all()
    assert cost[0, 0].item() == pytest.approx(2 * (0.25 * 40.0) - 2.0, rel=1e-6)  # neg part ~ e^-80
    assert cost[1, 0].item() == pytest.approx(2 * -(0.75 * 40.0) - 2.0, rel=1e-6)  # pos part ~ e^-80
    with_presence = HungarianMatcher(use_presence=True)
    cost = with_presence.cost_matrix(torch.tensor([40.0]), box, box, presence_logit=torch.tensor([40.0]))
    # p = sigmoid(40)^2, 1 - p ~ 2 e^-40: -log(1 - p) ~ 40 - ln 2
    assert cost.item() == pytest.approx(2 * -(0.75 * (40.0 - math.log(2))) - 2.0, rel=1e-4)


def test_matcher_picks_the_obvious_assignment_per_image():
    targets = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.2, 0.9]])
    boxes = torch.tensor(
        [
            [0.52, 0.5, 0.9, 0.88],  # ~ target 1
            [0.3, 0.3, 0.45, 0.45],  # nothing
            [0.0, 0.62, 0.21, 0.9],  # ~ target 2
            [0.7, 0.0, 0.9, 0.2],  # nothing
            [0.1, 0.12, 0.3, 0.31],  # ~ target 0
        ]
    )
    logits = torch.zeros(2, 5)
    pred_boxes = torch.stack([boxes, boxes.flip(0)])  # image 1: queries in reverse order
    matches = HungarianMatcher()(logits, pred_boxes, [targets, targets[:1]])
    query_idx, target_idx = matches[0]
    assert dict(zip(target_idx.tolist(), query_idx.tolist(), strict=True)) == {0: 4, 1: 0, 2: 2}
    query_idx, target_idx = matches[1]
    assert query_idx.tolist() == [0] and target_idx.tolist() == [0]  # query 4 became query 0


def test_class_cost_breaks_a_tie_between_identical_boxes():
    box = torch.tensor([0.2, 0.2, 0.4, 0.4])
    pred_boxes = box.repeat(1, 3, 1)
    logits = torch.tensor([[-3.0, 4.0, 0.0]])
    (query_idx, target_idx), = HungarianMatcher()(logits, pred_boxes, [box[None]])
    assert query_idx.tolist() == [1] and target_idx.tolist() == [0]


def test_no_targets_gives_an_empty_match():
    (query_idx, target_idx), = HungarianMatcher()(torch.zeros(1, 4), torch.rand(1, 4, 4).sort(-1)[0],
                                                  [torch.zeros(0, 4)])
    assert query_idx.numel() == 0 and target_idx.numel() == 0
    assert query_idx.dtype == torch.int64


def test_more_targets_than_queries_matches_every_query_once():
    targets = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3], [0.5, 0.5, 0.6, 0.6]])
    pred = targets[[2, 0]][None]
    (query_idx, target_idx), = HungarianMatcher()(torch.zeros(1, 2), pred, [targets])
    assert dict(zip(query_idx.tolist(), target_idx.tolist(), strict=True)) == {0: 2, 1: 0}


def test_bad_inputs_fail_clearly():
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="pred_boxes"):
        matcher(torch.zeros(1, 3), torch.zeros(1, 4, 4), [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="target sets"):
        matcher(torch.zeros(2, 3), torch.zeros(2, 3, 4), [torch.zeros(0, 4)])
    with pytest.raises(FloatingPointError, match="diverged"):
        target = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
        matcher(torch.full((1, 2), float("nan")), torch.zeros(1, 2, 4), [target])
    with pytest.raises(ValueError, match="non-negative"):
        HungarianMatcher(cost_class=-1.0)
