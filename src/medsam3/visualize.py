"""Pictures of results: masks blended over the image with contours, boxes and labels; image grids.

Used for the CLI's overlay PNGs, evaluation grids, the agent's numbered overlays (the agent looks
at these, so labels sit inside each mask where they are easy to read) and dataset inspection.
All functions are pure: they return new uint8 arrays and never modify their inputs.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]

# Saturated colours that stay apart from each other and from gray anatomy; more come from the
# golden-ratio hue walk in :func:`label_colors`.
_BASE_COLORS: tuple[Color, ...] = (
    (255, 64, 64),
    (64, 200, 255),
    (255, 210, 0),
    (60, 220, 90),
    (220, 80, 255),
    (255, 140, 20),
    (0, 230, 200),
    (255, 100, 180),
    (150, 110, 255),
    (170, 255, 60),
)


def label_colors(n: int) -> list[Color]:
    """``n`` distinct RGB colours; the first ten are fixed, so colour i means the same thing everywhere."""
    if n < 0:
        raise ValueError(f"number of colours must be >= 0, got {n}")
    colors = list(_BASE_COLORS[:n])
    hue = 0.11
    while len(colors) < n:
        hue = (hue + 0.618033988749895) % 1.0
        value = 1.0 if (len(colors) // 7) % 2 == 0 else 0.8
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"overlay/grid take uint8 images, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image.copy()
    if image.ndim == 3 and image.shape[-1] == 4:
        return image[..., :3].copy()
    raise ValueError(f"expected an (H, W) or (H, W, 3) uint8 image, got shape {image.shape}")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_color(color: Color) -> Color:
    """Black or white, whichever reads better on ``color``."""
    r, g, b = color
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _inside_point(mask: np.ndarray) -> tuple[int, int] | None:
    """(x, y) of the mask pixel farthest from its border: a label there sits inside the object."""
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    distance = distance_transform_edt(crop)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x0 + x - 1), int(y0 + y - 1)


def _draw_label(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    color: Color,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    size: tuple[int, int],
    anchor_center: bool,
) -> None:
    """Text on a small filled tag of the object's colour, kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x, y = xy
    if anchor_center:
        x, y = x - tw / 2, y - th / 2
    else:
        y = y - th if y - th >= 0 else y  # above the box when there is room
    x = min(max(0.0, x), max(0.0, size[0] - tw))
    y = min(max(0.0, y), max(0.0, size[1] - th))
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=color)
    draw.text((x + 2 - left, y + 2 - top), text, fill=_text_color(color), font=font)


def overlay(
    rgb: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    colors: Sequence[Color] | None = None,
    alpha: float = 0.45,
    boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    contour: bool = True,
    box_masks: Sequence[int] | None = None,
    legend: bool = False,
) -> np.ndarray:
    """Blend each (H, W) bool mask over ``rgb`` in its own colour, with contours, boxes and labels.

    ``boxes`` are xyxy pixels. Box j belongs to mask ``box_masks[j]`` (default: box i to mask i) and
    takes its colour, so several instance boxes can share one prompt's mask. Label i goes at the
    top-left of the first box of mask i, else inside mask i (the point farthest from its border);
    with ``legend`` the labels are listed with their colours in the top-left corner instead, which
    also shows labels of empty masks. Returns a new (H, W, 3) uint8 image.
    """
    out = _as_rgb(rgb)
    height, width = out.shape[:2]
    masks = [np.asarray(m) for m in (list(masks) if masks is not None else [])]
    for i, mask in enumerate(masks):
        if mask.shape != (height, width):
            raise ValueError(f"mask {i} has shape {mask.shape}, the image is {(height, width)}")
    box_list = [] if boxes is None else [tuple(float(v) for v in b) for b in np.asarray(boxes).reshape(-1, 4)]
    owners = list(range(len(box_list))) if box_masks is None else [int(i) for i in box_masks]
    if len(owners) != len(box_list) or any(i < 0 for i in owners):
        raise ValueError(
            f"box_masks needs one mask index >= 0 per box: {len(owners)} for {len(box_list)} boxes"
        )
    label_list = list(labels) if labels is not None else []
    count = max([len(masks), len(label_list)] + [i + 1 for i in owners])
    if colors is None:
        palette = label_colors(count)
    else:
        palette = [tuple(int(c) for c in color) for color in colors]
        if len(palette) < count:
            raise ValueError(f"{len(palette)} colours given for {count} masks/boxes/labels")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    if masks:
        from skimage.segmentation import find_boundaries

        blended = out.astype(np.float32)
        for mask, color in zip(masks, palette[: len(masks)], strict=True):
            region = mask.astype(bool)
            if not region.any():
                continue
            blended[region] = (1.0 - alpha) * blended[region] + alpha * np.asarray(color, np.float32)
            if contour:
                edge = find_boundaries(region, mode="inner")
                blended[edge] = color
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    if not box_list and not label_list:
        return out
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    thickness = max(1, round(min(height, width) / 256))
    font = _font(max(10, min(32, round(min(height, width) / 28))))
    for box, owner in zip(box_list, owners, strict=True):
        draw.rectangle(box, outline=palette[owner], width=thickness)
    if legend:
        _draw_legend(draw, label_list, palette, font, (width, height))
        return np.asarray(image, dtype=np.uint8).copy()
    for i, text in enumerate(label_list):
        if not text:
            continue
        if i in owners:
            corner = box_list[owners.index(i)][:2]
            _draw_label(draw, corner, str(text), palette[i], font, (width, height), anchor_center=False)
            continue
        point = _inside_point(masks[i].astype(bool)) if i < len(masks) else None
        if point is not None:
            _draw_label(draw, point, str(text), palette[i], font, (width, height), anchor_center=True)
    return np.asarray(image, dtype=np.uint8).copy()


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    labels: Sequence[str],
    palette: Sequence[Color],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    size: tuple[int, int],
) -> None:
    """One row per label: a colour swatch and the text, on a dark panel in the top-left corner."""
    rows = [(str(t), palette[i]) for i, t in enumerate(labels) if t]
    if not rows:
        return
    line = max(
        draw.textbbox((0, 0), t, font=font)[3] - draw.textbbox((0, 0), t, font=font)[1] for t, _ in rows
    )
    line = max(line, 6) + 4
    text_w = max(draw.textlength(t, font=font) for t, _ in rows)
    panel_w = min(size[0] - 1, int(text_w + line + 10))
    panel_h = min(size[1] - 1, line * len(rows) + 4)
    draw.rectangle((0, 0, panel_w, panel_h), fill=(0, 0, 0))
    for row, (text, color) in enumerate(rows):
        top = 2 + row * line
        draw.rectangle((3, top + 2, 3 + line - 6, top + line - 4), fill=color)
        left, up = draw.textbbox((0, 0), text, font=font)[:2]
        draw.text((line + 3 - left, top + 2 - up), text, fill=(255, 255, 255), font=font)


def _fit(image: np.ndarray, tile_h: int, tile_w: int, background: int) -> np.ndarray:
    """Resize keeping the aspect ratio, centred on a background tile of (tile_h, tile_w)."""
    height, width = image.shape[:2]
    scale = min(tile_h / height, tile_w / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    tile = np.full((tile_h, tile_w, 3), background, dtype=np.uint8)
    top, left = (tile_h - new_h) // 2, (tile_w - new_w) // 2
    tile[top : top + new_h, left : left + new_w] = image
    return tile


def grid(
    images: Sequence[np.ndarray],
    ncols: int | None = None,
    titles: Sequence[str] | None = None,
    tile_size: tuple[int, int] | None = None,
    pad: int = 4,
    background: int = 255,
) -> np.ndarray:
    """Tile uint8 images into one picture, ``ncols`` per row (default: a near-square layout).

    Every image is fitted, aspect kept, into a common tile of ``tile_size`` (H, W), by default the
    largest image's size. Titles, if given, are written above each tile.
    """
    if len(images) == 0:
        raise ValueError("grid needs at least one image")
    tiles = [_as_rgb(image) for image in images]
    if titles is not None and len(titles) != len(tiles):
        raise ValueError(f"{len(titles)} titles for {len(tiles)} images")
    if ncols is None:
        ncols = math.ceil(math.sqrt(len(tiles)))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(tiles))
    nrows = math.ceil(len(tiles) / ncols)
    tile_h, tile_w = tile_size or (max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles))
    font = _font(max(10, min(24, round(tile_w / 20))))
    title_h = 0
    if titles:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        title_h = max(probe.textbbox((0, 0), str(t) or " ", font=font)[3] for t in titles) + 6
    cell_h, cell_w = tile_h + title_h, tile_w
    canvas = np.full(
        (nrows * cell_h + (nrows + 1) * pad, ncols * cell_w + (ncols + 1) * pad, 3),
        background,
        dtype=np.uint8,
    )
    for i, tile in enumerate(tiles):
        row, col = divmod(i, ncols)
        top = pad + row * (cell_h + pad) + title_h
        left = pad + col * (cell_w + pad)
        canvas[top : top + tile_h, left : left + tile_w] = _fit(tile, tile_h, tile_w, background)
    if titles:
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        ink = (0, 0, 0) if background > 127 else (255, 255, 255)
        for i, title in enumerate(titles):
            row, col = divmod(i, ncols)
            text = str(title)
            while text and draw.textlength(text, font=font) > cell_w and len(text) > 1:
                text = text.rstrip("…")[:-1] + "…"
            draw.text(
                (pad + col * (cell_w + pad) + 2, pad + row * (cell_h + pad) + 2), text, fill=ink, font=font
            )
        canvas = np.asarray(image, dtype=np.uint8).copy()
    return canvas
