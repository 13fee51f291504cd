"""2D image reading, windowing maths and PNG writing, on tiny files made with the real writers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medsam3.data.image_io import read_image, save_mask_png, save_png
from medsam3.data.layouts.readers import clear_caches, read_mask_2d
from medsam3.data.windowing import (
    WINDOW_PRESETS,
    WindowError,
    apply_window,
    looks_like_hu,
    parse_window,
    percentile_normalize,
    to_uint8,
)
from medsam3.errors import InputFileError, MedSAM3Error

# ----------------------------------------------------------------------------- windowing


def test_parse_window_presets_numbers_and_errors():
    assert parse_window("abdomen") == (40.0, 400.0)
    assert parse_window("Lung") == (-600.0, 1500.0)
    assert parse_window("soft-tissue") == WINDOW_PRESETS["soft_tissue"]
    assert parse_window("40,400") == (40.0, 400.0)
    assert parse_window("-600, 1500") == (-600.0, 1500.0)
    assert parse_window((50, 350)) == (50.0, 350.0)
    assert parse_window(None) is None
    with pytest.raises(WindowError, match="unknown window 'kidneyish'.*abdomen.*lung.*bone.*brain"):
        parse_window("kidneyish")
    with pytest.raises(MedSAM3Error, match="width must be a positive"):
        parse_window("40,0")
    with pytest.raises(WindowError, match="two numbers"):
        parse_window((1, 2, 3))


def test_apply_window_is_linear_and_clipped():
    raw = np.array([-1000, -160, 40, 240, 3000], dtype=np.float32)
    out = apply_window(raw, 40, 400)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(apply_window(np.array([-600.0]), -600, 1500), [0.5])
    with pytest.raises(WindowError):
        apply_window(raw, 40, 0)


def test_percentile_normalize_ignores_outliers_nan_and_constant():
    raw = np.arange(1000, dtype=np.float32)
    raw[0] = -1e6  # a cold pixel
    raw[1] = np.nan
    out = percentile_normalize(raw, lo=1, hi=99)
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[1] == 0.0  # NaN shown as 0
    assert 0.45 < out[500] < 0.55  # the middle stays in the middle despite the -1e6 pixel
    assert np.all(percentile_normalize(np.full((4, 4), 7.0)) == 0.0)
    # A tiny bright object on a constant background still shows (falls back to min/max).
    spot = np.zeros((20, 20), np.float32)
    spot[3, 3] = 5.0
    assert percentile_normalize(spot)[3, 3] == 1.0
    with pytest.raises(WindowError):
        percentile_normalize(raw, lo=50, hi=10)


def test_looks_like_hu_and_to_uint8():
    ct = np.full((10, 10), -1000.0)
    ct[3:7, 3:7] = 40.0
    assert looks_like_hu(ct)
    assert not looks_like_hu(np.linspace(0, 4000, 100))  # MR-like, non-negative
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0, 2.0])), [0, 128, 255, 255])


# ----------------------------------------------------------------------------- raster and TIFF


def test_png_gray_rgb_rgba_and_palette_keep_8bit_values(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.rgb.shape == (3, 4, 3) and img.rgb.dtype == np.uint8
    np.testing.assert_array_equal(img.rgb[..., 1], gray)
    np.testing.assert_array_equal(img.raw, gray.astype(np.float32))
    assert img.window is None and img.spacing is None and img.path == tmp_path / "g.png"

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png").rgb, rgba[..., :3])

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png").rgb[0, 0], [255, 0, 0])

    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "c.bmp").rgb, rgb)


def test_jpeg_reads_close_to_source(tmp_path):
    rgb = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.JPG", quality=95)
    img = read_image(tmp_path / "x.JPG")
    assert img.rgb.shape == (16, 16, 3)
    assert np.abs(img.rgb.astype(int) - rgb).max() <= 3


def test_16bit_png_is_percentile_stretched_raw_kept(tmp_path):
    values = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    img = read_image(tmp_path / "d.png")
    np.testing.assert_array_equal(img.raw, values.astype(np.float32))
    assert img.rgb[0, 0, 0] == 0 and img.rgb[-1, -1, 0] == 255
    assert np.all(np.diff(img.rgb[..., 0].reshape(-1).astype(int)) >= 0)  # order kept


def test_tiff_8_and_16_bit_gray_and_rgb(tmp_path):
    g8 = np.array([[0, 50], [100, 250]], np.uint8)
    tifffile.imwrite(tmp_path / "g8.tif", g8)
    np.testing.assert_array_equal(read_image(tmp_path / "g8.tif").rgb[..., 2], g8)

    g16 = np.linspace(0, 60000, 400).reshape(20, 20).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g16.tiff", g16)
    img = read_image(tmp_path / "g16.tiff")
    np.testing.assert_array_equal(img.raw, g16.astype(np.float32))
    assert img.rgb[0, 0, 0] == 0 and img.rgb[-1, -1, 0] == 255

    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0] = 1000
    rgb16[..., 2] = 50000
    rgb16[0, 0] = 0
    tifffile.imwrite(tmp_path / "c16.tif", rgb16, photometric="rgb")
    img = read_image(tmp_path / "c16.tif")
    assert img.raw.shape == (4, 4, 3)
    assert tuple(img.rgb[1, 1]) == (5, 0, 255)  # stretched jointly: channel balance kept

    rgba8 = np.zeros((3, 3, 4), np.uint8)
    rgba8[..., :3] = (9, 8, 7)
    tifffile.imwrite(tmp_path / "c8.tif", rgba8, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "c8.tif").rgb[2, 2], [9, 8, 7])

    planar = np.stack([np.full((5, 6), v, np.uint8) for v in (10, 20, 30)])
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif").rgb[4, 5], [10, 20, 30])


def test_explicit_window_applies_to_gray_tiff_and_is_ignored_for_colour(tmp_path):
    hu = np.array([[-1000, -160], [40, 240]], np.int16)
    tifffile.imwrite(tmp_path / "ct.tif", hu)
    img = read_image(tmp_path / "ct.tif", window="abdomen")
    assert img.window == (40.0, 400.0)
    np.testing.assert_array_equal(img.rgb[..., 0], [[0, 0], [128, 255]])
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match=r"c\.png: a window applies to gray images only"):
        assert read_image(tmp_path / "c.png", window="lung").window is None


def test_tiff_stack_needs_a_slice_and_4d_is_refused(tmp_path):
    stack = np.stack([np.full((4, 5), v, np.uint8) for v in (10, 20, 30)])
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    with pytest.raises(InputFileError, match=r"s\.tif: is a stack of 3 images.*0\.\.2"):
        read_image(tmp_path / "s.tif")
    assert read_image(tmp_path / "s.tif", slice_index=1).rgb[0, 0, 0] == 20
    with pytest.raises(InputFileError, match=r"slice 3 is out of range.*0\.\.2"):
        read_image(tmp_path / "s.tif", slice_index=3)
    tifffile.imwrite(
        tmp_path / "h.tif",
        np.zeros((2, 3, 4, 5), np.uint8),
        photometric="minisblack",
        metadata={"axes": "TZYX"},
    )
    with pytest.raises(InputFileError, match=r"h\.tif: is a 4D TIFF"):
        read_image(tmp_path / "h.tif", slice_index=0)


def test_partial_nan_replaced_by_minimum_with_warning_all_nan_refused(tmp_path):
    data = np.array([[1.0, 2.0], [np.nan, 5.0]], np.float32)
    tifffile.imwrite(tmp_path / "n.tif", data)
    with pytest.warns(UserWarning, match=r"n\.tif: 1 NaN/infinite pixels set to the image minimum 1"):
        img = read_image(tmp_path / "n.tif")
    assert np.isfinite(img.raw).all() and img.raw[1, 0] == 1.0
    tifffile.imwrite(tmp_path / "allnan.tif", np.full((3, 3), np.nan, np.float32))
    with pytest.raises(InputFileError, match=r"allnan\.tif: every pixel is NaN"):
        read_image(tmp_path / "allnan.tif")


# ----------------------------------------------------------------------------- DICOM


def _dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    preamble: bool = True,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelSpacing = [0.5, 0.75]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=preamble)
    return path


def test_dicom_ct_rescale_and_file_window(tmp_path):
    stored = np.array([[0, 1024], [1064, 3000]], np.uint16)  # HU = stored - 1024
    path = _dicom(tmp_path / "ct.dcm", stored, intercept=-1024, window=(40, 400))
    img = read_image(path)
    np.testing.assert_array_equal(img.raw, [[-1024, 0], [40, 1976]])
    assert img.window == (40.0, 400.0) and img.modality == "CT" and img.spacing == (0.5, 0.75)
    np.testing.assert_array_equal(img.rgb[..., 0], [[0, 102], [128, 255]])  # (HU+160)/400*255


def test_dicom_explicit_and_preset_windows_override_the_file(tmp_path):
    stored = np.array([[0, 424], [1024, 2024]], np.int16)
    path = _dicom(tmp_path / "ct.dcm", stored, intercept=-1024, window=(40, 400))
    img = read_image(path, window="lung")  # (-600, 1500): -1350..150
    assert img.window == (-600.0, 1500.0)
    np.testing.assert_array_equal(img.rgb[..., 0], to_uint8(apply_window(img.raw, -600, 1500)))
    assert read_image(path, window=(0, 2000)).rgb[1, 0, 0] == 128  # HU 0 is the centre
    with pytest.raises(WindowError, match="unknown window 'nope'"):
        read_image(path, window="nope")


def test_dicom_ct_without_window_gets_abdomen_mr_gets_percentiles(tmp_path):
    ct = _dicom(tmp_path / "ct.dcm", np.array([[0, 1064]], np.uint16), intercept=-1024)
    img = read_image(ct)
    assert img.window == WINDOW_PRESETS["abdomen"]
    np.testing.assert_array_equal(img.rgb[0, :, 0], [0, 128])
    mr_pixels = np.arange(100, dtype=np.uint16).reshape(10, 10) * 7
    img = read_image(_dicom(tmp_path / "mr.dcm", mr_pixels, modality="MR"))
    assert img.window is None and img.rgb[0, 0, 0] == 0 and img.rgb[-1, -1, 0] == 255


def test_dicom_monochrome1_is_inverted_and_sniffed_without_extension(tmp_path):
    pixels = np.array([[0, 100]], np.uint16)
    path = _dicom(tmp_path / "IM0001", pixels, modality="CR", window=(50, 100), photometric="MONOCHROME1")
    img = read_image(path)
    np.testing.assert_array_equal(img.rgb[0, :, 0], [255, 0])  # low value shown white


def test_dicom_bad_inputs(tmp_path):
    multi = _dicom(tmp_path / "cine.dcm", np.zeros((3, 4, 4), np.uint16), modality="US", frames=3)
    with pytest.raises(
        InputFileError, match=r"cine\.dcm: is a multi-frame DICOM \(3 frames\).*video or volume"
    ):
        read_image(multi)
    nopix = tmp_path / "nopix.dcm"
    _dicom(nopix, np.zeros((2, 2), np.uint16))
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    with pytest.raises(InputFileError, match=r"nopix\.dcm: DICOM file has no pixel data"):
        read_image(nopix)
    (tmp_path / "text.dcm").write_text("this is not dicom at all")
    with pytest.raises(InputFileError, match=r"text\.dcm: not a DICOM file"):
        read_image(tmp_path / "text.dcm")
    short = _dicom(tmp_path / "short.dcm", np.zeros((8, 8), np.uint16))
    data = short.read_bytes()
    short.write_bytes(data[:-40])
    with pytest.raises(
        InputFileError, match=r"short\.dcm: (cannot decode DICOM pixel data|unreadable or corrupt)"
    ):
        read_image(short)


def test_pydicom_ct_small_reads_in_hounsfield_units():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom test data not installed")
    img = read_image(path)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(img.raw, expected)
    assert img.rgb.shape == (128, 128, 3) and img.modality == "CT"
    assert img.window == WINDOW_PRESETS["abdomen"]  # the file has no window of its own
    assert img.spacing == pytest.approx((0.661468, 0.661468))


def test_dicom_that_pydicom_cannot_decode_falls_back_to_gdcm():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPEG-lossy.dcm", download=False)  # 12-bit lossy JPEG: no pydicom plugin here
    if path is None:
        pytest.skip("pydicom test data not installed")
    img = read_image(path)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(path))[0]
    np.testing.assert_array_equal(img.raw, reference.astype(np.float32))
    assert img.rgb.shape == (1024, 256, 3) and img.rgb.max() == 255 and img.modality == "NM"


def test_rgb_dicom_is_kept_as_colour(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture (an endoscopy still)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, generate_uid(), "ES"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 4, 5, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "es.dcm", enforce_file_format=True)
    img = read_image(tmp_path / "es.dcm")
    np.testing.assert_array_equal(img.rgb, rgb)
    assert img.modality == "ES" and img.window is None


# ----------------------------------------------------------------------------- volume slices


def _nifti(path: Path, array: np.ndarray, spacing=(0.8, 0.9, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_volume_slice_requires_index_and_names_range(tmp_path):
    vol = np.zeros((4, 5, 6), np.float32)
    vol[2] = np.arange(30, dtype=np.float32).reshape(5, 6)
    path = _nifti(tmp_path / "v.nii.gz", vol)
    with pytest.raises(
        InputFileError, match=r"v\.nii\.gz: is a 3D volume of shape \(4, 5, 6\).*0\.\.3 along axis 0"
    ):
        read_image(path)
    with pytest.raises(
        InputFileError, match=r"v\.nii\.gz: slice 4 is out of range along axis 0: valid slices are 0\.\.3"
    ):
        read_image(path, slice_index=4)
    img = read_image(path, slice_index=2)
    np.testing.assert_array_equal(img.raw, vol[2])
    assert img.rgb.shape == (5, 6, 3) and img.spacing == pytest.approx((0.9, 0.8))
    side = read_image(path, slice_index=1, axis=2)
    assert side.raw.shape == (4, 5) and side.spacing == pytest.approx((2.5, 0.9))
    with pytest.raises(MedSAM3Error, match="axis must be 0"):
        read_image(path, slice_index=0, axis=3)


def test_ct_like_volume_slice_uses_abdomen_window(tmp_path):
    vol = np.full((2, 8, 8), -1000, np.int16)
    vol[:, 2:6, 2:6] = 40
    for ext in ("nrrd", "mha"):
        img = read_image(_nifti(tmp_path / f"ct.{ext}", vol), slice_index=1)
        assert img.window == (40.0, 400.0)
        assert img.rgb[0, 0, 0] == 0 and img.rgb[3, 3, 0] == 128


# ----------------------------------------------------------------------------- bad files


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(InputFileError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InputFileError, match=r"zero\.png: is an empty file \(0 bytes\)"):
        read_image(tmp_path / "zero.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputFileError, match=r"junk\.png: not a readable image"):
        read_image(tmp_path / "junk.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=r"cut\.png: (unreadable or corrupt|not a readable)"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(
        InputFileError, match=r"doc\.pdf: unsupported image format '\.pdf'; supported: \.png.*\.dcm.*\.nii"
    ):
        read_image(tmp_path / "doc.pdf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns that a 0-pixel TIFF is nonconformant
        tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 4), np.uint8))
    with pytest.raises(InputFileError, match=r"empty\.tif: is empty \(0x4 pixels\)"):
        read_image(tmp_path / "empty.tif")
    with pytest.raises(InputFileError, match="is a folder"):
        read_image(tmp_path)
    err = pytest.raises(InputFileError, read_image, tmp_path / "junk.png").value
    assert "\n" not in str(err)


# ----------------------------------------------------------------------------- writers


def test_save_png_and_masks_round_trip_atomically(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "out" / "rgb.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "rgb.png")), rgb)
    mask = np.zeros((6, 7), bool)
    mask[1:3, 2:5] = True
    save_mask_png(tmp_path / "m.png", mask)
    stored = np.asarray(Image.open(tmp_path / "m.png"))
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 255}
    np.testing.assert_array_equal(read_mask_2d(tmp_path / "m.png", binary=True), mask)
    labels = np.zeros((6, 7), np.int32)
    labels[0, 0], labels[5, 6] = 3, 300
    save_mask_png(tmp_path / "l.png", labels)
    np.testing.assert_array_equal(read_mask_2d(tmp_path / "l.png"), labels)
    # A failed write leaves the old file and no temporary behind.
    with pytest.raises(ValueError, match="float"):
        save_png(tmp_path / "m.png", np.zeros((2, 2), np.float32))
    clear_caches()
    np.testing.assert_array_equal(read_mask_2d(tmp_path / "m.png", binary=True), mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "m.png", "out"]


def test_read_mask_handles_jpeg_noise_and_rgb_masks(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(np.stack([mask] * 3, -1)).save(tmp_path / "m.jpg", quality=70)
    read = read_mask_2d(tmp_path / "m.jpg", binary=True).astype(bool)
    assert (read != (mask > 0)).sum() <= 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clear_caches()
        assert read_mask_2d(tmp_path / "m.jpg", binary=True).shape == (32, 32)


def test_returned_arrays_are_writable_copies(tmp_path):
    Image.fromarray(np.full((3, 3), 7, np.uint8)).save(tmp_path / "w.png")
    img = read_image(tmp_path / "w.png")
    img.rgb[0, 0] = 0
    img.raw[0, 0] = 0.0
    assert read_image(tmp_path / "w.png").rgb[0, 0, 0] == 7
