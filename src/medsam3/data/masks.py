"""The one home of the small mask helpers: boxes around masks, connected components, mask IoU.

Conventions, the same for every caller (datasets, inference, tracking, evaluation, the agent):

- Boxes are xyxy in pixel edges: a mask covering columns 3..7 has x0 = 3 and x1 = 8.
- Connected components use *full* connectivity: 8-connected in 2D, 26-connected in 3D (a
  nucleus touching itself only at a corner is one object). A caller that needs another
  reading (the phantoms' face-connectivity check) says so where it labels.
- The IoU of two empty masks is 0: an empty instance matches nothing. (The semantic metrics
  in :mod:`medsam3.evaluate.metrics` score a case with both masks empty as 1; that is a case
  score, not an instance overlap.)
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

Box = tuple[float, float, float, float]


def mask_box(mask: np.ndarray) -> Box | None:
    """The xyxy pixel-edge box around an (H, W) mask, or ``None`` when it is empty."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (pixel edges, float32) around each mask of an (N, H, W) stack.

    An empty mask gets a zero box; callers drop empty masks before this, so that never reaches
    a model.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        box = mask_box(mask)
        if box is not None:
            boxes[i] = box
    return boxes


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count): connected components of a 2D or 3D binary mask, full connectivity.

    ``labels`` numbers the components 1..count in scan order (top-left first); 0 is background.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return labels, int(count)


def components(mask: np.ndarray, *, min_size: int = 1) -> np.ndarray:
    """Connected components (full connectivity) of a binary mask as a ``(K, *spatial)`` bool stack.

    Components smaller than ``min_size`` pixels are dropped (annotation specks); the order is the
    scan order of :func:`label_components`, so it is deterministic.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, count = label_components(mask)
    if count == 0:
        return np.zeros((0, *mask.shape), dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = [k for k in range(1, count + 1) if sizes[k] >= max(min_size, 1)]
    return np.stack([labels == k for k in keep]) if keep else np.zeros((0, *mask.shape), dtype=bool)


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every mask in ``a`` (M, ...) with every mask in ``b`` (N, ...): an (M, N) float64 array.

    Sparse products keep a few hundred nuclei on a large image cheap. Empty masks have IoU 0.
    """
    m, n = len(a), len(b)
    if m == 0 or n == 0:
        return np.zeros((m, n), dtype=np.float64)
    p = sp.csr_matrix(np.asarray(a, dtype=bool).reshape(m, -1).astype(np.float32))
    g = sp.csr_matrix(np.asarray(b, dtype=bool).reshape(n, -1).astype(np.float32))
    inter = np.asarray((p @ g.T).todense(), dtype=np.float64)
    area_a = np.asarray(p.sum(axis=1), dtype=np.float64).reshape(m, 1)
    area_b = np.asarray(g.sum(axis=1), dtype=np.float64).reshape(1, n)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)
