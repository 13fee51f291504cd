"""What the LLM looks at: numbered instance overlays and zoomed crops of small instances.

An MLLM judges a segmentation from a picture, so each instance gets its own colour, an outline and
its number drawn on it (where it is thickest, so the number sits on the instance). Instances too
small to judge at the downscaled size the LLM receives also get an enlarged crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# Distinct, saturated colours that stay visible on grey medical images.
PALETTE = np.array(
    [
        (255, 64, 64), (64, 200, 255), (255, 200, 0), (80, 255, 120), (255, 90, 255),
        (255, 140, 30), (140, 120, 255), (0, 255, 210), (200, 255, 60), (255, 150, 190),
    ],
    dtype=np.uint8,
)  # fmt: skip


def colour(instance_id: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in PALETTE[(instance_id - 1) % len(PALETTE)])


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 for display: grey is repeated, other dtypes are stretched to 0..255 (1st-99th pct)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or 0 in array.shape[:2]:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {array.shape}")
    if array.dtype != np.uint8:
        values = np.nan_to_num(array.astype(np.float32))
        lo, hi = np.percentile(values, [1, 99])
        if hi <= lo:  # (nearly) constant image: use the full range, or show it mid-grey
            lo, hi = float(values.min()), float(values.max())
            if hi <= lo:
                lo, hi = lo - 1.0, lo + 1.0
        array = np.clip((values - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The inner boundary band of ``mask``, ``width`` pixels thick."""
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~eroded


def deepest_point(mask: np.ndarray) -> tuple[int, int, float]:
    """(x, y, depth): the pixel farthest from the mask's border, and that distance in pixels."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return int(x), int(y), float(distance[y, x])


def label_position(mask: np.ndarray, label_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left (x, y) for a label of (width, height): on the instance where it fits, else just above
    (or below) its box, so a small instance stays visible under its number. Kept inside the image."""
    height, width = mask.shape
    lw, lh = label_size
    x, y, depth = deepest_point(mask)
    if depth >= max(lw, lh):  # the tag covers at most about a quarter of the instance
        left, top = x - lw // 2, y - lh // 2
    else:
        ys, xs = np.nonzero(mask)
        left = (int(xs.min()) + int(xs.max())) // 2 - lw // 2
        top = int(ys.min()) - lh - 2
        if top < 0:
            top = int(ys.max()) + 3
    return int(np.clip(left, 0, max(0, width - lw))), int(np.clip(top, 0, max(0, height - lh)))


def _label_box(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int, int, int, int]:
    """(width, height, pad, text offset x, text offset y) of a numbered tag for ``text``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    return right - left + 2 * pad, bottom - top + 2 * pad, pad, -left, -top


def _draw_label(
    draw: ImageDraw.ImageDraw, mask: np.ndarray, instance_id: int, font, at: tuple[int, int] | None = None
) -> None:
    """A tag in the instance's colour with its number in black, at ``at`` or by :func:`label_position`."""
    text = str(instance_id)
    w, h, pad, dx, dy = _label_box(draw, text, font)
    x, y = at if at is not None else label_position(mask, (w, h))
    draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour(instance_id), outline=(0, 0, 0))
    draw.text((x + pad + dx, y + pad + dy), text, fill=(0, 0, 0), font=font)


def draw_instances(
    image: np.ndarray,
    masks: np.ndarray,
    ids: list[int],
    *,
    alpha: float = 0.3,
    number_size: int | None = None,
    corner_tag: bool = False,
) -> np.ndarray:
    """The image with each mask tinted, outlined in its colour and tagged with its number.

    ``corner_tag`` puts a single instance's tag in the top-left corner instead (zoomed crops, where
    the tag must not hide the instance)."""
    rgb = to_display_rgb(image).astype(np.float32)
    height, width = rgb.shape[:2]
    longest = max(height, width)
    line = max(1, round(longest / 400))
    for mask, instance_id in zip(masks, ids, strict=True):
        c = np.array(colour(instance_id), dtype=np.float32)
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * c
        rgb[_outline(mask, line)] = c
    out = Image.fromarray(rgb.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = _font(number_size or max(11, round(longest / 30)))
    for mask, instance_id in zip(masks, ids, strict=True):
        if corner_tag:
            _draw_label(draw, mask, instance_id, font, at=(1, 1))
        elif mask.any():
            _draw_label(draw, mask, instance_id, font)
    return np.asarray(out)


def draw_mask(
    image: np.ndarray, mask: np.ndarray, *, rgb: tuple[int, int, int] = (255, 64, 64)
) -> np.ndarray:
    """The final result: one mask tinted and outlined, no numbers."""
    out = to_display_rgb(image).astype(np.float32)
    c = np.array(rgb, dtype=np.float32)
    out[mask] = 0.65 * out[mask] + 0.35 * c
    out[_outline(mask, max(1, round(max(mask.shape) / 400)))] = c
    return out.round().astype(np.uint8)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty mask, x1/y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


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
        x0, y0, x1, y1 = mask_box(mask)
        if max(x1 - x0, y1 - y0) < small_fraction * max(height, width):
            small.append((int(mask.sum()), instance_id, mask, (x0, y0, x1, y1)))
    small.sort(key=lambda t: t[0])
    base = to_display_rgb(image)
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
