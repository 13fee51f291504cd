"""Volumes in (NIfTI, NRRD, MHA, DICOM series) and masks out with the geometry kept exactly."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsam3.data.volume_io import (
    describe_dicom_series,
    list_dicom_series,
    read_volume,
    slice_rgb,
    take_slice,
    write_dicom_seg,
    write_mask,
)
from medsam3.errors import InputFileError, MedSAM3Error

OBLIQUE = (
    math.cos(0.3), -math.sin(0.3), 0.0,
    math.sin(0.3) * math.cos(0.2), math.cos(0.3) * math.cos(0.2), -math.sin(0.2),
    math.sin(0.3) * math.sin(0.2), math.cos(0.3) * math.sin(0.2), math.cos(0.2),
)  # fmt: skip


def _write(path: Path, array: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-12.5, 30.25, 100.0),
           direction=None, compress=False) -> Path:  # fmt: skip
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path), compress)
    return path


def _geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.nrrd", "v.mha"])
def test_read_volume_values_and_geometry(tmp_path, name):
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 30
    path = _write(tmp_path / name, array, direction=OBLIQUE, compress=name.endswith("gz"))
    vol = read_volume(path)
    assert vol.array.dtype == np.float32 and vol.shape == (3, 4, 5)
    np.testing.assert_array_equal(vol.array, array)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))  # (z, y, x)
    assert vol.origin == pytest.approx((-12.5, 30.25, 100.0))
    np.testing.assert_allclose(vol.direction, OBLIQUE, atol=1e-6)
    assert vol.is_oblique and not vol.is_constant and vol.modality is None
    assert vol.slice_spacing(0) == pytest.approx((0.8, 0.7))
    reference = vol.reference
    assert reference.GetSize() == (5, 4, 3) and reference.GetPixelID() == sitk.sitkUInt8
    assert (
        reference.GetSpacing() == tuple(reversed(vol.spacing)) and reference.GetDirection() == vol.direction
    )


@pytest.mark.parametrize("out_name", ["m.nii.gz", "m.nii", "m.nrrd", "m.seg.nrrd"])
def test_write_mask_copies_geometry_exactly(tmp_path, out_name):
    array = np.zeros((4, 6, 5), np.float32)
    src = _write(tmp_path / "ct.nii.gz", array, spacing=(0.6, 0.7, 3.0), direction=OBLIQUE)
    vol = read_volume(src)
    mask = np.zeros((4, 6, 5), np.uint8)
    mask[1:3, 2:4, 1:4] = 1
    mask[3, 0, 0] = 7
    out = write_mask(tmp_path / "out" / out_name, mask, like=vol)
    assert out.exists()
    size, spacing, origin, direction = _geometry(out)
    assert size == (5, 6, 4)
    assert spacing == tuple(reversed(vol.spacing))
    assert origin == vol.origin
    if out_name.endswith(".nii.gz") or out_name.endswith(".nii"):
        assert direction == vol.direction  # header geometry copied bit for bit
        source, written = nib.load(str(src)).header, nib.load(str(out)).header
        for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x", "srow_z"):
            np.testing.assert_array_equal(written[key], source[key])
    else:  # NRRD stores direction x spacing; reading it back divides again (last-bit rounding)
        np.testing.assert_allclose(direction, vol.direction, rtol=0, atol=1e-15)
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)
    assert back.GetPixelID() == sitk.sitkUInt8
    assert sorted(p.name for p in out.parent.iterdir()) == [out_name]  # no temporary left behind


def test_write_mask_bool_labels_and_errors(tmp_path):
    vol = read_volume(_write(tmp_path / "v.nrrd", np.zeros((2, 3, 4), np.int16)))
    mask = np.zeros((2, 3, 4), bool)
    mask[0, 0, 0] = True
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(write_mask(tmp_path / "b.nii.gz", mask, vol))))
    assert back.dtype == np.uint8 and back.sum() == 1
    labels = np.zeros((2, 3, 4), np.int64)
    labels[1, 2, 3] = 1000
    big = sitk.ReadImage(str(write_mask(tmp_path / "l.nrrd", labels, vol)))
    assert big.GetPixelID() == sitk.sitkUInt16 and sitk.GetArrayFromImage(big)[1, 2, 3] == 1000
    with pytest.raises(
        MedSAM3Error, match=r"bad\.nii\.gz: mask shape \(2, 3, 5\) does not match the volume \(2, 3, 4\)"
    ):
        write_mask(tmp_path / "bad.nii.gz", np.zeros((2, 3, 5), np.uint8), vol)
    with pytest.raises(MedSAM3Error, match="bool or integer"):
        write_mask(tmp_path / "f.nii.gz", np.zeros((2, 3, 4), np.float32), vol)
    with pytest.raises(MedSAM3Error, match="labels must be >= 0"):
        write_mask(tmp_path / "n.nii.gz", -np.ones((2, 3, 4), np.int8), vol)
    with pytest.raises(MedSAM3Error, match=r"masks are written as .*not '\.png'"):
        write_mask(tmp_path / "m.png", mask, vol)
    assert not (tmp_path / "bad.nii.gz").exists() and not (tmp_path / "f.nii.gz").exists()


def test_2d_and_singleton_4d_files_become_one_slice_real_4d_refused(tmp_path):
    flat = sitk.GetImageFromArray(np.ones((3, 4), np.float32))
    sitk.WriteImage(flat, str(tmp_path / "flat.nii"))
    assert read_volume(tmp_path / "flat.nii").shape == (1, 3, 4)
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((1, 2, 3, 4), np.float32), isVector=False),
        str(tmp_path / "t1.nii.gz"),
    )
    assert read_volume(tmp_path / "t1.nii.gz").shape == (2, 3, 4)
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((5, 2, 3, 4), np.float32), isVector=False),
        str(tmp_path / "t5.nii.gz"),
    )
    with pytest.raises(InputFileError, match=r"t5\.nii\.gz: is a 4D image \(x,y,z,t size \(4, 3, 2, 5\)\)"):
        read_volume(tmp_path / "t5.nii.gz")
    rgb = sitk.GetImageFromArray(np.zeros((2, 3, 4, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputFileError, match=r"rgb\.nrrd: has 3 values per voxel"):
        read_volume(tmp_path / "rgb.nrrd")


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    array = np.random.default_rng(0).integers(-1000, 1000, (6, 20, 20)).astype(np.int16)
    for name, compress in (("t.nii.gz", True), ("t.nii", False), ("t.nrrd", False)):
        path = _write(tmp_path / name, array, compress=compress)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(
            InputFileError, match=rf"{name.replace('.', '[.]')}: (truncated|unreadable or corrupt)"
        ):
            read_volume(path)
    (tmp_path / "junk.mha").write_text("not a header\n")
    with pytest.raises(InputFileError, match=r"junk\.mha: unreadable or corrupt volume"):
        read_volume(tmp_path / "junk.mha")
    (tmp_path / "junk.nii").write_bytes(b"\0" * 400)
    with pytest.raises(InputFileError, match=r"junk\.nii: not a readable NIfTI"):
        read_volume(tmp_path / "junk.nii")
    (tmp_path / "e.nii.gz").write_bytes(b"")
    with pytest.raises(InputFileError, match=r"e\.nii\.gz: is an empty file"):
        read_volume(tmp_path / "e.nii.gz")
    with pytest.raises(InputFileError, match=r"nothere\.nii: no such file or folder"):
        read_volume(tmp_path / "nothere.nii")
    (tmp_path / "v.vtk").write_text("x")
    with pytest.raises(
        InputFileError, match=r"v\.vtk: unsupported volume format '\.vtk'; supported: \.nii\.gz"
    ):
        read_volume(tmp_path / "v.vtk")
    err = pytest.raises(InputFileError, read_volume, tmp_path / "junk.mha").value
    assert "\n" not in str(err)


def test_constant_volume_loads_and_nan_voxels_are_filled(tmp_path):
    vol = read_volume(_write(tmp_path / "c.nii.gz", np.zeros((2, 3, 4), np.float32)))
    assert vol.is_constant
    assert slice_rgb(vol, 0).max() == 0
    data = np.ones((2, 3, 4), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = -2.0
    with pytest.warns(UserWarning, match=r"n\.nii\.gz: 1 NaN/infinite voxels set to the volume minimum -2"):
        vol = read_volume(_write(tmp_path / "n.nii.gz", data))
    assert vol.array[0, 0, 0] == -2.0
    with pytest.raises(InputFileError, match="every voxel is NaN"):
        read_volume(_write(tmp_path / "a.nii.gz", np.full((2, 3, 4), np.nan, np.float32)))


def test_slice_rgb_windows_ct_and_stretches_mr(tmp_path):
    ct = np.full((3, 10, 10), -1000, np.int16)
    ct[:, 4:6, 4:6] = 40
    vol = read_volume(_write(tmp_path / "ct.nii.gz", ct))
    assert vol.is_ct
    rgb = slice_rgb(vol, 1)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[5, 5, 0] == 128
    assert slice_rgb(vol, 1, window="lung")[5, 5, 0] == round((40 + 1350) / 1500 * 255)
    assert slice_rgb(vol, 2, axis=1).shape == (3, 10, 3)
    mr = np.arange(3 * 10 * 10, dtype=np.float32).reshape(3, 10, 10)
    vol = read_volume(_write(tmp_path / "mr.nrrd", mr))
    assert not vol.is_ct
    rgb = slice_rgb(vol, 0)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255  # per-slice percentile stretch
    with pytest.raises(
        InputFileError, match=r"mr\.nrrd: slice 3 is out of range along axis 0: valid slices are 0\.\.2"
    ):
        slice_rgb(vol, 3)
    with pytest.raises(InputFileError, match="valid slices are 0..9"):
        take_slice(vol.array, -1, 2, vol.path)


# ----------------------------------------------------------------------------- DICOM series


def _series(folder: Path, n: int, *, series_uid: str | None = None, description: str = "AXIAL",
            skip: tuple[int, ...] = (), z0: float = -50.0, dz: float = 2.0) -> str:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    for k in range(n):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.SeriesDescription = description
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "phantom", "Phantom^CT", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber = "", 3
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-10.0, -20.0, z0 + k * dz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.6]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = 4, 5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full((4, 5), 1000 + 10 * k, np.uint16).tobytes()
        ds.save_as(folder / f"{series_uid[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return series_uid


def test_dicom_series_reads_in_hu_with_slice_spacing(tmp_path):
    uid = _series(tmp_path / "s", 4)
    assert list_dicom_series(tmp_path / "s") == [uid]
    vol = read_volume(tmp_path / "s")
    assert vol.shape == (4, 4, 5) and vol.modality == "CT" and vol.is_ct
    np.testing.assert_array_equal(vol.array[:, 0, 0], [-24, -14, -4, 6])  # 1000 + 10k - 1024, sorted by z
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.6))
    assert vol.origin == pytest.approx((-10.0, -20.0, -50.0))
    out = write_mask(tmp_path / "mask.nii.gz", (vol.array > -10).astype(np.uint8), vol)
    size, spacing, origin, direction = _geometry(out)
    assert size == (5, 4, 4)
    np.testing.assert_allclose(spacing, (0.6, 0.5, 2.0), rtol=1e-6)
    np.testing.assert_allclose(origin, vol.origin, atol=1e-5)
    np.testing.assert_allclose(direction, vol.direction, atol=1e-6)


def test_two_series_need_a_uid_and_the_error_lists_them(tmp_path):
    first = _series(tmp_path / "d", 3, description="ARTERIAL")
    second = _series(tmp_path / "d", 5, description="VENOUS")
    with pytest.raises(MedSAM3Error, match="2 DICOM series, choose one by series UID") as info:
        read_volume(tmp_path / "d")
    message = str(info.value)
    assert f"{first} (3 slices, 'ARTERIAL')" in message and f"{second} (5 slices, 'VENOUS')" in message
    assert "\n" not in message
    assert read_volume(tmp_path / "d", series_uid=second).shape == (5, 4, 5)
    infos = {info.uid: info for info in describe_dicom_series(tmp_path / "d")}
    assert (infos[first].slices, infos[first].description, infos[first].modality) == (3, "ARTERIAL", "CT")
    assert infos[second].slices == 5
    with pytest.raises(MedSAM3Error, match=r"no DICOM series with UID 1\.2\.3; found: .*ARTERIAL"):
        read_volume(tmp_path / "d", series_uid="1.2.3")


def test_missing_slice_and_empty_folder_are_refused(tmp_path):
    _series(tmp_path / "gap", 6, skip=(3,))
    with pytest.raises(
        InputFileError, match=r"gap: DICOM series has missing slices: a 4 mm gap after slice 2"
    ):
        read_volume(tmp_path / "gap")
    (tmp_path / "none").mkdir()
    with pytest.raises(InputFileError, match=r"none: no DICOM series found"):
        read_volume(tmp_path / "none")


def test_write_dicom_seg_references_the_series_and_round_trips(tmp_path):
    import highdicom as hd
    import pydicom

    _series(tmp_path / "s", 4)
    vol = read_volume(tmp_path / "s")
    mask = np.zeros(vol.shape, np.uint8)
    mask[1, 1:3, 1:4] = 2
    mask[2, 0, 0] = 5
    out = write_dicom_seg(tmp_path / "seg" / "mask.dcm", mask, vol, {2: "liver", 5: "liver tumor"})
    seg = hd.seg.segread(out)
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["liver", "liver tumor"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in vol.source_files]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], combine_segments=True)
    np.testing.assert_array_equal(back, np.where(mask == 2, 1, np.where(mask == 5, 2, 0)))
    assert sorted(p.name for p in out.parent.iterdir()) == ["mask.dcm"]
    with pytest.raises(MedSAM3Error, match=r"label\(s\) \[5\] have no name"):
        write_dicom_seg(tmp_path / "x.dcm", mask, vol, ["a", "b"])
    with pytest.raises(MedSAM3Error, match="no labels to describe"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros(vol.shape, np.uint8), vol, [])
    nifti = read_volume(_write(tmp_path / "v.nii.gz", np.zeros((2, 3, 4), np.int16)))
    with pytest.raises(MedSAM3Error, match="needs a volume read from a DICOM series folder"):
        write_dicom_seg(tmp_path / "x.dcm", np.ones((2, 3, 4), np.uint8), nifti, ["a"])
    assert not (tmp_path / "x.dcm").exists()
