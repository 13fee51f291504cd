"""Few-shot task folders: labels stay on the template's brain, splits follow the kept labels (offline)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medsam3.data.fewshot_sets import TASKS, inside_brain, task_sets


def _template_and_overhanging_label() -> tuple[np.ndarray, np.ndarray]:
    """A brain-extracted 'template' (0 outside a block) and a label that overhangs it on top."""
    t1 = np.zeros((40, 24, 20), np.float32)
    t1[4:30, 4:20, 4:16] = 100.0  # brain: z 4..29
    labels = np.zeros_like(t1, np.uint8)
    labels[10:36, 6:18, 2:18] = 1  # runs 6 slices above the brain and 2 voxels past each side
    return t1, labels


def test_label_voxels_on_black_background_are_dropped():
    t1, labels = _template_and_overhanging_label()
    kept = inside_brain(labels, t1)
    assert kept.dtype == np.uint8
    assert not (kept.astype(bool) & (t1 == 0)).any()
    assert (kept.astype(bool) == (labels.astype(bool) & (t1 > 0))).all()  # nothing inside the brain is lost
    assert kept[30:].sum() == 0 and labels[30:].sum() > 0


def test_every_slice_of_a_task_shows_its_label_on_brain_and_no_slice_is_empty():
    t1, labels = _template_and_overhanging_label()
    image = sitk.GetImageFromArray(t1)
    axial_set, coronal_set = task_sets(TASKS[-1], image, t1, labels)
    indices = [s.info["index"] for s in axial_set.slices]
    assert max(indices) < 30  # the overhang above the brain (z 30..35) gives no slice
    for piece in axial_set.slices + coronal_set.slices:
        assert piece.label.any(), piece.case
        assert not (piece.label.astype(bool) & (piece.image == 0)).any(), piece.case
    assert {s.split for s in axial_set.slices} == {"train", "test"}
    assert {s.split for s in coronal_set.slices} == {"test"}
