"""The contracts of the helpers that exist once (issue 11's design debts): boxes, components, IoU,
file suffixes, array -> RGB, prompts, the concept cleaner."""

from __future__ import annotations

import numpy as np
import pytest

from medsam3.data import vocabulary
from medsam3.data.masks import components, label_components, mask_box, mask_iou_matrix, masks_to_boxes
from medsam3.data.windowing import as_rgb_uint8
from medsam3.errors import InputFileError, PromptError
from medsam3.infer.types import Prompt, as_prompts
from medsam3.utils.files import file_suffix, strip_suffix


def test_mask_box_of_an_l_shape_is_tight_in_pixel_edges():
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3] = True  # the L's upright: rows 2..7 of column 3
    mask[7, 3:9] = True  # its foot: columns 3..8 of row 7
    assert mask_box(mask) == (3.0, 2.0, 9.0, 8.0)
    assert mask_box(np.zeros((4, 4), bool)) is None
    boxes = masks_to_boxes(np.stack([mask, np.zeros_like(mask)]))
    assert boxes.dtype == np.float32 and boxes.tolist() == [[3, 2, 9, 8], [0, 0, 0, 0]]


def test_diagonal_pixels_are_one_component_in_2d_and_3d():
    plane = np.eye(4, dtype=bool)  # touching only at corners
    assert label_components(plane)[1] == 1  # 8-connected
    assert len(components(plane)) == 1
    cube = np.zeros((3, 3, 3), bool)
    cube[0, 0, 0] = cube[1, 1, 1] = cube[2, 2, 2] = True  # touching only at vertices
    assert label_components(cube)[1] == 1  # 26-connected
    apart = np.zeros((5, 5), bool)
    apart[0, 0] = apart[0, 2] = True
    parts = components(apart)
    assert parts.shape == (2, 5, 5) and parts[0, 0, 0] and parts[1, 0, 2]  # scan order
    assert len(components(apart, min_size=2)) == 0


def test_mask_iou_of_empty_masks_is_zero():
    empty = np.zeros((1, 4, 4), bool)
    full = np.ones((1, 4, 4), bool)
    half = np.zeros((1, 4, 4), bool)
    half[0, :2] = True
    np.testing.assert_array_equal(mask_iou_matrix(empty, empty), [[0.0]])
    np.testing.assert_array_equal(mask_iou_matrix(empty, full), [[0.0]])
    np.testing.assert_allclose(mask_iou_matrix(np.concatenate([full, half]), half), [[0.5], [1.0]])
    assert mask_iou_matrix(empty[:0], full).shape == (0, 1)


def test_file_suffix_keeps_double_endings_whole():
    assert file_suffix("a/Liver_001.NII.GZ") == ".nii.gz"
    assert file_suffix("seg.seg.nrrd") == ".seg.nrrd"
    assert file_suffix("x.tar.gz") == ".gz" and file_suffix("README") == ""
    assert strip_suffix("liver_001.nii.gz") == "liver_001" and strip_suffix("case.seg.nrrd") == "case"
    assert strip_suffix("img.PNG") == "img" and strip_suffix("noext") == "noext"


def test_as_rgb_uint8_for_every_input_kind():
    gray = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(as_rgb_uint8(gray), [[[0, 0, 0], [255, 255, 255]]])
    np.testing.assert_array_equal(as_rgb_uint8(np.array([[True, False]]))[0, :, 0], [255, 0])
    np.testing.assert_array_equal(as_rgb_uint8(np.array([[0.0, 0.5, 1.0]]))[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(as_rgb_uint8(np.array([[0.0, 100.4, 255.0]]))[0, :, 0], [0, 100, 255])
    wide = as_rgb_uint8(np.linspace(-1000, 3000, 200).reshape(10, 20))  # HU-like: stretched, not clipped
    assert wide.min() == 0 and wide.max() == 255 and 100 < np.median(wide) < 155
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert as_rgb_uint8(rgba).shape == (2, 2, 3)
    frozen = np.zeros((2, 2, 3), np.uint8)
    frozen.setflags(write=False)
    assert as_rgb_uint8(frozen).flags.writeable
    with pytest.raises(InputFileError, match="NaN"):
        as_rgb_uint8(np.array([[np.nan, 1.0]]))
    with pytest.raises(InputFileError, match="empty"):
        as_rgb_uint8(np.zeros((0, 3), np.uint8))


def test_as_prompts_takes_strings_and_prompts():
    boxed = Prompt("polyp", boxes=((0, 0, 2, 2),))
    assert as_prompts(["breast  tumor", boxed]) == [Prompt("breast tumor"), boxed]
    with pytest.raises(PromptError, match="no prompt"):
        as_prompts([])


def test_one_cleaner_one_spelling_table_one_word_limit():
    assert vocabulary.clean_phrase("  Breast TUMOUR! ") == "breast tumor"
    assert vocabulary.clean_phrase("grey matter") == "gray matter"
    assert vocabulary.match_key("Liver Tumours") == "liver tumor"
    assert vocabulary.core_phrase(vocabulary.clean_phrase("Please segment the polyp in this image")) == "polyp"
    assert vocabulary.MAX_WORDS == 3
    assert vocabulary.check_phrase("enhancing tumour") == "enhancing tumor"
    with pytest.raises(PromptError, match="at most 3 words"):
        vocabulary.check_phrase("tumor in the breast")
