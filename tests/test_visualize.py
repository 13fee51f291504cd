"""Overlays and grids: exact blend maths, contours, boxes, labels and tiling."""

from __future__ import annotations

import numpy as np
import pytest

from medsam3.visualize import grid, label_colors, overlay


def _image(h: int = 40, w: int = 50, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _square(h: int = 40, w: int = 50, y0: int = 10, y1: int = 30, x0: int = 10, x1: int = 30) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_label_colors_are_distinct_and_stable():
    colors = label_colors(40)
    assert len(set(colors)) == 40
    assert label_colors(3) == colors[:3]
    assert all(0 <= c <= 255 for color in colors for c in color)
    assert label_colors(0) == []
    with pytest.raises(ValueError):
        label_colors(-1)


def test_overlay_blends_inside_colours_contour_and_leaves_outside():
    rgb = _image()
    mask = _square()
    red = (255, 0, 0)
    out = overlay(rgb, [mask], colors=[red], alpha=0.25)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # outside untouched
    np.testing.assert_array_equal(out[20, 20], [139, 75, 75])  # 0.75*100 + 0.25*colour, rounded
    np.testing.assert_array_equal(out[10, 20], red)  # inner boundary in full colour
    np.testing.assert_array_equal(out[29, 29], red)
    np.testing.assert_array_equal(out[9, 20], [100, 100, 100])  # contour stays inside the mask
    plain = overlay(rgb, [mask], colors=[red], alpha=0.25, contour=False)
    np.testing.assert_array_equal(plain[10, 20], [139, 75, 75])
    np.testing.assert_array_equal(rgb, _image())  # input not modified


def test_overlay_masks_get_distinct_default_colours_and_accept_a_stack():
    rgb = _image(value=0)
    a, b = _square(x0=0, x1=20), _square(x0=30, x1=50)
    out = overlay(rgb, np.stack([a, b]), alpha=1.0, contour=False)
    first, second = label_colors(2)
    np.testing.assert_array_equal(out[20, 5], first)
    np.testing.assert_array_equal(out[20, 40], second)
    assert tuple(out[20, 25]) == (0, 0, 0)
    gray = overlay(np.zeros((40, 50), np.uint8), [a], alpha=1.0)
    assert gray.shape == (40, 50, 3)
    empty = overlay(rgb, [np.zeros((40, 50), bool)], labels=["1"])
    np.testing.assert_array_equal(empty, rgb)  # nothing to draw, no label without a place


def test_overlay_boxes_and_labels_are_drawn_in_their_colour():
    rgb = _image(80, 100, value=0)
    green = (0, 255, 0)
    out = overlay(rgb, [], colors=[green], boxes=[[20, 30, 70, 60]])
    np.testing.assert_array_equal(out[45, 20], green)  # left edge
    np.testing.assert_array_equal(out[30, 45], green)  # top edge
    assert tuple(out[45, 45]) == (0, 0, 0)  # inside the box untouched

    mask = _square(80, 100, 20, 60, 30, 70)
    labelled = overlay(rgb, [mask], colors=[(255, 255, 0)], alpha=0.0, contour=False, labels=["7"])
    tag = np.all(labelled == (255, 255, 0), axis=-1)
    ys, xs = np.nonzero(tag)
    assert tag.sum() > 20  # a filled tag around the number
    assert mask[int(ys.mean()), int(xs.mean())]  # centred inside the object
    inside_tag = labelled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(int)
    assert (inside_tag.sum(axis=-1) < 250).any()  # dark (anti-aliased black) text on the yellow tag
    boxed = overlay(rgb, [mask], boxes=[[30, 20, 70, 60]], labels=["tumor 0.91"])
    assert not np.array_equal(boxed[:20], overlay(rgb, [mask], boxes=[[30, 20, 70, 60]])[:20])  # above box


def test_overlay_boxes_grouped_by_mask_and_legend():
    rgb = _image(80, 100, value=0)
    a, b = _square(80, 100, 10, 30, 10, 30), _square(80, 100, 50, 70, 60, 90)
    colors = [(255, 0, 0), (0, 0, 255)]
    boxes = [[10, 10, 30, 30], [60, 50, 90, 70], [40, 5, 50, 15]]
    out = overlay(rgb, [a, b], colors=colors, alpha=0.0, contour=False, boxes=boxes, box_masks=[0, 1, 1])
    np.testing.assert_array_equal(out[20, 10], colors[0])
    np.testing.assert_array_equal(out[60, 60], colors[1])
    np.testing.assert_array_equal(out[5, 45], colors[1])  # third box belongs to the second mask
    with pytest.raises(ValueError, match="box_masks needs one mask index"):
        overlay(rgb, [a, b], boxes=boxes, box_masks=[0, 1])
    shown = overlay(rgb, [a, np.zeros_like(b)], colors=colors, alpha=0.0, contour=False,
                    labels=["polyp (1)", "tumor (0)"], legend=True)  # fmt: skip
    panel = shown[:30, :60]
    assert (np.all(panel == colors[0], axis=-1)).sum() > 4  # swatch of the first label
    assert (np.all(panel == colors[1], axis=-1)).sum() > 4  # the empty mask's label is listed too
    assert (panel.sum(axis=-1) > 600).any()  # white legend text


def test_overlay_rejects_bad_inputs():
    rgb = _image()
    with pytest.raises(ValueError, match=r"mask 0 has shape \(10, 10\), the image is \(40, 50\)"):
        overlay(rgb, [np.zeros((10, 10), bool)])
    with pytest.raises(ValueError, match="1 colours given for 2"):
        overlay(rgb, [_square(), _square()], colors=[(1, 2, 3)])
    with pytest.raises(ValueError, match="uint8"):
        overlay(rgb.astype(np.float32), [])
    with pytest.raises(ValueError, match="alpha"):
        overlay(rgb, [_square()], alpha=1.5)


def test_grid_tiles_resizes_keeps_aspect_and_titles():
    red, blue = _image(20, 20), _image(10, 40)
    red[:] = (255, 0, 0)
    blue[:] = (0, 0, 255)
    out = grid([red, blue, red], ncols=2, pad=2, background=255)
    # tile = largest size (20, 40); 2 rows x 2 cols with 2 px padding
    assert out.shape == (2 * 20 + 3 * 2, 2 * 40 + 3 * 2, 3)
    np.testing.assert_array_equal(out[2 + 10, 2 + 20], (255, 0, 0))  # red centred in its tile
    np.testing.assert_array_equal(out[2 + 10, 2 + 2], (255, 255, 255))  # letterbox, aspect kept
    np.testing.assert_array_equal(out[2 + 10, 44 + 20], (0, 0, 255))  # blue scaled 10x40 -> 10x40
    np.testing.assert_array_equal(out[2 + 2, 44 + 20], (255, 255, 255))
    np.testing.assert_array_equal(out[-3, -3], (255, 255, 255))  # empty fourth cell
    small = grid([red, blue], ncols=1, tile_size=(8, 8), pad=0)
    assert small.shape == (16, 8, 3)
    np.testing.assert_array_equal(small[4, 4], (255, 0, 0))
    titled = grid([red, blue], ncols=2, titles=["a", "a much longer title than fits here"], pad=2)
    assert titled.shape[0] > 20 + 2 * 2 and titled.shape[1] == 2 * 40 + 3 * 2
    band = titled[2 : titled.shape[0] - 22]
    assert (band < 128).any()  # dark title text above the tiles
    assert grid([red] * 5).shape == (2 * 20 + 3 * 4, 3 * 20 + 4 * 4, 3)  # default near-square 3 columns


def test_grid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one image"):
        grid([])
    with pytest.raises(ValueError, match="2 titles for 1 images"):
        grid([_image()], titles=["a", "b"])
    with pytest.raises(ValueError, match="ncols"):
        grid([_image()], ncols=0)
