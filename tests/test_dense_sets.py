"""The dense training sets lite is pretrained on: every non-test slice, never a benchmark test slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsam3.data import dense_sets, real_sets
from medsam3.data.dataset import open_dataset
from medsam3.data.windowing import WINDOW_PRESETS


def test_free_slices_leave_out_exactly_the_test_rule():
    assert dense_sets.free_slices(10, 20) == [10, 11, 13, 14, 15, 17, 18, 19]
    _, test = real_sets.interleave(10, 20)
    assert set(dense_sets.free_slices(10, 20)) | set(test) == set(range(10, 20))


def test_ct_mappings_follow_the_viewer_presets():
    raw = np.array([[-1000.0, -600.0, 40.0, 400.0, 2000.0]], dtype=np.float32)
    out = dense_sets.ct_mappings(raw)
    assert list(out) == list(dense_sets.CT_WINDOWS)
    for name, pixels in out.items():
        center, width = WINDOW_PRESETS[name]
        expected = np.clip((raw - (center - width / 2)) / width, 0, 1) * 255
        np.testing.assert_allclose(pixels, np.rint(expected), atol=1)
    assert out["brain"][0, 2] == 128 and out["lung"][0, 1] == 128  # each window's centre is mid-gray


def _cases(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())["medsam3"]["cases"]


@pytest.fixture(scope="session")
def dense(real_sets_built, tmp_path_factory):
    out, cache, _, _ = real_sets_built
    folders = dense_sets.build_dense_train_sets(tmp_path_factory.mktemp("dense"), cache_dir=cache)
    return out, folders


@pytest.mark.network_pkg
def test_dense_sets_never_hold_a_benchmark_test_slice(dense):
    real, folders = dense
    assert [f.name for f in folders] == list(dense_sets.DENSE_FOLDERS)
    pairs = {
        "dense-mni-tissue": "mni-tissue",
        "dense-mni-tracts": "mni-tracts",
        "dense-radiomics-tumor": "radiomics-tumor",
    }
    for folder in folders:
        assert not any((folder / "imagesTs").iterdir())  # training only
        bench = _cases(real / pairs[folder.name])
        test_positions = {(i["source"], i["index"]) for i in bench.values() if i["split"] == "test"}
        labels = real / pairs[folder.name] / "labelsTr"
        train_positions = {
            (i["source"], i["index"])
            for c, i in bench.items()
            if i["split"] == "train" and np.asarray(Image.open(labels / f"{c}.png")).any()
        }
        cases = _cases(folder)
        axial = {(i["source"], i["index"]) for i in cases.values() if i["view"] == "axial"}
        assert not axial & test_positions, folder.name
        assert train_positions <= axial  # the benchmark's own labelled train slices are all in
        assert len(axial) > 2 * len(train_positions)  # and many more
        assert all(i["view"] in ("axial", "sagittal") for i in cases.values())  # the coronal view stays unseen


@pytest.mark.network_pkg
def test_ct_slices_come_in_every_window_with_the_same_label(dense):
    _, folders = dense
    tumours = next(f for f in folders if f.name == "dense-radiomics-tumor")
    cases = _cases(tumours)
    lung = [c for c, i in cases.items() if c.startswith("lung2_") and i["index"] == 20]
    assert sorted(cases[c]["intensity"] for c in lung) == sorted(dense_sets.CT_WINDOWS)
    images = [np.asarray(Image.open(tumours / "imagesTr" / f"{c}_0000.png")) for c in lung]
    labels = [np.asarray(Image.open(tumours / "labelsTr" / f"{c}.png")) for c in lung]
    assert all(np.array_equal(labels[0], label) for label in labels) and labels[0].any()
    assert len({image.tobytes() for image in images}) == len(images)  # each window is a different picture
    data = open_dataset(tumours, split="train", fractions={"train": 1.0, "val": 0.0, "test": 0.0})
    assert "lung tumor" in data.concepts and len(data) > 0


@pytest.mark.network_pkg
def test_sagittal_slices_are_the_volume_seen_from_the_side(dense):
    _, folders = dense
    tissue = next(f for f in folders if f.name == "dense-mni-tissue")
    axial_file = next(p for p in (tissue / "labelsTr").iterdir() if "stored_axial_z070" in p.name)
    sagittal_file = next(p for p in sorted((tissue / "labelsTr").iterdir()) if "stored_sagittal" in p.name)
    x = int(sagittal_file.stem.split("_x")[1])
    axial = np.asarray(Image.open(axial_file))
    sagittal = np.asarray(Image.open(sagittal_file))
    # axial row y of slice z meets sagittal column y of row (depth - 1 - z): the same voxels
    depth = sagittal.shape[0]
    np.testing.assert_array_equal(axial[:, x], sagittal[depth - 1 - 70, :])


@pytest.mark.network_pkg
def test_window_sets_are_the_tumour_test_slices_under_each_window(real_sets_built, tmp_path):
    from medsam3.data.window_sets import build_window_sets, window_names

    real, cache, _, _ = real_sets_built
    sets = build_window_sets(tmp_path, cache_dir=cache)
    assert list(sets) == window_names()
    bench = _cases(real / "radiomics-tumor")
    tests = {c: i for c, i in bench.items() if i["split"] == "test"}
    for name, folder in sets.items():
        cases = _cases(folder)
        modality = "CT" if name.startswith("ct-") else "MR"
        assert set(cases) == {c for c, i in tests.items() if i["modality"] == modality}, name
        assert not any((folder / "imagesTr").iterdir())
    # the set's own window gives the very slices radiomics-tumor holds; another window other pixels, same labels
    for name in ("ct-lung", "mr-p0.5-99.5", "ct-bone"):
        for case in _cases(sets[name]):
            ours = np.asarray(Image.open(sets[name] / "imagesTs" / f"{case}_0000.png")).astype(int)
            theirs = np.asarray(Image.open(real / "radiomics-tumor" / "imagesTs" / f"{case}_0000.png")).astype(int)
            label = np.asarray(Image.open(sets[name] / "labelsTs" / f"{case}.png"))
            truth = np.asarray(Image.open(real / "radiomics-tumor" / "labelsTs" / f"{case}.png"))
            np.testing.assert_array_equal(label, truth)
            if name == "ct-bone":
                assert np.abs(ours - theirs).max() > 50
            else:
                assert np.abs(ours - theirs).max() <= 1


@pytest.mark.network_pkg
def test_lite_splits_repeat_the_tumours_in_training_only(dense, tmp_path):
    from medsam3.data.phantoms.writer import write_phantom_dataset
    from medsam3.train.recipes import LITE_TRAIN_REPEATS, lite_dense_splits

    real, folders = dense
    phantoms = [write_phantom_dataset(tmp_path / "ct", "ct", n=5, seed=0)]
    splits = lite_dense_splits(folders[0].parent, real, phantoms, exclude={"spleen"})
    tumours = folders[0].parent / "dense-radiomics-tumor"
    for split, copies in (("train", LITE_TRAIN_REPEATS["dense-radiomics-tumor"]), ("val", 1)):
        parts = [refs for dataset, refs in splits[split].parts if Path(dataset.info.root) == tumours]
        assert len(parts) == copies and copies >= 1
        assert all(refs == parts[0] for refs in parts)  # the same samples, seen again
        assert len(splits[split]) == sum(len(refs) for _, refs in splits[split].parts)
    assert all(s.concept != "spleen" for s in (splits["val"][i] for i in range(len(splits["val"]))))
    # a later stage weights the tumours more (train_lite.py --repeat); validation still counts them once
    heavier = lite_dense_splits(folders[0].parent, real, phantoms, exclude={"spleen"}, repeats={tumours.name: 3})
    for split, copies in (("train", 3), ("val", 1)):
        parts = [refs for dataset, refs in heavier[split].parts if Path(dataset.info.root) == tumours]
        assert len(parts) == copies
