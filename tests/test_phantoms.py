"""Phantoms: deterministic, medically plausible intensities, separable instances, nnU-Net files on disk."""

from __future__ import annotations

import json
import time

import av
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.measure import label as components

from medsam3.data.phantoms import KINDS, generate, instance_counts, write_phantom_dataset, write_phantoms
from medsam3.errors import DatasetError

SMALL = {"nuclei": 64, "ultrasound": 64, "ct": 64, "endoscopy": 64, "dermoscopy": 64, "ct3d": 48, "video": 48}


@pytest.mark.parametrize("kind", list(KINDS))
def test_cases_depend_only_on_seed_and_index(kind):
    first = generate(kind, 2, seed=5, size=SMALL[kind])
    again = generate(kind, 3, seed=5, size=SMALL[kind])
    other = generate(kind, 2, seed=6, size=SMALL[kind])
    assert [c.case_id for c in again] == [f"{kind}_000", f"{kind}_001", f"{kind}_002"]
    for a, b in zip(first, again[:2], strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.meta == b.meta
    assert not np.array_equal(first[0].image, other[0].image)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "video"])
def test_label_values_name_concepts_and_instances_stay_apart(kind):
    spec = KINDS[kind]
    for case in generate(kind, 4, seed=1, size=SMALL[kind]):
        assert set(np.unique(case.label)) <= {0, *spec.concepts.values()}
        for value in spec.concepts.values():
            mask = case.label == value
            # Same count under 4- and 8-connectivity: no two instances meet even at a corner.
            assert components(mask, connectivity=1).max() == components(mask, connectivity=mask.ndim).max()


def test_nuclei_fluorescence_counts():
    for case in generate("nuclei", 3, seed=2, size=96):
        image, label = case.image, case.label
        assert image.dtype == np.uint16 and image.max() < 65535
        assert instance_counts(label, KINDS["nuclei"].concepts) == case.meta["placed"]
        background = np.median(image[ndi.binary_dilation(label > 0, iterations=4) == 0])
        nucleus = np.median(image[label == 1])
        offset = case.meta["camera"]["offset_adu"]
        assert offset <= background < offset + 120  # dim background just above the camera offset
        assert nucleus - offset > 5 * (background - offset)
        if (label == 2).any():  # condensed mitotic chromatin is brighter than interphase nuclei
            assert np.median(image[label == 2]) > nucleus


def test_ultrasound_lesions_and_posterior_signs():
    cases = generate("ultrasound", 30, seed=0, size=96)
    lesions = [c.meta["lesions"] for c in cases]
    assert any(not found for found in lesions), "some negatives (no lesion)"
    assert sum("breast tumor" in found for found in lesions) >= 10
    checked = 0
    for case in cases:
        image, label = case.image.astype(float), case.label
        assert case.image.dtype == np.uint8
        for value, darker in ((1, 0.7), (2, 0.3)):
            mask = label == value
            if mask.sum() < 30:
                continue
            ring = (
                ndi.binary_dilation(mask, iterations=4)
                & ~ndi.binary_dilation(mask, iterations=1)
                & (label == 0)
            )
            assert image[mask].mean() < darker * image[ring].mean()
            if case.meta["probe"] == "linear":  # beam runs straight down: compare below vs beside
                rows, cols = np.nonzero(mask)
                below = image[rows.max() + 2 : rows.max() + 12, cols.min() : cols.max() + 1]
                side_cols = np.r_[0 : max(cols.min() - 8, 0), min(cols.max() + 8, 96) : 96]
                beside = image[rows.max() + 2 : rows.max() + 12][:, side_cols]
                if below.size and beside.size:
                    if value == 1:
                        assert below.mean() < beside.mean()  # posterior acoustic shadow
                    else:
                        assert below.mean() > beside.mean()  # posterior enhancement
                    checked += 1
    assert checked >= 3


def test_ct_slices_in_hounsfield_units():
    cases = generate("ct", 12, seed=4, size=96)
    image = np.stack([c.image for c in cases])
    label = np.stack([c.label for c in cases])
    assert image.dtype == np.int16 and image.shape[1] == 1
    assert np.median(image[:, :, :2, :2]) < -950  # air in the corners
    liver = np.median(image[label == 1])
    assert 40 < liver < 130
    assert np.median(image[label == 4]) < liver - 15  # hypodense tumours
    assert image.max() > 500  # bone
    assert (label == 2).any() and (label == 3).any()
    for case in cases:
        thickness, row, col = case.spacing
        assert thickness == 5.0 and row == col and 2.0 < row < 5.0
        assert instance_counts(case.label, KINDS["ct"].concepts)["kidney"] <= 2


def test_ct3d_volumes_are_smooth_across_slices():
    case = generate("ct3d", 1, seed=0, size=64)[0]
    assert case.image.shape == (24, 64, 64) and case.image.dtype == np.int16
    assert case.spacing[0] > case.spacing[1] == case.spacing[2]
    liver = case.label == 1
    overlaps = [
        (liver[k] & liver[k + 1]).sum() / max(min(liver[k].sum(), liver[k + 1].sum()), 1)
        for k in range(23)
        if liver[k].sum() > 20 and liver[k + 1].sum() > 20
    ]
    assert len(overlaps) >= 10 and min(overlaps) > 0.6
    z_kidney = np.nonzero((case.label == 2).any(axis=(1, 2)))[0].mean()
    z_spleen = np.nonzero((case.label == 3).any(axis=(1, 2)))[0].mean()
    assert z_kidney < z_spleen  # kidneys lie below the spleen (slice index grows superiorly)


def test_endoscopy_and_dermoscopy_colours():
    for case in generate("endoscopy", 6, seed=0, size=64):
        rgb = case.image.astype(float)
        wall = rgb[(case.label == 0) & (rgb.sum(-1) > 60)]
        assert wall[:, 0].mean() > wall[:, 1].mean() > 0 and wall[:, 0].mean() > wall[:, 2].mean()
    lesion_darker = 0
    for case in generate("dermoscopy", 6, seed=0, size=64):
        lum = case.image.astype(float).mean(-1)
        skin = (case.label == 0) & (lum > 40)
        lesion_darker += lum[case.label == 1].mean() < lum[skin].mean() - 25
    assert lesion_darker == 6


def test_video_objects_keep_their_ids():
    for case in generate("video", 3, seed=2, size=48):
        frames, labels = case.image, case.label
        assert frames.shape == (12, 48, 48, 3) and labels.shape == (12, 48, 48)
        ids = [int(i) for i in case.meta["objects"]]
        assert ids == list(range(1, len(ids) + 1)) and set(np.unique(labels)) <= {0, *ids}
        for object_id in ids:
            assert (labels[0] == object_id).any()  # every object is in view in the first frame
            centres = [
                ndi.center_of_mass(lab == object_id) for lab in labels if (lab == object_id).sum() > 10
            ]
            steps = np.linalg.norm(np.diff(np.array(centres), axis=0), axis=1)
            assert steps.max() < 8  # smooth motion, no identity swaps
        if len(ids) == 2:
            for lab in labels:
                assert not (ndi.binary_dilation(lab == 1, structure=np.ones((3, 3))) & (lab == 2)).any()


def test_write_nnunet_layout(tmp_path):
    out = write_phantom_dataset(tmp_path / "us", "ultrasound", n=5, seed=1, size=64)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "breast tumor": 1, "breast cyst": 2}
    assert (
        meta["numTraining"] == 4
        and meta["file_ending"] == ".png"
        and meta["channel_names"] == {"0": "ultrasound"}
    )
    assert sorted(p.name for p in (out / "imagesTr").iterdir())[0] == "ultrasound_000_0000.png"
    assert [p.name for p in (out / "labelsTs").iterdir()] == ["ultrasound_004.png"]
    cases = generate("ultrasound", 5, seed=1, size=64)
    for case in cases:
        split = "Tr" if meta["medsam3"]["cases"][case.case_id]["split"] == "train" else "Ts"
        np.testing.assert_array_equal(
            np.array(Image.open(out / f"images{split}/{case.case_id}_0000.png")), case.image
        )
        np.testing.assert_array_equal(
            np.array(Image.open(out / f"labels{split}/{case.case_id}.png")), case.label
        )
        assert meta["medsam3"]["cases"][case.case_id]["instances"] == instance_counts(
            case.label, KINDS["ultrasound"].concepts
        )


def test_write_tiff_and_nifti_keep_dtype_and_spacing(tmp_path):
    out = write_phantom_dataset(tmp_path / "nuc", "nuclei", n=1, seed=0, size=48)
    case = generate("nuclei", 1, seed=0, size=48)[0]
    stored = tifffile.imread(out / "imagesTr" / "nuclei_000_0000.tif")
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, case.image)

    out = write_phantom_dataset(tmp_path / "ct3d", "ct3d", n=2, seed=0, size=32, test_fraction=0.5)
    case = generate("ct3d", 2, seed=0, size=32)[1]
    image = sitk.ReadImage(str(out / "imagesTs" / "ct3d_001_0000.nii.gz"))
    label = sitk.ReadImage(str(out / "labelsTs" / "ct3d_001.nii.gz"))
    np.testing.assert_allclose(image.GetSpacing(), case.spacing[::-1], rtol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), case.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), case.label)


def test_write_video_layout(tmp_path):
    out = write_phantom_dataset(tmp_path / "vid", "video", n=2, seed=0, size=48, test_fraction=0.5)
    meta = json.loads((out / "dataset.json").read_text())
    record = meta["medsam3"]["cases"]["video_001"]
    assert record["split"] == "test" and meta["layout"] == "medsam3-video" and meta["concepts"] == ["polyp"]
    case = generate("video", 2, seed=0, size=48)[1]
    with av.open(str(out / record["video"])) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == case.image.shape
    assert np.abs(decoded.astype(float) - case.image).mean() < 6  # H.264 at high quality
    frames = sorted((out / record["labels"]).iterdir())
    assert [f.name for f in frames[:2]] == ["frame_0000.png", "frame_0001.png"] and len(frames) == 12
    np.testing.assert_array_equal(np.stack([np.array(Image.open(f)) for f in frames]), case.label)
    assert "labels/<case>/frame_XXXX.png" in (out / "README.md").read_text()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="refusing to replace"):
        write_phantom_dataset(precious, "ct", n=1, seed=0, size=32)
    assert (precious / "notes.txt").read_text() == "keep me"
    # An earlier phantom dataset is replaced whole: no stale files survive.
    first = write_phantom_dataset(tmp_path / "ph", "dermoscopy", n=3, seed=0, size=32)
    write_phantom_dataset(first, "dermoscopy", n=1, seed=0, size=32)
    assert sorted(p.name for p in (first / "imagesTr").iterdir()) == ["dermoscopy_000_0000.png"]
    assert not (first / "imagesTs").exists()


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown phantom kind 'mri'.*nuclei"):
        generate("mri", 1)
    with pytest.raises(DatasetError, match="too small"):
        generate("ct", 1, size=8)
    with pytest.raises(DatasetError, match="at least 1"):
        generate("ct", 0)
    with pytest.raises(DatasetError, match="even size"):
        generate("video", 1, size=49)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_all_kinds_twenty_cases_in_seconds(tmp_path):
    start = time.perf_counter()
    folders = write_phantoms(tmp_path, "all", n=20, seed=0)
    elapsed = time.perf_counter() - start
    assert [f.name for f in folders] == list(KINDS)
    assert elapsed < 60, f"{elapsed:.1f} s"
