"""What the LLM looks at: numbered instance overlays and zoomed crops of small instances.

An MLLM judges a segmentation from a picture, so each instance gets its own colour, an outline and
its number drawn on it (where it is thickest, so the number sits on the instance). Instances too
small to judge at the downscaled size the LLM receives also get an enlarged crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from medsam3.data.masks import mask_box
from medsam3.data.windowing import as_rgb_uint8
from medsam3.visualize import instance_color, overlay


def colour(instance_id: int) -> tuple[int, int, int]:
    """The colour of instance ``instance_id`` (numbered from 1): the renderer's palette."""
    return instance_color(instance_id - 1)


def draw_instances(
    image: np.ndarray,
    masks: np.ndarray,
    ids: list[int],
    *,
    alpha: float = 0.3,
    number_size: int | None = None,
    corner_tag: bool = False,
) -> np.ndarray:
    """The (uint8) image with each mask tinted, outlined in its colour and tagged with its number.

    ``corner_tag`` puts the tags in the top-left corner instead (zoomed crops, where the tag must
    not hide the instance)."""
    return overlay(
        image,
        list(masks),
        colors=[colour(i) for i in ids],
        alpha=alpha,
        labels=[str(i) for i in ids],
        label_size=number_size,
        corner_labels=corner_tag,
    )


def draw_mask(image: np.ndarray, mask: np.ndarray, *, rgb: tuple[int, int, int] = (255, 64, 64)) -> np.ndarray:
    """The final result: one mask tinted and outlined, no numbers."""
    return overlay(image, [mask], colors=[rgb], alpha=0.35)


def zoom_crops(
    image: np.ndarray,
    masks: np.ndarray,
    ids: list[int],
    *,
    small_fraction: float = 0.1,
    crop_side: int = 256,
    max_crops: int = 6,
) -> list[tuple[int, np.ndarray]]:
    """Enlarged crops of the instances whose box spans less than ``small_fraction`` of the image side.

    Each crop shows the instance with twice its size of context, outlined and numbered, upscaled so
    its longest side is ``crop_side``. The smallest instances come first; at most ``max_crops``.
    """
    height, width = masks.shape[1:] if len(masks) else np.asarray(image).shape[:2]
    small = []
    for mask, instance_id in zip(masks, ids, strict=True):
        if not mask.any():
            continue
        x0, y0, x1, y1 = (int(v) for v in mask_box(mask))
        if max(x1 - x0, y1 - y0) < small_fraction * max(height, width):
            small.append((int(mask.sum()), instance_id, mask, (x0, y0, x1, y1)))
    small.sort(key=lambda t: t[0])
    base = as_rgb_uint8(image)
    crops = []
    for _, instance_id, mask, (x0, y0, x1, y1) in small[:max_crops]:
        side = max(x1 - x0, y1 - y0, 16) * 3
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(np.clip(round(cx - side / 2), 0, max(0, width - side)))
        top = int(np.clip(round(cy - side / 2), 0, max(0, height - side)))
        right, bottom = min(width, left + side), min(height, top + side)
        patch = base[top:bottom, left:right]
        patch_mask = mask[top:bottom, left:right]
        scale = crop_side / max(patch.shape[:2])
        size = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
        big = np.asarray(Image.fromarray(patch).resize(size, Image.Resampling.LANCZOS))
        big_mask = np.asarray(Image.fromarray(patch_mask).resize(size, Image.Resampling.NEAREST))
        crops.append(
            (
                instance_id,
                draw_instances(
                    big,
                    big_mask[None],
                    [instance_id],
                    alpha=0.15,
                    number_size=crop_side // 8,
                    corner_tag=True,
                ),
            )
        )
    return crops
