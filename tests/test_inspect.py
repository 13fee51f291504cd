"""Dataset inspection: counts per concept and split, the printed table, the overlay grid PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medsam3.data.dataset import open_dataset
from medsam3.data.inspect import inspect_dataset, pick_grid_samples
from medsam3.data.layouts.readers import clear_caches
from medsam3.errors import DatasetError, InputFileError


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_busi(root):
    rng = np.random.default_rng(1)
    tumor = np.zeros((24, 32), np.uint8)
    tumor[3:9, 3:9] = 255
    second = np.zeros((24, 32), np.uint8)
    second[12:20, 15:25] = 255
    for cls, k, masks in (("benign", 1, [tumor, second]), ("benign", 2, [tumor]), ("malignant", 1, [second]),
                          ("normal", 1, [tumor * 0]), ("normal", 2, [tumor * 0])):  # fmt: skip
        _png(root / cls / f"{cls} ({k}).png", rng.integers(0, 255, (24, 32), dtype=np.uint8))
        for j, mask in enumerate(masks):
            suffix = "_mask" if j == 0 else f"_mask_{j}"
            _png(root / cls / f"{cls} ({k}){suffix}.png", mask)


def test_busi_counts_table_and_grid(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    make_busi(root)
    out = tmp_path / "out" / "grid.png"
    summary = inspect_dataset(tmp_path, out, fractions={"train": 1.0})
    total = summary.total("breast tumor")
    assert (total.images, total.positives, total.negatives, total.instances, total.cases) == (5, 3, 2, 4, 5)
    assert summary.layout == "busi" and summary.samples == 5 and summary.cases == {"train": 5}
    table = str(summary)
    assert "breast tumor  train      5       5             3      2          4" in table
    assert f"sample grid: {out}" in table
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[0] > 256 and picture.shape[1] > 256
    # The first overlay colour (masks are drawn in colour over grey ultrasound) is present.
    coloured = np.abs(picture.astype(int) - picture.mean(axis=2, keepdims=True)).max(axis=2) > 60
    assert coloured.sum() > 500
    assert summary.to_json()["rows"][0]["instances"] == 4


def test_counts_per_split_on_volumes_and_skip_bad(tmp_path):
    root = tmp_path / "Dataset010_Organs"
    rng = np.random.default_rng(2)
    for i in range(6):
        folder = "Ts" if i == 5 else "Tr"
        label = np.zeros((5, 12, 12), np.uint8)
        label[1:3, 2:5, 2:5] = 1
        label[2, 7:10, 7:10] = 1  # a second organ blob on slice 2 only
        label[3, 6:9, 1:4] = 2
        image = rng.normal(0, 1, (5, 12, 12)).astype(np.float32)
        for array, path in (
            (image, f"images{folder}/c{i}_0000.nii.gz"),
            (label, f"labels{folder}/c{i}.nii.gz"),
        ):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(array), str(root / path))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "spleen": 2}}))
    (root / "labelsTr" / "c4.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InputFileError, match=r"labelsTr/c4\.nii\.gz: (not a readable|unreadable)"):
        inspect_dataset(root)
    summary = inspect_dataset(root, skip_bad=True, negatives_fraction=1.0)
    assert len(summary.skipped) == 1 and "c4.nii.gz" in summary.skipped[0].path
    assert "skipped 1 bad file(s)" in str(summary)
    ds = open_dataset(root, skip_bad=True, negatives_fraction=1.0)
    for split in ds.splits:
        n_cases = len(ds.split(split).cases)
        kidney, spleen = summary.row("kidney", split), summary.row("spleen", split)
        # Per case: kidney on slices 1-2 (slice 2 holds 2 blobs), spleen on slice 3; 5 slices each.
        assert (kidney.images, kidney.positives, kidney.negatives, kidney.instances) == (
            5 * n_cases, 2 * n_cases, 3 * n_cases, 3 * n_cases,
        )  # fmt: skip
        assert (spleen.positives, spleen.negatives, spleen.instances) == (n_cases, 4 * n_cases, n_cases)
        assert kidney.cases == n_cases
    assert summary.row("kidney", "test").cases == 1
    assert sum(summary.cases.values()) == 5


def test_grid_selection_and_dataset_object(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    make_busi(root)
    ds = open_dataset(tmp_path)
    chosen = pick_grid_samples(ds, 4)
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert any(ds.refs[i].positive is False for i in chosen)  # an "absent" example is shown early
    assert pick_grid_samples(ds, 4) == chosen  # deterministic
    summary = inspect_dataset(ds, tmp_path / "g.png", grid_size=2)
    assert summary.grid_path == tmp_path / "g.png" and (tmp_path / "g.png").stat().st_size > 0
    with pytest.raises(DatasetError, match="grid size"):
        inspect_dataset(ds, tmp_path / "h.png", grid_size=0)
    assert not (tmp_path / "h.png").exists()


def test_inspection_decodes_images_and_counts_corrupt_ones(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    make_busi(root)
    image = root / "malignant" / "malignant (1).png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # the header still reads; the pixels do not
    assert len(open_dataset(tmp_path)) == 5  # plain indexing reads headers only
    with pytest.raises(InputFileError, match=r"malignant \(1\)\.png: unreadable or corrupt image"):
        inspect_dataset(tmp_path)
    summary = inspect_dataset(tmp_path, tmp_path / "grid.png", skip_bad=True)
    assert summary.samples == 4 and summary.total("breast tumor").instances == 3
    assert [s.path for s in summary.skipped] == [str(image)]
    assert "skipped 1 bad file(s)" in str(summary)
