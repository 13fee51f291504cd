"""Metrics against values computed by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsam3.data.masks import components, mask_iou_matrix
from medsam3.errors import MedSAM3Error
from medsam3.evaluate.metrics import (
    aggregate_instances,
    balanced_dice,
    dice,
    hd95,
    iou,
    match_instances,
    nsd,
    presence_scores,
    segmentation_scores,
)


def square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_dice_and_iou_by_hand():
    gt = square((10, 10), 2, 6, 2, 6)  # 16 px
    pred = square((10, 10), 2, 6, 2, 4)  # 8 px, all inside
    assert dice(pred, gt) == pytest.approx(2 * 8 / (8 + 16))
    assert iou(pred, gt) == pytest.approx(8 / 16)
    assert dice(gt, gt) == pytest.approx(1.0)


def test_empty_conventions():
    empty = np.zeros((8, 8), dtype=bool)
    full = square((8, 8), 2, 5, 2, 5)
    both = segmentation_scores(empty, empty)
    assert (both.dice, both.iou, both.nsd, both.hd95) == (1.0, 1.0, 1.0, 0.0)
    for pred, gt in ((empty, full), (full, empty)):
        one = segmentation_scores(pred, gt)
        assert (one.dice, one.iou, one.nsd) == (0.0, 0.0, 0.0)
        assert math.isinf(one.hd95)


def test_balanced_dice_weighs_positives_and_negatives_equally():
    # the demo's old validation split: one easy positive (0.96), four negatives answered empty (1.0)
    assert np.mean([0.96, 1, 1, 1, 1]) == pytest.approx(0.992)
    assert balanced_dice([0.96, 1, 1, 1, 1], [True, False, False, False, False]) == pytest.approx(0.98)
    # two positives (0.2, 0.6 -> 0.4), three negatives of which one has a false alarm (2/3)
    score = balanced_dice([0.2, 0.6, 1, 0, 1], [True, True, False, False, False])
    assert score == pytest.approx((0.4 + 2 / 3) / 2)
    assert balanced_dice([0.5, 0.7], [True, True]) == pytest.approx(0.6)  # one group: its mean
    assert balanced_dice([0, 1], [False, False]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        balanced_dice([0.5], [True, False])
    with pytest.raises(ValueError):
        balanced_dice([], [])


def cube_pair():
    """A 4x4x4 cube and the same cube shifted by one voxel along axis 0 (the coarse axis)."""
    gt = np.zeros((10, 10, 10), dtype=bool)
    gt[2:6, 2:6, 2:6] = True
    pred = np.zeros_like(gt)
    pred[3:7, 2:6, 2:6] = True
    return pred, gt


def test_nsd_anisotropic_cube_shift():
    # Boundary = cube minus its eroded core: 64 - 8 = 56 voxels per mask.
    # pred -> gt distances: 36 side voxels at z=3..5 lie on the gt boundary (0);
    # 4 inner voxels of the cap z=3 are 1 in-plane voxel from the gt ring (1 mm);
    # 16 voxels of the cap z=6 are one slice (3 mm) above the gt cap z=5. gt -> pred is symmetric.
    pred, gt = cube_pair()
    spacing = (3.0, 1.0, 1.0)
    assert nsd(pred, gt, 0.5, spacing) == pytest.approx(72 / 112)
    assert nsd(pred, gt, 2.0, spacing) == pytest.approx(80 / 112)
    assert nsd(pred, gt, 3.0, spacing) == pytest.approx(1.0)
    # The same shift on an isotropic 1 mm grid is within 2 mm everywhere.
    assert nsd(pred, gt, 2.0, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    # Spacing along a fine axis does not matter for a shift along the coarse one.
    assert nsd(pred, gt, 2.0, (3.0, 0.5, 0.5)) == pytest.approx(nsd(pred, gt, 2.0, (3.0, 1.0, 1.0)))


def test_hd95_anisotropic_cube_shift():
    # 16 of 56 boundary distances are 3 mm (28.6% > 5%), so the 95th percentile is 3 mm both ways.
    pred, gt = cube_pair()
    assert hd95(pred, gt, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(pred, gt, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert hd95(pred, gt) == pytest.approx(1.0)  # no spacing: voxels
    scores = segmentation_scores(pred, gt, (3.0, 1.0, 1.0), nsd_tolerance=2.0)
    assert scores.dice == pytest.approx(2 * 48 / 128)
    assert scores.iou == pytest.approx(48 / 80)


def test_mismatches_name_the_case():
    a = np.zeros((8, 8), dtype=bool)
    b = np.zeros((8, 9), dtype=bool)
    with pytest.raises(MedSAM3Error, match="case liver_007.*shape"):
        dice(a, b, case="liver_007")
    with pytest.raises(MedSAM3Error, match="case liver_007.*spacing"):
        nsd(a, a, 1.0, (1.0, 1.0), pred_spacing=(2.0, 1.0), case="liver_007")
    with pytest.raises(MedSAM3Error, match="case x.*3 values for a 2D"):
        hd95(a, a, (1.0, 1.0, 1.0), case="x")
    with pytest.raises(MedSAM3Error, match="NaN"):
        dice(np.full((4, 4), np.nan), np.zeros((4, 4)), case="x")


def test_instance_matching_by_hand():
    shape = (20, 20)
    gt = np.stack([square(shape, 0, 4, 0, 4), square(shape, 10, 14, 10, 14), square(shape, 0, 4, 15, 19)])
    pred = np.stack(
        [
            square(shape, 10, 14, 10, 13),  # 12 px inside gt[1] (16 px): IoU 12/16 = 0.75
            square(shape, 0, 4, 0, 4),  # exactly gt[0]: IoU 1
            square(shape, 16, 19, 0, 3),  # nothing there: false positive
            square(shape, 0, 4, 17, 19),  # half of gt[2]: IoU 8/16 = 0.5 -> counts at >= 0.5
        ]
    )
    ious = mask_iou_matrix(pred, gt)
    assert ious[0, 1] == pytest.approx(0.75) and ious[1, 0] == pytest.approx(1.0)
    s = match_instances(pred, gt)
    assert (s.tp, s.fp, s.fn) == (3, 1, 0)
    assert s.precision == pytest.approx(3 / 4) and s.recall == pytest.approx(1.0)
    assert s.f1 == pytest.approx(6 / 7)
    # Dice of the pairs: 2*0.75/1.75, 1, 2*0.5/1.5
    assert s.matched_dice == pytest.approx(np.mean([1.5 / 1.75, 1.0, 1 / 1.5]))
    strict = match_instances(pred, gt, iou_threshold=0.6)
    assert (strict.tp, strict.fp, strict.fn) == (2, 2, 1)


def test_instance_empty_conventions():
    none = np.zeros((0, 6, 6), dtype=bool)
    one = np.ones((1, 6, 6), dtype=bool)
    both = match_instances(none, none)
    assert (both.precision, both.recall, both.f1) == (1.0, 1.0, 1.0) and math.isnan(both.matched_dice)
    missed = match_instances(none, one)
    assert (missed.tp, missed.fn, missed.precision, missed.recall, missed.f1) == (0, 1, 0.0, 0.0, 0.0)
    assert aggregate_instances(3, 1, 0)["f1"] == pytest.approx(6 / 7)


def test_components_full_connectivity():
    m = np.zeros((6, 6), dtype=bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one component
    m[4:6, 4:6] = True
    parts = components(m)
    assert parts.shape == (2, 6, 6)
    assert sorted(int(p.sum()) for p in parts) == [2, 4]
    assert components(m, min_size=3).shape[0] == 1
    assert components(np.zeros((3, 3, 3), bool)).shape == (0, 3, 3, 3)


def test_presence_scores():
    s = presence_scores([0.9, 0.2, 0.6, 0.4, 0.5], [True, False, False, True, True], threshold=0.5)
    assert (s.tp, s.fp, s.tn, s.fn) == (2, 1, 1, 1)
    assert s.accuracy == pytest.approx(3 / 5)
    assert s.sensitivity == pytest.approx(2 / 3) and s.specificity == pytest.approx(1 / 2)
    only_pos = presence_scores([0.9], [True])
    assert math.isnan(only_pos.specificity)
    with pytest.raises(MedSAM3Error, match="2 predicted scores for 1"):
        presence_scores([0.1, 0.2], [True])
