"""3D volumes in and label masks out, with the scanner geometry kept exactly (SimpleITK, nibabel).

A :class:`Volume` holds the voxels as a (Z, Y, X) float32 array (numpy order: slowest axis first),
plus the geometry that places them in the patient: spacing, origin and direction as ITK defines
them. Segmentation works in voxel space (slices are taken along an array axis, never resampled),
so a mask written by :func:`write_mask` on the same grid overlays the input exactly in 3D Slicer
or ITK-SNAP. Oblique direction matrices are kept as they are: nothing is reoriented, so output
geometry equals input geometry.

Geometry conventions (ITK's, in LPS physical space):

- ``spacing`` is ``(z, y, x)`` in mm, i.e. array order (ITK's own ``GetSpacing()`` is reversed);
- ``origin`` is the physical ``(x, y, z)`` point of voxel (0, 0, 0), as ITK reports it;
- ``direction`` is ITK's row-major 3x3 matrix, 9 numbers, columns = physical direction of the
  x, y and z voxel axes.

NIfTI geometry is read by ITK (qform/sform as Slicer and ITK-SNAP read it) but the voxels by
nibabel, because ITK silently zero-fills a truncated file and turns NaN into 0. A NIfTI mask
written for a NIfTI volume copies the source header's geometry fields bit for bit.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

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
from medsam3.utils.files import file_suffix
from medsam3.utils.terminal import quiet_native_stderr

#: File name endings read as volumes (a folder is read as a DICOM series).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".nhdr", ".mha", ".mhd")
#: Endings :func:`write_mask` can write.
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")

# Relative tolerance on slice gaps in a DICOM series before it counts as "missing slices".
_GAP_TOLERANCE = 0.05

Geometry = tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, ...]]


@dataclass
class Volume:
    """A 3D image on its scanner grid. ``array`` is (Z, Y, X) float32; see the module doc for geometry."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    path: Path
    modality: str | None = None
    nifti_header: Any = field(default=None, repr=False)
    """The source's nibabel header when read from NIfTI: lets NIfTI masks copy its geometry exactly."""
    source_files: tuple[str, ...] = field(default=(), repr=False)
    """For a DICOM series: the slice files, in array (Z) order. Needed for DICOM-SEG output."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @cached_property
    def reference(self) -> sitk.Image:
        """A SimpleITK image on this grid (uint8 zeros, built on first use): for resampling onto it.

        It carries the geometry, not the intensities, so a Volume does not hold its voxels twice.
        """
        image = sitk.Image([int(s) for s in reversed(self.array.shape)], sitk.sitkUInt8)
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

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


def _one_line(error: object, limit: int = 200) -> str:
    return " ".join(str(error).split())[:limit]


def _first_sentence(error: object) -> str:
    """A library's error text cut at its first sentence (pydicom adds advice after ' - ' or '. ')."""
    text = _one_line(error)
    for stop in (". ", " - "):
        text = text.split(stop)[0]
    return text.rstrip(".")


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
    return _one_line(text)


def _geometry_3d(path: Path, dim: int, size: tuple[int, ...], spacing, origin, direction) -> Geometry:
    """Reduce ITK geometry of a 2D, 3D or single-time-point 4D image to 3D; refuse real 4D."""
    if dim == 3:
        return tuple(spacing), tuple(origin), tuple(direction)  # type: ignore[return-value]
    if dim == 2:
        d = direction
        return (
            (spacing[0], spacing[1], 1.0),
            (origin[0], origin[1], 0.0),
            (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0),
        )
    if dim == 4:
        if size[3] != 1:
            raise InputFileError(
                path,
                f"is a 4D image (x,y,z,t size {tuple(size)}); medsam3 reads 3D volumes: "
                "save the time point or channel you want as its own 3D file",
            )
        d = np.asarray(direction, dtype=np.float64).reshape(4, 4)[:3, :3]
        return tuple(spacing[:3]), tuple(origin[:3]), tuple(float(v) for v in d.reshape(-1))  # type: ignore[return-value]
    raise InputFileError(path, f"is a {dim}D image; medsam3 reads 3D volumes")


def finite_float32(array: np.ndarray, path: Path, unit: str = "voxel", whole: str = "volume") -> np.ndarray:
    """A fresh, writable float32 copy with non-finite values set to the minimum (warned).

    Shared by the 2D and 3D readers: an all-NaN/inf input is an error naming the file, and so are
    finite values beyond float32's range (float64 near 1e308), which would otherwise turn infinite.
    """
    source = np.asarray(array)
    if source.dtype.kind == "f" and source.dtype.itemsize > 4 and source.size:
        finite = np.isfinite(source)
        top = float(np.max(source, where=finite, initial=-np.inf))
        bottom = float(np.min(source, where=finite, initial=np.inf))
        limit = float(np.finfo(np.float32).max)
        if top > limit or bottom < -limit:
            extreme = top if top > limit else bottom
            raise InputFileError(
                path,
                f"{unit} values reach {extreme:.3g}, beyond the float32 range (±{limit:.2g}) medsam3 works in; "
                f"rescale the {whole}",
            )
    array = np.array(source, dtype=np.float32, order="C")
    bad = ~np.isfinite(array)
    if bad.any():
        if bad.all():
            raise InputFileError(path, f"every {unit} is NaN or infinite: nothing to segment")
        fill = float(array[~bad].min())
        warnings.warn(
            f"{path}: {int(bad.sum())} NaN/infinite {unit}s set to the {whole} minimum {fill:g}", stacklevel=4
        )
        array[bad] = fill
    return array


def _finite_voxels(array: np.ndarray, path: Path) -> np.ndarray:
    """float32 (Z, Y, X) with non-finite voxels set to the minimum (warned); all non-finite is an error."""
    if np.asarray(array).size == 0:
        raise InputFileError(path, "is empty (0 voxels)")
    return finite_float32(array, path)


def _check_scalar(path: Path, components: int) -> None:
    if components != 1:
        raise InputFileError(
            path, f"has {components} values per voxel (vector/RGB volume); medsam3 reads scalar 3D volumes"
        )


def _from_sitk(image: sitk.Image, path: Path, modality: str | None) -> Volume:
    """Wrap a SimpleITK image (2D, 3D or 4D with one time point) as a :class:`Volume`."""
    _check_scalar(path, image.GetNumberOfComponentsPerPixel())
    spacing, origin, direction = _geometry_3d(
        path,
        image.GetDimension(),
        image.GetSize(),
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
    )
    array = sitk.GetArrayViewFromImage(image)
    array = array.reshape((-1,) + array.shape[-2:]) if array.ndim != 3 else array
    return Volume(
        array=_finite_voxels(array, path),
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction),
        path=path,
        modality=modality,
    )


def _read_nifti(path: Path) -> Volume:
    """Geometry from ITK's header reader, voxels from nibabel (which notices truncation and keeps NaN)."""
    import nibabel as nib

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_native_stderr():  # the NIfTI C library prints "** ERROR" lines itself
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputFileError(path, f"not a readable NIfTI file ({_itk_reason(error)})") from None
    _check_scalar(path, reader.GetNumberOfComponents())
    size = tuple(int(s) for s in reader.GetSize())
    spacing, origin, direction = _geometry_3d(
        path, reader.GetDimension(), size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    )
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error) as error:
        raise InputFileError(path, f"truncated or corrupt compressed NIfTI ({_one_line(error)})") from None
    except Exception as error:  # nibabel raises OSError, ValueError, ImageFileError...
        reason = _one_line(error)
        if "Expected" in reason and "bytes" in reason:
            raise InputFileError(path, f"truncated NIfTI file ({reason})") from None
        raise InputFileError(path, f"not a readable NIfTI file ({reason})") from None
    zyx = tuple(reversed(size[:3])) if len(size) >= 3 else (1,) + tuple(reversed(size))
    if int(np.prod(data.shape)) != int(np.prod(zyx)):
        raise InputFileError(path, f"NIfTI data shape {data.shape} does not match its header size {size}")
    array = data.reshape(data.shape[: len(size)][:3]).T.reshape(zyx)
    return Volume(
        array=_finite_voxels(array, path),
        spacing=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction),
        path=path,
        modality=None,
        nifti_header=image.header.copy(),
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
    suffix = file_suffix(path)
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
        return _read_nifti(path)
    try:
        with quiet_native_stderr():
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputFileError(path, f"unreadable or corrupt volume ({_itk_reason(error)})") from None
    modality = None
    if image.HasMetaDataKey("0008|0060"):
        modality = image.GetMetaData("0008|0060").strip() or None
    return _from_sitk(image, path, modality)


# ----------------------------------------------------------------------------- DICOM series


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series in a folder, as a user would choose it."""

    uid: str
    slices: int
    description: str
    modality: str | None

    def __str__(self) -> str:
        text = f"{self.uid} ({self.slices} slices"
        return text + (f", '{self.description}')" if self.description else ")")


def list_dicom_series(folder: str | Path) -> list[str]:
    """The DICOM series instance UIDs found directly in ``folder`` (GDCM's scan; sub-folders not searched)."""
    with quiet_native_stderr():  # ITK prints "No Series were found" itself; callers say it in one line
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def describe_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """Every series in ``folder`` with its slice count, description and modality (headers only)."""
    import pydicom

    infos = []
    for uid in list_dicom_series(folder):
        with quiet_native_stderr():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        description, modality = "", None
        if files:
            try:
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
                description = str(getattr(ds, "SeriesDescription", "") or "")
                modality = str(getattr(ds, "Modality", "") or "").strip() or None
            except Exception:  # a listing must never fail on one odd header
                pass
        infos.append(SeriesInfo(uid, len(files), description or (modality or ""), modality))
    return infos


def _check_slice_headers(folder: Path, files: list[str]) -> str | None:
    """Refuse a series whose slices differ in size, or with missing or duplicated slices.

    Returns the series' modality. GDCM sorts the files by position; we re-read the headers with
    pydicom (no pixels) because SimpleITK only says "Size mismatch" for the first odd file and
    merely warns about uneven sampling.
    """
    import pydicom

    positions: list[float] = []
    sizes: dict[tuple[int, int], list[str]] = {}
    geometry = True
    modality: str | None = None
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True)
        except Exception as error:
            raise InputFileError(name, f"unreadable DICOM file in series ({_one_line(error)})") from None
        modality = modality or (str(getattr(ds, "Modality", "")).strip() or None)
        sizes.setdefault((int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)), []).append(name)
        ipp = getattr(ds, "ImagePositionPatient", None)
        iop = getattr(ds, "ImageOrientationPatient", None)
        if ipp is None or iop is None:
            geometry = False  # no geometry to check (secondary capture); SimpleITK stacks them in order
        elif geometry:
            row, col = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
            positions.append(float(np.dot(np.cross(row, col), np.asarray(ipp, float))))
    _check_slice_sizes(folder, sizes)
    if not geometry or len(positions) < 3:
        return modality
    order = np.sort(np.asarray(positions))
    steps = np.diff(order)
    step = float(np.median(steps))
    if step <= 1e-6 or np.any(steps <= 1e-6):
        raise InputFileError(folder, "DICOM series has several slices at the same position (duplicated slices)")
    worst = int(np.argmax(np.abs(steps - step)))
    if abs(steps[worst] - step) > _GAP_TOLERANCE * step:
        raise InputFileError(
            folder,
            f"DICOM series has missing slices: a {steps[worst]:.3g} mm gap after slice {worst} "
            f"where the spacing is {step:.3g} mm",
        )
    return modality


def _check_slice_sizes(folder: Path, sizes: dict[tuple[int, int], list[str]]) -> None:
    """One volume needs one slice size: name the files that differ from the most common size."""
    if len(sizes) <= 1:
        return
    common = max(sizes, key=lambda size: len(sizes[size]))
    odd = [(Path(name).name, size) for size, names in sizes.items() if size != common for name in names]
    shown = ", ".join(f"{name} is {rows}x{cols}" for name, (rows, cols) in odd[:5])
    more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
    raise InputFileError(
        folder,
        f"DICOM series has slices of different sizes (rows x columns): {len(sizes[common])} slices are "
        f"{common[0]}x{common[1]}, but {shown}{more}; one volume needs one slice size",
    )


#: Media Storage Directory (DICOMDIR): an index, not an image of any series.
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM name ending, or the 'DICM' magic after the 128-byte preamble."""
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _check_left_out_files(folder: Path, series_uid: str, files: list[str]) -> None:
    """Refuse a DICOM file in ``folder`` that GDCM left out of the series because it cannot read it.

    GDCM skips a truncated or corrupt file without a word, so the series would silently lose a
    slice (or, in the middle, look like a gap). A file of another series, a DICOMDIR and files that
    are not DICOM at all (notes, JSON) are left alone.
    """
    import pydicom

    listed = {str(Path(name).resolve()) for name in files}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or str(path.resolve()) in listed:
            continue
        if path.name.upper() == "DICOMDIR" or not _looks_like_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
            media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
        except Exception as error:
            raise InputFileError(
                path,
                f"truncated or corrupt DICOM file in the series folder ({_first_sentence(error)}); "
                "replace it or move it out of the folder",
            ) from None
        if media_class == _DICOMDIR_CLASS or (uid and uid != series_uid):
            continue
        try:
            _ = pydicom.dcmread(path).pixel_array  # decoding is the test
            reason = "its pixel data cannot be read"
        except Exception as error:
            reason = _first_sentence(error)
        raise InputFileError(
            path,
            f"truncated or corrupt DICOM file of this series, which the reader left out ({reason}); "
            "replace it or move it out of the folder",
        )


def _read_dicom_series(folder: Path, series_uid: str | None) -> Volume:
    uids = list_dicom_series(folder)
    if not uids:
        raise InputFileError(folder, "no DICOM series found in this folder (sub-folders are not searched)")
    if series_uid is None:
        if len(uids) > 1:
            listing = "; ".join(str(info) for info in describe_dicom_series(folder))
            raise MedSAM3Error(f"{folder}: {len(uids)} DICOM series, choose one by series UID: {listing}")
        series_uid = uids[0]
    elif series_uid not in uids:
        listing = "; ".join(str(info) for info in describe_dicom_series(folder))
        raise MedSAM3Error(f"{folder}: no DICOM series with UID {series_uid}; found: {listing}")
    with quiet_native_stderr():
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    _check_left_out_files(folder, series_uid, files)
    modality = _check_slice_headers(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with quiet_native_stderr():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputFileError(folder, f"unreadable DICOM series {series_uid} ({_itk_reason(error)})") from None
    volume = _from_sitk(image, folder, modality)
    volume.source_files = tuple(files)
    return volume


# ----------------------------------------------------------------------------- same grid


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def grid_difference(image: tuple, label: tuple) -> str | None:
    """How two grids ``(shape, spacing, origin, direction)`` differ (in :class:`Volume` conventions), or None.

    Tolerances allow float32 header rounding, nothing more: spacing 0.1 %, origin 1 % of a voxel,
    direction 1e-3. A label on another grid would be scored against the wrong voxels.
    """
    shape_a, spacing_a, origin_a, direction_a = image
    shape_b, spacing_b, origin_b, direction_b = label
    if tuple(shape_a) != tuple(shape_b):
        return f"size {tuple(shape_b)} (z, y, x) differs from its image's {tuple(shape_a)}"
    spacing_a, spacing_b = np.asarray(spacing_a, float), np.asarray(spacing_b, float)
    if not np.allclose(spacing_a, spacing_b, rtol=1e-3, atol=1e-6):
        return f"spacing {_fmt(spacing_b)} mm (z, y, x) differs from its image's {_fmt(spacing_a)}"
    if not np.allclose(origin_a, origin_b, rtol=0.0, atol=0.01 * float(spacing_a.min())):
        return f"origin {_fmt(origin_b)} mm differs from its image's {_fmt(origin_a)}"
    if not np.allclose(direction_a, direction_b, rtol=0.0, atol=1e-3):
        return f"direction {_fmt(direction_b)} differs from its image's {_fmt(direction_a)}"
    return None


def check_same_grid(image: Volume, label: Volume) -> None:
    """Refuse a label volume that is not on its image's voxel grid (size, spacing, origin, direction)."""
    problem = grid_difference(
        (image.shape, image.spacing, image.origin, image.direction),
        (label.shape, label.spacing, label.origin, label.direction),
    )
    if problem:
        raise InputFileError(label.path, f"label volume is not on the grid of {image.path.name}: {problem}")


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


def _write_nifti_like(tmp: Path, pixels: np.ndarray, header: Any) -> None:
    """NIfTI with the source header's geometry fields (qform, sform, pixdim, units) copied unchanged."""
    import nibabel as nib

    out = header.copy()
    out.extensions.clear()
    out.set_data_dtype(pixels.dtype)
    out.set_slope_inter(1.0, 0.0)
    out["cal_min"], out["cal_max"] = 0, 0
    out["intent_code"], out["intent_name"] = 0, b""
    out["descrip"] = b"medsam3 mask"
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(np.ascontiguousarray(pixels.T), None, header=out)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units"):  # fmt: skip
        image.header[key] = header[key]
    image.header["pixdim"][:4] = header["pixdim"][:4]
    nib.save(image, str(tmp))


def write_mask(path: str | Path, mask: np.ndarray, like: Volume) -> Path:
    """Write a (Z, Y, X) label mask on ``like``'s grid: NIfTI (.nii/.nii.gz), NRRD or MHA, atomically.

    Spacing, origin and direction are copied from ``like``: for a NIfTI mask of a NIfTI volume the
    header geometry fields are copied bit for bit; otherwise ITK writes ``like``'s float64 geometry,
    which the format may round (NIfTI stores float32). Compressed formats are compressed.
    """
    from medsam3.utils.files import atomic_path

    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in MASK_SUFFIXES:
        raise MedSAM3Error(f"{path}: masks are written as {', '.join(MASK_SUFFIXES)}, not '{suffix}'")
    mask = np.asarray(mask)
    if mask.shape != like.array.shape:
        raise MedSAM3Error(
            f"{path}: mask shape {tuple(mask.shape)} does not match the volume {tuple(like.array.shape)} of {like.path}"
        )
    pixels = _mask_pixels(mask)
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix in (".nii", ".nii.gz") and like.nifti_header is not None:
            _write_nifti_like(tmp, pixels, like.nifti_header)
        else:
            image = sitk.GetImageFromArray(pixels)
            image.SetSpacing(tuple(reversed(like.spacing)))
            image.SetOrigin(like.origin)
            image.SetDirection(like.direction)
            sitk.WriteImage(image, str(tmp), suffix != ".nii")
    return path


#: Type 2 attributes (Patient and General Study modules) a SEG copies from its source images: the
#: standard lets them be empty, and real exports often leave them out; absent ones are copied empty.
_SEG_EMPTY_ALLOWED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
#: Attributes a SEG cannot do without: type 1 in the SEG, or what places its frames in the patient.
_SEG_REQUIRED = ("StudyInstanceUID", "SOPInstanceUID", "Modality", "FrameOfReferenceUID", "PixelSpacing")


def write_dicom_seg(
    path: str | Path,
    mask: np.ndarray,
    like: Volume,
    labels: dict[int, str] | list[str],
    *,
    series_description: str = "medsam3 segmentation",
) -> Path:
    """Write a (Z, Y, X) label mask as a DICOM Segmentation object referencing ``like``'s series.

    ``like`` must come from a DICOM series folder (its slice files are the source images).
    ``labels`` names each label value (a list names values 1, 2, ...); every named label becomes a
    segment, in label order, found or not: the concept phrase is the segment label, the coded
    property the generic SNOMED "Tissue", since free-text concepts have no code. Empty slices are
    omitted, as the standard allows; an all-empty mask keeps every frame (a valid, empty SEG).
    Patient/study attributes the series lacks but the standard lets be empty are written empty;
    a missing required one is refused by name. Written atomically.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medsam3 import __version__
    from medsam3.utils.files import atomic_path

    path = Path(path)
    if not like.source_files:
        raise MedSAM3Error(f"{path}: DICOM-SEG needs a volume read from a DICOM series folder, not {like.path}")
    mask = np.asarray(mask)
    if mask.shape != like.array.shape:
        raise MedSAM3Error(
            f"{path}: mask shape {tuple(mask.shape)} does not match the volume {tuple(like.array.shape)}"
        )
    pixels = _mask_pixels(mask)
    names = dict(enumerate(labels, start=1)) if isinstance(labels, list) else dict(labels)
    present = sorted(int(v) for v in np.unique(pixels) if v != 0)
    unnamed = [v for v in present if v not in names]
    if unnamed:
        raise MedSAM3Error(f"{path}: mask label(s) {unnamed} have no name in labels {names}")
    values = sorted(int(v) for v in names)
    if not values:
        raise MedSAM3Error(f"{path}: no labels to describe; a DICOM-SEG needs at least one segment")
    # highdicom numbers segments 1..N: map each named label onto its rank.
    lookup = np.zeros(max(values[-1], int(pixels.max())) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    label_map = lookup[pixels]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medsam3", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(names[value])[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(values, start=1)
    ]
    try:
        sources = [pydicom.dcmread(name) for name in like.source_files]
    except Exception as error:
        raise InputFileError(like.path, f"cannot re-read the DICOM series ({_one_line(error)})") from None
    _complete_seg_sources(sources, like.source_files, path)
    try:
        seg = _build_seg(hd, sources, label_map, descriptions, series_description)
    except (AttributeError, ValueError, TypeError) as error:
        raise MedSAM3Error(f"{like.path}: cannot build a DICOM-SEG for this series ({_one_line(error)})") from None
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path


def check_dicom_seg_sources(like: Volume, path: str | Path) -> None:
    """Refuse, from the headers alone and before any work, a series a DICOM-SEG cannot reference."""
    import pydicom

    try:
        headers = [pydicom.dcmread(name, stop_before_pixels=True) for name in like.source_files]
    except Exception as error:
        raise InputFileError(like.path, f"cannot re-read the DICOM series ({_one_line(error)})") from None
    _complete_seg_sources(headers, like.source_files, Path(path))


def _complete_seg_sources(sources: list, files: tuple[str, ...], path: Path) -> None:
    """Add the type 2 attributes a SEG copies, empty, to the in-memory sources that lack them; refuse
    a source without a required one, naming the attribute and the file. The files are not touched."""
    from pydicom.datadict import tag_for_keyword

    def refuse(keyword: str) -> None:
        missing = [name for ds, name in zip(sources, files) if ds.get(keyword) in (None, "")]
        tag = tag_for_keyword(keyword) or 0
        others = f", nor do {len(missing) - 1} other files of the series" if len(missing) > 1 else ""
        raise InputFileError(
            missing[0],
            f"has no {keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}){others}; "
            f"a DICOM-SEG needs it, so {path.name} cannot be written",
        )

    for ds in sources:
        for keyword in _SEG_REQUIRED:
            if ds.get(keyword) in (None, ""):
                refuse(keyword)
        placed = ds.get("ImagePositionPatient") is not None and ds.get("ImageOrientationPatient") is not None
        if placed and ds.get("SliceThickness") in (None, ""):
            refuse("SliceThickness")  # type 2 in the image, but the SEG's pixel measures need a value
        for keyword in _SEG_EMPTY_ALLOWED:
            if keyword not in ds:
                setattr(ds, keyword, "")


def _build_seg(hd: Any, sources: list, label_map: np.ndarray, descriptions: list, series_description: str) -> Any:
    from medsam3 import __version__

    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medsam3",
        manufacturer_model_name="MedSAM-3",
        software_versions=__version__,
        device_serial_number="0",
        content_description=series_description[:64],
        omit_empty_frames=bool(label_map.any()),  # all empty: keep the frames (highdicom would say so itself)
    )
    seg.SeriesDescription = series_description[:64]
    return seg


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
