"""One training/evaluation sample: an image (or slice), one concept phrase, and its instances.

SAM 3 segments *every* instance of a named concept and says whether the concept is present at
all, so a sample carries instance masks (N, H, W) rather than a single semantic mask, and a
sample with N = 0 is a first-class *negative*: it teaches the presence head to say "absent".

Boxes are derived from the masks, never stored separately, so they cannot disagree. They use
pixel-edge coordinates: a mask covering columns 3..7 has x0 = 3 and x1 = 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from medsam3.data.masks import components, masks_to_boxes

InstanceMode = Literal["components", "semantic"]
INSTANCE_MODES: tuple[str, ...] = ("components", "semantic")


@dataclass
class Sample:
    """An image as the model sees it, one concept phrase, and every instance of that concept."""

    image: np.ndarray  # (H, W, 3) uint8
    concept: str
    masks: np.ndarray  # (N, H, W) bool; N = 0 means the concept is absent (negative sample)
    boxes: np.ndarray  # (N, 4) float32, xyxy in pixels (pixel edges)
    case_id: str
    modality: str | None = None
    spacing: tuple[float, float] | None = None  # (row, col) in mm
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_negative(self) -> bool:
        return len(self.masks) == 0

    @property
    def union(self) -> np.ndarray:
        """All instances as one (H, W) bool mask."""
        if len(self.masks) == 0:
            return np.zeros(self.image.shape[:2], dtype=bool)
        return self.masks.any(axis=0)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def empty_masks(height: int, width: int) -> np.ndarray:
    """A (0, H, W) bool stack: the masks of a negative sample."""
    return np.zeros((0, height, width), dtype=bool)


def label_map_to_instances(label_map: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Each distinct non-zero value of an (H, W) instance label map becomes one mask.

    Instance label maps (DSB2018/StarDist style, one id per nucleus) are kept as given: two
    touching nuclei stay two instances, which connected components could not guarantee.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"a label map must be (H, W), got shape {label_map.shape}")
    values, inverse, counts = np.unique(label_map.reshape(-1), return_inverse=True, return_counts=True)
    smallest = max(min_area, 1)
    keep = [i for i, (v, c) in enumerate(zip(values, counts, strict=True)) if v != 0 and c >= smallest]
    if not keep:
        return empty_masks(*label_map.shape)
    inverse = inverse.reshape(label_map.shape)
    return np.stack([inverse == i for i in keep])


def binary_to_instances(
    binary: np.ndarray, mode: InstanceMode = "components", min_area: int = 0
) -> np.ndarray:
    """Turn a semantic (H, W) mask into instances: connected components, or one whole-mask instance."""
    binary = np.asarray(binary, dtype=bool)
    if binary.ndim != 2:
        raise ValueError(f"a binary mask must be (H, W), got shape {binary.shape}")
    if mode == "components":  # 8-connected (medsam3.data.masks)
        return components(binary, min_size=min_area)
    if mode == "semantic":
        if binary.sum() == 0 or binary.sum() < min_area:
            return empty_masks(*binary.shape)
        return binary[None].copy()
    raise ValueError(f"instances must be one of {INSTANCE_MODES}, got {mode!r}")


def drop_small(masks: np.ndarray, min_area: int) -> np.ndarray:
    """Remove masks with fewer than ``min_area`` pixels (and always the empty ones)."""
    masks = np.asarray(masks, dtype=bool)
    if len(masks) == 0:
        return masks
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    return masks[areas >= max(min_area, 1)]


def make_sample(
    image: np.ndarray,
    concept: str,
    masks: np.ndarray,
    case_id: str,
    *,
    modality: str | None = None,
    spacing: tuple[float, float] | None = None,
    source: str = "",
    meta: dict[str, Any] | None = None,
) -> Sample:
    """Build a :class:`Sample`, checking shapes and deriving the boxes from the masks."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape} do not match image {image.shape[:2]}")
    return Sample(
        image=image,
        concept=concept,
        masks=masks,
        boxes=masks_to_boxes(masks),
        case_id=case_id,
        modality=modality,
        spacing=spacing,
        source=source,
        meta=dict(meta or {}),
    )
