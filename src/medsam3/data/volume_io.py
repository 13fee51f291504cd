"""3D volumes in and label masks out, with the scanner geometry kept exactly (SimpleITK).

A :class:`Volume` holds the voxels as a (Z, Y, X) float32 array (numpy order: slowest axis first),
plus the geometry that places them in the patient: spacing, origin and direction as ITK defines
them. Segmentation works in voxel space (slices are taken along an array axis, never resampled),
so a mask written by :func:`write_mask` on the same grid overlays the input exactly in 3D Slicer
or ITK-SNAP, oblique direction matrices included.

Geometry conventions (ITK's, in LPS physical space):

- ``spacing`` is ``(z, y, x)`` in mm, i.e. array order (ITK's own ``GetSpacing()`` is reversed);
- ``origin`` is the physical ``(x, y, z)`` point of voxel (0, 0, 0), as ITK reports it;
- ``direction`` is ITK's row-major 3x3 matrix, 9 numbers, columns = physical direction of the
  x, y and z voxel axes.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medsam3.data.windowing import (
    DEFAULT_CT_WINDOW,
    WINDOW_PRESETS,
    Window,
    apply_window,
    gray_to_rgb,
    looks_like_hu,
    parse_window,
    percentile_normalize,
    to_uint8,
)
from medsam3.errors import InputFileError, MedSAM3Error

#: File name endings read as volumes (a folder is read as a DICOM series).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Endings :func:`write_mask` can write.
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")

# Relative tolerance on slice gaps in a DICOM series before it counts as "missing slices".
_GAP_TOLERANCE = 0.05


@dataclass
class Volume:
    """A 3D image on its scanner grid. ``array`` is (Z, Y, X) float32; see the module doc for geometry."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    path: Path
    modality: str | None = None
    reference: sitk.Image | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def is_constant(self) -> bool:
        """True when every voxel has the same value (an empty or blank volume): nothing to find."""
        if self.array.size == 0:
            return True
        first = self.array.flat[0]
        return bool(np.all(self.array == first))

    @property
    def is_oblique(self) -> bool:
        """True when the voxel axes are not aligned with the patient axes (kept as is, not resampled)."""
        d = np.abs(np.asarray(self.direction, dtype=np.float64).reshape(3, 3))
        return bool(np.any((d > 1e-6) & (np.abs(d - 1.0) > 1e-6)))

    @cached_property
    def is_ct(self) -> bool:
        """CT by the file's own word, or (no modality recorded) by its Hounsfield-like value range."""
        if self.modality:
            return self.modality.upper() == "CT"
        return looks_like_hu(self.array)

    def slice_spacing(self, axis: int = 0) -> tuple[float, float]:
        """Pixel spacing (row, col) in mm of a slice taken along ``axis``."""
        _check_axis(axis)
        rest = [s for i, s in enumerate(self.spacing) if i != axis]
        return (float(rest[0]), float(rest[1]))


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise MedSAM3Error(f"slice axis must be 0 (Z), 1 (Y) or 2 (X), got {axis}")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ending in sorted(set(VOLUME_SUFFIXES + MASK_SUFFIXES), key=len, reverse=True):
        if name.endswith(ending):
            return ending
    return path.suffix.lower()


def _itk_reason(error: Exception) -> str:
    """The most telling line of a multi-line ITK exception, as a short phrase."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [
        ln
        for ln in lines
        if not ln.startswith(("Exception thrown", "/"))
        and "No such file or directory" not in ln
        and not ln.endswith(":")
    ]
    text = (useful or lines or ["unknown error"])[-1]
    for prefix in ("sitk::ERROR:", "ITK ERROR:", "[nrrd]"):
        text = text.replace(prefix, "")
    return " ".join(text.split())[:200]


def _check_gzip_complete(path: Path) -> None:
    """Decompress a .gz stream to the end: ITK silently zero-fills a truncated .nii.gz, this does not."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(4 << 20):
                pass
    except EOFError:
        raise InputFileError(path, "truncated gzip file (the download or copy did not finish)") from None
    except (OSError, zlib.error) as error:
        raise InputFileError(path, f"corrupt gzip data ({error})") from None


def _check_nifti_complete(path: Path) -> None:
    """NIfTI files shorter than their header promises: ITK would read them without complaint."""
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
    except Exception as error:  # nibabel raises many types for a bad header
        raise InputFileError(
            path, f"not a readable NIfTI file ({' '.join(str(error).split())[:160]})"
        ) from None
    if path.name.lower().endswith(".gz"):
        _check_gzip_complete(path)
        return
    expected = (
        int(header.get_data_offset())
        + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    )
    actual = path.stat().st_size
    if actual < expected:
        raise InputFileError(path, f"truncated NIfTI file: {actual} bytes, the header needs {expected}")


def _from_sitk(image: sitk.Image, path: Path, modality: str | None) -> Volume:
    """Check dimension and components, then wrap a SimpleITK image as a :class:`Volume`."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(
            path,
            f"has {image.GetNumberOfComponentsPerPixel()} values per voxel (vector/RGB volume); "
            "medsam3 reads scalar 3D volumes",
        )
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise InputFileError(
                path,
                f"is a 4D image (x,y,z,t size {size}); medsam3 reads 3D volumes: "
                "save the time point or channel you want as its own 3D file",
            )
    elif dim == 2:
        image = sitk.JoinSeries([image])
    elif dim != 3:
        raise InputFileError(path, f"is a {dim}D image; medsam3 reads 3D volumes")
    array = sitk.GetArrayFromImage(image)
    if array.size == 0:
        raise InputFileError(path, "is empty (0 voxels)")
    array = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(array)
    if bad.any():
        if bad.all():
            raise InputFileError(path, "every voxel is NaN or infinite")
        fill = float(array[~bad].min())
        warnings.warn(
            f"{path}: {int(bad.sum())} NaN/infinite voxels set to the volume minimum {fill:g}", stacklevel=3
        )
        array[bad] = fill
    spacing = image.GetSpacing()
    return Volume(
        array=array,
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        origin=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),
        path=path,
        modality=modality,
        reference=image,
    )


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file, or one DICOM series from a folder, as a :class:`Volume`.

    A folder holding several series needs ``series_uid``; the error lists the UIDs to choose from.
    Empty and constant volumes load (``Volume.is_constant`` tells); 4D and vector images do not.
    Non-finite voxels are replaced by the volume's minimum, with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path, series_uid)
    suffix = _suffix(path)
    if suffix not in VOLUME_SUFFIXES and suffix != ".dcm":
        raise InputFileError(
            path,
            f"unsupported volume format '{suffix or path.name}'; supported: "
            + ", ".join(VOLUME_SUFFIXES)
            + ", or a folder with a DICOM series",
        )
    if path.stat().st_size == 0:
        raise InputFileError(path, "is an empty file (0 bytes)")
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputFileError(path, f"unreadable or corrupt volume ({_itk_reason(error)})") from None
    modality = None
    if image.HasMetaDataKey("0008|0060"):
        modality = image.GetMetaData("0008|0060").strip() or None
    return _from_sitk(image, path, modality)


# ----------------------------------------------------------------------------- DICOM series


def _series_summary(folder: Path, uid: str) -> str:
    import pydicom

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    description = ""
    if files:
        try:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            description = str(getattr(ds, "SeriesDescription", "") or getattr(ds, "Modality", ""))
        except Exception:  # a summary line must never fail the listing
            description = ""
    text = f"{uid} ({len(files)} slices"
    return text + (f", '{description}')" if description else ")")


def list_dicom_series(folder: str | Path) -> list[str]:
    """The DICOM series instance UIDs found directly in ``folder`` (GDCM's scan)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _check_slice_positions(folder: Path, files: list[str]) -> str | None:
    """Refuse a series with missing or duplicated slices (uneven steps along the slice normal).

    Returns the series' modality. GDCM sorts the files by position; we re-read the positions with
    pydicom (headers only) because SimpleITK merely warns about uneven sampling.
    """
    import pydicom

    positions: list[float] = []
    modality: str | None = None
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True)
        except Exception as error:
            raise InputFileError(name, f"unreadable DICOM file in series ({error})") from None
        modality = modality or (str(getattr(ds, "Modality", "")).strip() or None)
        ipp = getattr(ds, "ImagePositionPatient", None)
        iop = getattr(ds, "ImageOrientationPatient", None)
        if ipp is None or iop is None:
            return modality  # no geometry to check (secondary capture); SimpleITK stacks them in order
        row, col = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
        positions.append(float(np.dot(np.cross(row, col), np.asarray(ipp, float))))
    if len(positions) < 3:
        return modality
    order = np.sort(np.asarray(positions))
    steps = np.diff(order)
    step = float(np.median(steps))
    if step <= 1e-6 or np.any(steps <= 1e-6):
        raise InputFileError(
            folder, "DICOM series has several slices at the same position (duplicated slices)"
        )
    worst = int(np.argmax(np.abs(steps - step)))
    if abs(steps[worst] - step) > _GAP_TOLERANCE * step:
        raise InputFileError(
            folder,
            f"DICOM series has missing slices: a {steps[worst]:.3g} mm gap after slice {worst} "
            f"where the spacing is {step:.3g} mm",
        )
    return modality


def _read_dicom_series(folder: Path, series_uid: str | None) -> Volume:
    uids = list_dicom_series(folder)
    if not uids:
        raise InputFileError(folder, "no DICOM series found in this folder")
    if series_uid is None:
        if len(uids) > 1:
            listing = "; ".join(_series_summary(folder, uid) for uid in uids)
            raise MedSAM3Error(f"{folder}: {len(uids)} DICOM series, choose one by series UID: {listing}")
        series_uid = uids[0]
    elif series_uid not in uids:
        listing = "; ".join(_series_summary(folder, uid) for uid in uids)
        raise MedSAM3Error(f"{folder}: no DICOM series with UID {series_uid}; found: {listing}")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    modality = _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputFileError(folder, f"unreadable DICOM series {series_uid} ({_itk_reason(error)})") from None
    return _from_sitk(image, folder, modality)


# ----------------------------------------------------------------------------- masks out


def _mask_pixels(mask: np.ndarray) -> np.ndarray:
    """Bool or integer labels to the smallest unsigned type that holds them."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise MedSAM3Error(f"a mask must be bool or integer labels, got dtype {mask.dtype}")
    if mask.size and int(mask.min()) < 0:
        raise MedSAM3Error(f"mask labels must be >= 0, got {int(mask.min())}")
    top = int(mask.max()) if mask.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return mask.astype(dtype, copy=False)
    raise MedSAM3Error(f"mask label {top} is too large to store")


def write_mask(path: str | Path, mask: np.ndarray, like: Volume) -> Path:
    """Write a (Z, Y, X) label mask on ``like``'s grid: NIfTI (.nii/.nii.gz), NRRD or MHA, atomically.

    Spacing, origin and direction are copied from ``like`` exactly, so the mask overlays the source
    volume in any viewer. Compressed formats are compressed.
    """
    from medsam3.utils.files import atomic_path

    path = Path(path)
    suffix = _suffix(path)
    if suffix not in MASK_SUFFIXES:
        raise MedSAM3Error(f"{path}: masks are written as {', '.join(MASK_SUFFIXES)}, not '{suffix}'")
    mask = np.asarray(mask)
    if mask.shape != like.array.shape:
        raise MedSAM3Error(
            f"{path}: mask shape {tuple(mask.shape)} does not match the volume {tuple(like.array.shape)} "
            f"of {like.path}"
        )
    image = sitk.GetImageFromArray(_mask_pixels(mask))
    image.SetSpacing((like.spacing[2], like.spacing[1], like.spacing[0]))
    image.SetOrigin(like.origin)
    image.SetDirection(like.direction)
    compress = suffix in (".nii.gz", ".nrrd", ".seg.nrrd", ".mha")
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


# ----------------------------------------------------------------------------- slices for the model


def take_slice(array: np.ndarray, index: int, axis: int, source: Path | str = "volume") -> np.ndarray:
    """``array`` (Z, Y, X) cut at ``index`` along ``axis``; an out-of-range index names the valid range."""
    _check_axis(axis)
    count = array.shape[axis]
    if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < count:
        raise InputFileError(
            source, f"slice {index} is out of range along axis {axis}: valid slices are 0..{count - 1}"
        )
    return np.take(array, int(index), axis=axis)


def window_slice(
    raw: np.ndarray, *, is_ct: bool, window: str | Window | None = None
) -> tuple[np.ndarray, Window | None]:
    """Display-normalise one slice to [0, 1]: the given window, the default CT window, or percentiles.

    Returns the normalised slice and the window applied (``None`` for a percentile stretch).
    """
    chosen = parse_window(window)
    if chosen is None and is_ct:
        chosen = WINDOW_PRESETS[DEFAULT_CT_WINDOW]
    if chosen is None:
        return percentile_normalize(raw), None
    return apply_window(raw, *chosen), chosen


def slice_rgb(volume: Volume, index: int, axis: int = 0, window: str | Window | None = None) -> np.ndarray:
    """One slice as the (H, W, 3) uint8 RGB the model sees.

    CT (by modality or Hounsfield range) gets ``window`` or the abdomen window; anything else gets a
    0.5-99.5 percentile stretch of this slice, unless ``window`` is given. No flips or resampling:
    pixel (r, c) of the result is voxel (r, c) of the slice.
    """
    raw = take_slice(volume.array, index, axis, volume.path)
    unit, _ = window_slice(raw, is_ct=volume.is_ct, window=window)
    return gray_to_rgb(to_uint8(unit))
