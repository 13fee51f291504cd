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

from medsam3.data.masks import mask_box
from medsam3.errors import InputFileError

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


def instance_color(index: int) -> Color:
    """Colour of mask/label ``index`` (0-based): ``label_colors(n)[index]`` for any ``n > index``."""
    if index < 0:
        raise ValueError(f"colour index must be >= 0, got {index}")
    return label_colors(index + 1)[index]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 image as a new (H, W, 3) array (:func:`medsam3.data.windowing.as_rgb_uint8`)."""
    from medsam3.data.windowing import as_rgb_uint8

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"overlay/grid take uint8 images, got {image.dtype}")
    try:
        return as_rgb_uint8(image).copy()
    except InputFileError as error:
        raise ValueError(error.problem) from None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _label_font_size(height: int, width: int) -> int:
    """The size of label text on an image of this size: readable after an LLM's downscaling too."""
    return max(11, round(max(height, width) / 30))


def _text_color(color: Color) -> Color:
    """Black or white, whichever contrasts more with ``color`` (WCAG relative luminance)."""

    def linear(v: int) -> float:
        c = v / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(v) for v in color)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else (255, 255, 255)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The inner boundary band of ``mask``, ``width`` pixels thick (the image edge counts as outside)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def deepest_point(mask: np.ndarray) -> tuple[int, int, float]:
    """(x, y, depth): the pixel farthest from the mask's border, and that distance in pixels."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return int(x), int(y), float(distance[y, x])


def label_position(mask: np.ndarray, label_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left (x, y) for a label of (width, height): on the instance where it fits, else just above
    (or below) its box, so a small instance stays visible under its label. Kept inside the image."""
    height, width = mask.shape
    lw, lh = label_size
    x, y, depth = deepest_point(mask)
    if depth >= max(lw, lh):  # the tag covers at most about a quarter of the instance
        left, top = x - lw // 2, y - lh // 2
    else:
        x0, y0, x1, y1 = (int(v) for v in mask_box(mask))
        left = (x0 + x1 - 1) // 2 - lw // 2
        top = y0 - lh - 2
        if top < 0:
            top = y1 + 2
    return int(np.clip(left, 0, max(0, width - lw))), int(np.clip(top, 0, max(0, height - lh)))


def _tag_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int, int, int, int]:
    """(width, height, pad, text offset x, text offset y) of a label tag for ``text``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    return right - left + 2 * pad, bottom - top + 2 * pad, pad, -left, -top


def _draw_tag(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: Color, font) -> None:
    """``text`` on a tag filled with the object's colour, outlined in black, its top-left at ``xy``."""
    w, h, pad, dx, dy = _tag_size(draw, text, font)
    x, y = int(round(xy[0])), int(round(xy[1]))
    draw.rectangle((x, y, x + w - 1, y + h - 1), fill=color, outline=(0, 0, 0))
    draw.text((x + pad + dx, y + pad + dy), text, fill=_text_color(color), font=font)


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
    label_size: int | None = None,
    corner_labels: bool = False,
) -> np.ndarray:
    """Blend each (H, W) bool mask over ``rgb`` in its own colour, with contours, boxes and labels.

    The one renderer of medsam3's pictures (CLI overlays, evaluation grids, video frames, the
    agent's numbered instances): one palette (:func:`label_colors`), one font, one tag style.
    Contours are the masks' inner edges, ``max(1, longest side / 400)`` pixels thick.

    ``boxes`` are xyxy pixels. Box j belongs to mask ``box_masks[j]`` (default: box i to mask i) and
    takes its colour, so several instance boxes can share one prompt's mask. Label i goes at the
    top-left of the first box of mask i, else on mask i at the point farthest from its border when
    the tag fits there, else just above (or below) the mask (:func:`label_position`), so a small
    instance stays visible; ``corner_labels`` stacks the tags in the top-left corner instead
    (zoomed crops, where a tag must not hide the instance); with ``legend`` the labels are listed
    with their colours in the top-left corner, which also shows labels of empty masks.
    ``label_size`` overrides the text size (:func:`_label_font_size`). Returns a new (H, W, 3) uint8
    image.
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
        line = max(1, round(max(height, width) / 400))
        blended = out.astype(np.float32)
        for mask, color in zip(masks, palette[: len(masks)], strict=True):
            region = mask.astype(bool)
            if not region.any():
                continue
            blended[region] = (1.0 - alpha) * blended[region] + alpha * np.asarray(color, np.float32)
            if contour:
                blended[_outline(region, line)] = color
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    if not box_list and not label_list:
        return out
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    thickness = max(1, round(min(height, width) / 256))
    font = _font(label_size or _label_font_size(height, width))
    for box, owner in zip(box_list, owners, strict=True):
        draw.rectangle(box, outline=palette[owner], width=thickness)
    if legend:
        _draw_legend(draw, label_list, palette, font, (width, height))
        return np.asarray(image, dtype=np.uint8).copy()
    stacked = 1
    for i, text in enumerate(label_list):
        if not text:
            continue
        tw, th = _tag_size(draw, str(text), font)[:2]
        if corner_labels:
            _draw_tag(draw, (1, stacked), str(text), palette[i], font)
            stacked += th + 1
            continue
        if i in owners:
            x, y = box_list[owners.index(i)][:2]
            y = y - th if y - th >= 0 else y  # above the box when there is room
            x = min(max(0.0, x), max(0.0, width - tw))
            y = min(max(0.0, y), max(0.0, height - th))
            _draw_tag(draw, (x, y), str(text), palette[i], font)
            continue
        if i < len(masks) and masks[i].any():
            _draw_tag(draw, label_position(masks[i].astype(bool), (tw, th)), str(text), palette[i], font)
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
