"""Case-level splits: deterministic, stable, respecting given test sets, and never leaking a case."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk

from medsam3.data.dataset import open_dataset
from medsam3.data.splits import (
    DEFAULT_FRACTIONS,
    assign_split,
    check_fractions,
    check_no_leakage,
    find_leaks,
    split_cases,
)
from medsam3.errors import DatasetError


def test_assignment_is_deterministic_and_follows_fractions():
    cases = [f"case_{i:04d}" for i in range(2000)]
    first = split_cases(cases, seed=3)
    assert first == split_cases(list(reversed(cases)), seed=3)
    counts = Counter(first.values())
    for name, share in DEFAULT_FRACTIONS.items():
        assert abs(counts[name] / len(cases) - share) < 0.04, counts  # 4.5 sigma at n=2000
    other_seed = split_cases(cases, seed=4)
    assert sum(first[c] != other_seed[c] for c in cases) > 200


def test_adding_cases_does_not_move_existing_ones():
    old = split_cases([f"c{i}" for i in range(100)], seed=0)
    new = split_cases([f"c{i}" for i in range(300)], seed=0)
    assert all(new[c] == s for c, s in old.items())


def test_fixed_test_set_is_kept_and_not_duplicated():
    cases = [f"tr{i}" for i in range(500)] + ["ts0", "ts1"]
    chosen = split_cases(cases, fixed={"ts0": "test", "ts1": "test"}, seed=0)
    assert chosen["ts0"] == chosen["ts1"] == "test"
    assert {chosen[f"tr{i}"] for i in range(500)} == {"train", "val"}  # no hashed second test set
    assert Counter(chosen.values())["val"] == pytest.approx(500 * 0.1 / 0.9, abs=25)


def test_fraction_checks():
    assert check_fractions({"train": 0.7, "val": 0.3}) == {"train": 0.7, "val": 0.3, "test": 0.0}
    with pytest.raises(DatasetError, match="sum to 1"):
        check_fractions({"train": 0.7, "val": 0.1})
    with pytest.raises(DatasetError, match="unknown split"):
        check_fractions({"train": 0.9, "holdout": 0.1})
    assert assign_split("x", fractions={"train": 1.0}) == "train"


def test_leak_detection():
    assert find_leaks([("a", "train"), ("a", "train"), ("b", "val")]) == {}
    assert find_leaks([("a", "train"), ("a", "test")]) == {"a": {"train", "test"}}
    with pytest.raises(DatasetError, match="more than one split"):
        check_no_leakage([("a", "train"), ("b", "val"), ("a", "test")])


def _write(array: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(image, str(path))


def test_volume_slices_never_straddle_splits(tmp_path):
    """Twenty 3D cases sliced along two axes: every slice of a case lands in its case's split."""
    root = tmp_path / "Dataset500_Organ"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    (root / "labelsTs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(22):
        image = rng.normal(100, 10, (6, 8, 8)).astype(np.float32)
        label = np.zeros((6, 8, 8), np.uint8)
        label[1 + i % 3 : 5, 2:6, 2:6] = 1
        folder = "Ts" if i >= 20 else "Tr"
        _write(image, root / f"images{folder}" / f"organ_{i:03d}_0000.nii.gz")
        _write(label, root / f"labels{folder}" / f"organ_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz", "channel_names": {"0": "MR"}}
        )
    )
    for axis in (0, 2):
        ds = open_dataset(tmp_path, axis=axis, negatives_fraction=1.0)
        split_of = {}
        for ref in ds.refs:
            assert split_of.setdefault(ref.case_id, ref.split) == ref.split
        assert split_of["organ_020"] == split_of["organ_021"] == "test"
        assert {split_of[f"organ_{i:03d}"] for i in range(20)} <= {"train", "val"}
        # The split views partition the samples, and no case appears in two of them.
        parts = {name: ds.split(name) for name in ("train", "val", "test")}
        assert sum(len(p) for p in parts.values()) == len(ds)
        case_sets = [set(p.cases) for p in parts.values()]
        assert not (case_sets[0] & case_sets[1] or case_sets[0] & case_sets[2] or case_sets[1] & case_sets[2])
        assert set(ds.split("test").cases) == {"organ_020", "organ_021"}
        # With negatives_fraction=1 every slice along the axis is a sample.
        assert len(ds.select(cases=["organ_000"])) == (6 if axis == 0 else 8)
    # A different seed moves cases but still never splits one.
    other = open_dataset(tmp_path, seed=7)
    assert all(len({r.split for r in other.refs if r.case_id == c}) == 1 for c in other.cases)
