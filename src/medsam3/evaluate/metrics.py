"""Segmentation metrics: Dice, IoU, NSD, HD95, instance matching and presence accuracy.

Pure functions over numpy boolean masks, 2D ``(H, W)`` or 3D ``(Z, Y, X)``, with the pixel or voxel
spacing in mm (``None`` means 1 per pixel, so distances are in pixels). The overlap and surface
metrics come from MONAI (``monai.metrics``), so numbers match what the field reports; only the
empty-mask cases are decided here, because MONAI answers NaN for them and a benchmark needs a number.

Conventions (tested in ``tests/test_metrics.py``):

===================  ======  =====  =====  ======
case                  Dice    IoU    NSD    HD95
===================  ======  =====  =====  ======
both empty            1       1      1      0
one empty             0       0      0      inf
===================  ======  =====  =====  ======

HD95 of a case where exactly one mask is empty is ``inf`` (not NaN): there is no surface to measure
from, and the distance is unbounded. Summaries report the mean and median of the finite values and
count the ``inf`` cases separately.

NSD (normalised surface Dice, also "surface Dice") is the share of both boundaries that lies within
``tolerance`` of the other boundary; boundary voxels are those removed by one binary erosion (MONAI's
``get_mask_edges``), distances are Euclidean in the units of ``spacing``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice
from scipy.optimize import linear_sum_assignment

from medsam3.data.masks import (
    components,  # noqa: F401 (evaluate/baseline_unet.py imports it from here)
    mask_iou_matrix,
)
from medsam3.errors import MedSAM3Error

Spacing = Sequence[float]


def _label(case: str | None) -> str:
    return f"case {case}" if case else "prediction vs ground truth"


def check_spacing(spacing: Spacing | None, ndim: int, *, case: str | None = None) -> tuple[float, ...]:
    """Return ``spacing`` as a tuple of ``ndim`` positive floats (1.0 each when ``None``)."""
    if spacing is None:
        return (1.0,) * ndim
    try:
        values = tuple(float(v) for v in spacing)
    except TypeError:
        values = (float(spacing),) * ndim  # type: ignore[arg-type]
    if len(values) != ndim:
        raise MedSAM3Error(f"{_label(case)}: spacing {values} has {len(values)} values for a {ndim}D mask")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise MedSAM3Error(f"{_label(case)}: spacing {values} must be positive and finite")
    return values


def check_pair(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Spacing | None = None,
    *,
    pred_spacing: Spacing | None = None,
    case: str | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Validate a prediction / ground-truth pair; return them as bool arrays and the spacing.

    Refuses masks of different shapes, masks that are not 2D or 3D, and (when the prediction's own
    spacing is given) a prediction on another grid than the ground truth.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise MedSAM3Error(
            f"{_label(case)}: prediction shape {pred.shape} differs from ground truth {gt.shape}"
        )
    if gt.ndim not in (2, 3):
        raise MedSAM3Error(f"{_label(case)}: masks must be 2D or 3D, got shape {gt.shape}")
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise MedSAM3Error(f"{_label(case)}: {name} mask contains NaN or inf")
    values = check_spacing(spacing, gt.ndim, case=case)
    if pred_spacing is not None:
        other = check_spacing(pred_spacing, gt.ndim, case=case)
        if not np.allclose(other, values, rtol=1e-3, atol=1e-6):
            raise MedSAM3Error(
                f"{_label(case)}: prediction spacing {other} differs from ground-truth spacing {values}"
            )
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False), values


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """(spatial...) bool -> (1, 2, spatial...) float one-hot, MONAI's input format."""
    fg = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return torch.cat([1.0 - fg, fg], dim=1)


def _empty_case(pred: np.ndarray, gt: np.ndarray, both: float, one: float) -> float | None:
    """The conventional value when a mask is empty, else ``None`` (compute it)."""
    p, g = bool(pred.any()), bool(gt.any())
    if not p and not g:
        return both
    if p != g:
        return one
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence MONAI's own deprecation notice about an argument it passes to itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        yield


def dice(pred: np.ndarray, gt: np.ndarray, *, case: str | None = None) -> float:
    """Dice coefficient 2|P∩G| / (|P|+|G|) (MONAI ``compute_dice``); 1 when both are empty."""
    pred, gt, _ = check_pair(pred, gt, case=case)
    fixed = _empty_case(pred, gt, 1.0, 0.0)
    if fixed is not None:
        return fixed
    return float(compute_dice(_one_hot(pred), _one_hot(gt), include_background=False)[0, 0])


def balanced_dice(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Mean Dice over the samples holding the concept and the share of samples without it answered
    empty (their Dice: 1 or 0), weighed equally; either alone when the other group is missing.

    Why: the plain mean over a validation split of one large positive and four negatives is ~0.99
    for a model that misses the small positives a test split is full of (the demo's spleen split);
    weighing each group equally keeps "say nothing" from choosing checkpoints and mask sources.
    """
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores for {len(positive)} positive flags")
    if not scores:
        raise ValueError("balanced_dice of no samples")
    groups = [
        [s for s, p in zip(scores, positive, strict=True) if p],
        [s for s, p in zip(scores, positive, strict=True) if not p],
    ]
    return float(np.mean([np.mean(g) for g in groups if g]))


def iou(pred: np.ndarray, gt: np.ndarray, *, case: str | None = None) -> float:
    """Intersection over union (Jaccard, MONAI ``compute_iou``); 1 when both are empty."""
    pred, gt, _ = check_pair(pred, gt, case=case)
    fixed = _empty_case(pred, gt, 1.0, 0.0)
    if fixed is not None:
        return fixed
    return float(compute_iou(_one_hot(pred), _one_hot(gt), include_background=False)[0, 0])


def nsd(
    pred: np.ndarray,
    gt: np.ndarray,
    tolerance_mm: float = 2.0,
    spacing: Spacing | None = None,
    *,
    pred_spacing: Spacing | None = None,
    case: str | None = None,
) -> float:
    """Normalised surface Dice at ``tolerance_mm`` in the units of ``spacing`` (MONAI)."""
    pred, gt, spacing = check_pair(pred, gt, spacing, pred_spacing=pred_spacing, case=case)
    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
        raise MedSAM3Error(f"{_label(case)}: NSD tolerance must be >= 0, got {tolerance_mm}")
    fixed = _empty_case(pred, gt, 1.0, 0.0)
    if fixed is not None:
        return fixed
    with _quiet():
        value = compute_surface_dice(
            _one_hot(pred),
            _one_hot(gt),
            [float(tolerance_mm)],
            include_background=False,
            spacing=list(spacing),
        )
    return float(value[0, 0])


def hd95(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Spacing | None = None,
    *,
    pred_spacing: Spacing | None = None,
    case: str | None = None,
) -> float:
    """95th-percentile symmetric Hausdorff distance (MONAI); 0 when both empty, inf when one is."""
    pred, gt, spacing = check_pair(pred, gt, spacing, pred_spacing=pred_spacing, case=case)
    fixed = _empty_case(pred, gt, 0.0, math.inf)
    if fixed is not None:
        return fixed
    with _quiet():
        value = compute_hausdorff_distance(
            _one_hot(pred), _one_hot(gt), include_background=False, percentile=95, spacing=list(spacing)
        )
    return float(value[0, 0])


@dataclass(frozen=True)
class SegmentationScores:
    """Semantic (union-mask) scores of one case."""

    dice: float
    iou: float
    nsd: float
    hd95: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def segmentation_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Spacing | None = None,
    *,
    nsd_tolerance: float = 2.0,
    pred_spacing: Spacing | None = None,
    case: str | None = None,
) -> SegmentationScores:
    """Dice, IoU, NSD and HD95 of one binary prediction against its ground truth."""
    pred, gt, spacing = check_pair(pred, gt, spacing, pred_spacing=pred_spacing, case=case)
    return SegmentationScores(
        dice=dice(pred, gt, case=case),
        iou=iou(pred, gt, case=case),
        nsd=nsd(pred, gt, nsd_tolerance, spacing, case=case),
        hd95=hd95(pred, gt, spacing, case=case),
    )


# ---------------------------------------------------------------- instances


@dataclass(frozen=True)
class InstanceScores:
    """Instance-level agreement: one-to-one Hungarian matching on IoU, a match counts at IoU >= threshold.

    Conventions: with no instances on either side precision, recall and F1 are 1; with predictions
    but no ground truth (or the reverse) the undefined ratio is 0. ``matched_dice`` is the mean Dice
    of the matched pairs (NaN when there are none).
    """

    n_pred: int
    n_gt: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    matched_dice: float
    matched_iou: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _ratios(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    n_pred, n_gt = tp + fp, tp + fn
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0, 1.0
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return precision, recall, f1


def match_instances(
    pred_masks: np.ndarray,
    gt_masks: np.ndarray,
    *,
    iou_threshold: float = 0.5,
    case: str | None = None,
) -> InstanceScores:
    """Match predicted to ground-truth instances (``(N, *spatial)`` bool stacks) by IoU, Hungarian."""
    pred_masks = np.asarray(pred_masks, dtype=bool)
    gt_masks = np.asarray(gt_masks, dtype=bool)
    if pred_masks.shape[1:] != gt_masks.shape[1:]:
        raise MedSAM3Error(
            f"{_label(case)}: predicted instances of shape {pred_masks.shape[1:]}"
            f" vs ground truth {gt_masks.shape[1:]}"
        )
    ious = mask_iou_matrix(pred_masks, gt_masks)
    tp_pairs: list[tuple[int, int]] = []
    if ious.size:
        rows, cols = linear_sum_assignment(ious, maximize=True)
        tp_pairs = [(r, c) for r, c in zip(rows, cols, strict=True) if ious[r, c] >= iou_threshold]
    tp = len(tp_pairs)
    fp, fn = len(pred_masks) - tp, len(gt_masks) - tp
    precision, recall, f1 = _ratios(tp, fp, fn)
    if tp:
        matched_iou = float(np.mean([ious[r, c] for r, c in tp_pairs]))
        matched_dice = float(np.mean([2 * ious[r, c] / (1 + ious[r, c]) for r, c in tp_pairs]))
    else:
        matched_iou = matched_dice = math.nan
    return InstanceScores(
        n_pred=len(pred_masks),
        n_gt=len(gt_masks),
        tp=tp,
        fp=fp,
        fn=fn,
        precision=precision,
        recall=recall,
        f1=f1,
        matched_dice=matched_dice,
        matched_iou=matched_iou,
    )


def aggregate_instances(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dataset-level (micro) precision, recall and F1 from summed counts."""
    precision, recall, f1 = _ratios(tp, fp, fn)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


# ---------------------------------------------------------------- presence


@dataclass(frozen=True)
class PresenceScores:
    """Does the model say the concept is there when it is, and absent when it is not?

    ``sensitivity`` is NaN when no case contains the concept, ``specificity`` NaN when every case does.
    """

    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    sensitivity: float
    specificity: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def presence_scores(
    predicted: Sequence[float] | np.ndarray,
    present: Sequence[bool] | np.ndarray,
    *,
    threshold: float = 0.5,
) -> PresenceScores:
    """Presence accuracy: predicted presence score >= ``threshold`` vs concept present in the ground truth."""
    scores = np.asarray(predicted, dtype=np.float64).reshape(-1)
    truth = np.asarray(present, dtype=bool).reshape(-1)
    if scores.shape != truth.shape:
        raise MedSAM3Error(f"presence: {scores.size} predicted scores for {truth.size} ground-truth cases")
    if np.isnan(scores).any():
        raise MedSAM3Error("presence: a predicted presence score is NaN")
    said = scores >= threshold
    tp = int(np.sum(said & truth))
    fp = int(np.sum(said & ~truth))
    tn = int(np.sum(~said & ~truth))
    fn = int(np.sum(~said & truth))
    n = int(truth.size)
    return PresenceScores(
        n=n,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=(tp + tn) / n if n else math.nan,
        sensitivity=tp / (tp + fn) if tp + fn else math.nan,
        specificity=tn / (tn + fp) if tn + fp else math.nan,
    )
