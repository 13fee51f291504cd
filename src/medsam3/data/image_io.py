"""Read any 2D medical image (or one slice of a volume) into what SAM 3 sees, keeping the raw values.

:func:`read_image` returns a :class:`MedicalImage`: ``rgb`` is the (H, W, 3) uint8 picture given to
the model (display-normalised), ``raw`` keeps the original intensities (HU for CT) for anyone who
needs them, and the pixel grid of both is the file's, so masks come back at the original size.

Display normalisation, by input:

- 8-bit PNG/JPEG/BMP/TIFF: kept as is (gray repeated to three channels, alpha dropped).
- 16-bit, 32-bit and float images: 0.5-99.5 percentile stretch (colour images jointly over channels).
- DICOM: modality LUT (RescaleSlope/Intercept) first, then the explicit ``window``, else the file's
  WindowCenter/WindowWidth, else the abdomen window for CT, else a percentile stretch;
  MONOCHROME1 (white = low) is inverted so that air is dark as in MONOCHROME2.
- NIfTI/NRRD/MHA volumes: one slice (``slice_index`` along ``axis`` of the (Z, Y, X) array), windowed
  like CT when the values look like HU, otherwise percentile-stretched.

Non-finite pixels (NaN, inf) in an otherwise valid image are replaced by the image's minimum finite
value, in ``raw`` too, with a warning: one dead region should not make a scan unusable, and a
defined value keeps every later computation finite. An image with no finite pixel is an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsam3.data.volume_io import VOLUME_SUFFIXES, finite_float32, read_volume, take_slice, window_slice
from medsam3.data.windowing import (
    DEFAULT_CT_WINDOW,
    WINDOW_PRESETS,
    Window,
    apply_window,
    gray_to_rgb,
    parse_window,
    percentile_normalize,
    to_uint8,
)
from medsam3.errors import InputFileError
from medsam3.utils.files import atomic_path, file_suffix
from medsam3.utils.terminal import quiet_native_stderr

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: Every file ending :func:`read_image` accepts (files without an ending are sniffed for DICOM).
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + TIFF_SUFFIXES + DICOM_SUFFIXES + VOLUME_SUFFIXES


@dataclass
class MedicalImage:
    """A 2D image ready for the model, with the original values and geometry it came from."""

    rgb: np.ndarray
    """(H, W, 3) uint8: what the model sees."""
    raw: np.ndarray
    """(H, W) or (H, W, C) float32: original intensities (HU for CT after rescale)."""
    path: Path
    spacing: tuple[float, float] | None = None
    """(row, col) pixel size in mm, when the file records it."""
    modality: str | None = None
    window: Window | None = None
    """(center, width) applied to ``raw`` to make ``rgb``; ``None`` for 8-bit or percentile display."""

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# ----------------------------------------------------------------------------- helpers


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _finite(raw: np.ndarray, path: Path) -> np.ndarray:
    """float32 copy of ``raw`` with non-finite pixels set to the minimum; all-non-finite is an error."""
    return finite_float32(raw, path, unit="pixel", whole="image")


def _check_size(array: np.ndarray, path: Path) -> None:
    if array.size == 0 or min(array.shape[:2]) == 0:
        raise InputFileError(path, f"is empty ({'x'.join(str(s) for s in array.shape)} pixels)")


def _from_pixels(pixels: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Gray (H, W) or colour (H, W, 3) pixels of any dtype to (rgb uint8, raw float32).

    8-bit and boolean pixels are shown as they are; deeper ones get a percentile stretch.
    """
    _check_size(pixels, path)
    if pixels.dtype == bool:
        raw = pixels.astype(np.float32)
        shown = pixels.astype(np.uint8) * np.uint8(255)
    elif pixels.dtype == np.uint8:
        raw = pixels.astype(np.float32)
        shown = pixels
    elif np.issubdtype(pixels.dtype, np.number) and not np.issubdtype(pixels.dtype, np.complexfloating):
        raw = _finite(pixels, path)
        shown = to_uint8(percentile_normalize(raw))
    else:
        raise InputFileError(path, f"unsupported pixel type {pixels.dtype}")
    rgb = gray_to_rgb(shown) if shown.ndim == 2 else shown
    return np.array(rgb, dtype=np.uint8, order="C"), raw  # writable, never a view of a decoder buffer


def _drop_alpha(pixels: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C) -> gray (H, W) or RGB (H, W, 3): alpha is not image content."""
    channels = pixels.shape[-1]
    if channels == 1:
        return pixels[..., 0]
    if channels == 2:
        return pixels[..., 0]
    if channels in (3, 4):
        return pixels[..., :3]
    raise InputFileError(path, f"has {channels} channels per pixel; expected gray, RGB or RGBA")


# ----------------------------------------------------------------------------- readers


def _read_raster(path: Path) -> MedicalImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGBA" if mode == "PA" else "RGB")
            pixels = np.asarray(image)
    except UnidentifiedImageError:
        raise InputFileError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputFileError(path, f"unreadable or corrupt image ({' '.join(str(error).split())})") from None
    if pixels.ndim == 3:
        pixels = _drop_alpha(pixels, path)
    if pixels.dtype.byteorder == ">":
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    rgb, raw = _from_pixels(pixels, path)
    return MedicalImage(rgb=rgb, raw=raw, path=path)


def _read_tiff(path: Path, slice_index: int | None, axis: int) -> MedicalImage:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputFileError(path, "TIFF file holds no image")
            series = tif.series[0]
            axes = series.axes
            pixels = series.asarray()
    except InputFileError:
        raise
    except Exception as error:  # tifffile raises TiffFileError, ValueError, OSError, struct.error...
        raise InputFileError(path, f"unreadable or corrupt TIFF ({' '.join(str(error).split())[:200]})") from None
    if pixels.size == 0:
        raise InputFileError(path, f"is empty ({'x'.join(str(s) for s in pixels.shape)} pixels)")
    # Drop length-1 axes, bring colour samples last, and keep at most one stack axis.
    keep = [i for i, (ax, n) in enumerate(zip(axes, pixels.shape, strict=True)) if n != 1 or ax in "YX"]
    pixels = pixels.reshape([pixels.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "S" in axes:
        pixels = np.moveaxis(pixels, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
        pixels = _drop_alpha(pixels, path)
        axes = axes if pixels.ndim == len(axes) else axes[:-1]
    stack_axes = [ax for ax in axes if ax not in "YXS"]
    if len(stack_axes) > 1:
        raise InputFileError(
            path,
            f"is a {pixels.ndim}D TIFF (axes {axes}, shape {pixels.shape}); need 2D or one stack",
        )
    if stack_axes:
        if "S" in axes:
            raise InputFileError(path, f"is a stack of colour images (axes {axes}); save the one you want alone")
        if slice_index is None:
            if pixels.shape[0] != 1:
                raise InputFileError(
                    path,
                    f"is a stack of {pixels.shape[0]} images (axis '{stack_axes[0]}'); "
                    f"pass a slice index 0..{pixels.shape[0] - 1}",
                )
            slice_index = 0
        pixels = take_slice(pixels, slice_index, axis, path)
    rgb, raw = _from_pixels(pixels, path)
    return MedicalImage(rgb=rgb, raw=raw, path=path)


def _apply_explicit_window(image: MedicalImage, window: str | Window | None) -> MedicalImage:
    """A window asked for by the caller also applies to gray PNG/TIFF (e.g. CT slices exported as 16-bit)."""
    chosen = parse_window(window)
    if chosen is None:
        return image
    if image.raw.ndim != 2:
        warnings.warn(f"{image.path}: a window applies to gray images only; ignored for a colour image", stacklevel=3)
        return image
    image.rgb = gray_to_rgb(to_uint8(apply_window(image.raw, *chosen)))
    image.window = chosen
    return image


def _first_value(value: object) -> float | None:
    """WindowCenter/Width may be multi-valued (several suggested windows): use the first."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, str):
            value = value[0]  # type: ignore[index]
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None


def _decode_with_gdcm(path: Path) -> np.ndarray | None:
    """Second decoder for what pydicom's plugins cannot read (e.g. 12-bit lossy JPEG): GDCM via SimpleITK.

    Returns the rescaled pixels (GDCM applies the modality LUT), or ``None`` if GDCM fails too.
    """
    import SimpleITK as sitk

    try:
        with warnings.catch_warnings(), quiet_native_stderr():
            warnings.simplefilter("ignore")
            image = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
    except RuntimeError:
        return None
    array = sitk.GetArrayFromImage(image)
    return array[0] if array.ndim >= 3 and array.shape[0] == 1 else array


def _read_dicom(path: Path, window: str | Window | None) -> MedicalImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(path, force=True)  # DICOM without the Part 10 preamble
        except Exception:
            raise InputFileError(path, "not a DICOM file") from None
        if "PixelData" not in ds:
            raise InputFileError(path, "not a DICOM file (no DICOM header or pixel data)") from None
    except Exception as error:
        raise InputFileError(path, f"unreadable or corrupt DICOM ({' '.join(str(error).split())[:200]})") from None
    if "PixelData" not in ds:
        raise InputFileError(path, "DICOM file has no pixel data (not an image)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputFileError(path, f"is a multi-frame DICOM ({frames} frames); read it with the video or volume reader")
    rescaled = False
    try:
        pixels = ds.pixel_array
    except Exception as error:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        # GDCM is the second decoder for compressed pixel data only: native (uncompressed) data that
        # pydicom refuses is wrong in the file (e.g. Rows x Columns larger than the data), and GDCM
        # would zero-pad it into a picture that is not there.
        try:
            native = syntax is not None and not syntax.is_compressed
        except (AttributeError, ValueError):  # not a known transfer syntax: let GDCM try
            native = False
        pixels = None if native else _decode_with_gdcm(path)
        if pixels is None:
            reason = " ".join(str(error).split(" - the dataset may be")[0].split())[:200]
            declared = f", Rows x Columns {ds.get('Rows')}x{ds.get('Columns')}" if native else ""
            raise InputFileError(path, f"cannot decode DICOM pixel data ({name}{declared}: {reason})") from None
        rescaled = True  # GDCM has already applied RescaleSlope/Intercept
    _check_size(pixels, path)
    modality = str(getattr(ds, "Modality", "") or "").strip() or None
    spacing = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, tag, None)
        if value is not None and len(value) == 2:
            spacing = (float(value[0]), float(value[1]))
            break
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples > 1 or pixels.ndim == 3:
        rgb, raw = _from_pixels(_drop_alpha(pixels, path) if pixels.ndim == 3 else pixels, path)
        return MedicalImage(rgb=rgb, raw=raw, path=path, spacing=spacing, modality=modality)
    raw = _finite(pixels if rescaled else apply_modality_lut(pixels, ds), path)
    chosen = parse_window(window)
    if chosen is None:
        center = _first_value(ds.get("WindowCenter"))
        width = _first_value(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            chosen = (center, width)
        elif modality == "CT":
            chosen = WINDOW_PRESETS[DEFAULT_CT_WINDOW]
    unit = apply_window(raw, *chosen) if chosen is not None else percentile_normalize(raw)
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        unit = 1.0 - unit
    return MedicalImage(
        rgb=gray_to_rgb(to_uint8(unit)), raw=raw, path=path, spacing=spacing, modality=modality, window=chosen
    )


def _read_volume_slice(path: Path, slice_index: int | None, axis: int, window: str | Window | None) -> MedicalImage:
    volume = read_volume(path)
    if slice_index is None:
        if volume.shape[axis] != 1:
            raise InputFileError(
                path,
                f"is a 3D volume of shape {volume.shape} (Z, Y, X); pass a slice index "
                f"0..{volume.shape[axis] - 1} along axis {axis}",
            )
        slice_index = 0
    raw = np.ascontiguousarray(take_slice(volume.array, slice_index, axis, path))
    unit, chosen = window_slice(raw, is_ct=volume.is_ct, window=window)
    return MedicalImage(
        rgb=gray_to_rgb(to_uint8(unit)),
        raw=raw,
        path=path,
        spacing=volume.slice_spacing(axis),
        modality=volume.modality,
        window=chosen,
    )


def read_image(
    path: str | Path,
    *,
    slice_index: int | None = None,
    axis: int = 0,
    window: str | tuple[float, float] | None = None,
) -> MedicalImage:
    """Read a PNG/JPEG/BMP/TIFF/DICOM image, or one slice of a NIfTI/NRRD/MHA volume.

    ``slice_index`` (along ``axis`` of the (Z, Y, X) array) is required for volumes and TIFF stacks.
    ``window`` is a preset name ("lung"), "center,width" or a pair, applied to the raw values of any
    gray image (overriding a DICOM file's own window); colour images ignore it with a warning.
    Any problem with the file raises :class:`~medsam3.errors.InputFileError` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file")
    if path.is_dir():
        raise InputFileError(path, "is a folder, not an image (read DICOM series folders with read_volume)")
    if path.stat().st_size == 0:
        raise InputFileError(path, "is an empty file (0 bytes)")
    suffix = file_suffix(path)
    parse_window(window)  # a bad window is reported before any decoding work
    if suffix in RASTER_SUFFIXES:
        return _apply_explicit_window(_read_raster(path), window)
    if suffix in TIFF_SUFFIXES:
        return _apply_explicit_window(_read_tiff(path, slice_index, axis), window)
    if suffix in DICOM_SUFFIXES or _is_dicom_file(path):
        return _read_dicom(path, window)
    if suffix in VOLUME_SUFFIXES:
        return _read_volume_slice(path, slice_index, axis, window)
    raise InputFileError(
        path, f"unsupported image format '{suffix or path.name}'; supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


# ----------------------------------------------------------------------------- writers


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write uint8 gray/RGB/RGBA, uint16 gray, or a bool mask (as 0/255) to a PNG, atomically."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * np.uint8(255)
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"save_png takes uint8, uint16 or bool arrays, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16 and array.ndim != 2:
        raise ValueError("save_png writes uint16 only as a single-channel image")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"save_png takes (H, W), (H, W, 3) or (H, W, 4) arrays, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"save_png got an empty array of shape {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """Write a mask PNG: a bool mask as 0/255, an integer label map as its label values (8 or 16 bit)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        return save_png(path, mask)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"a mask must be bool or integer labels, got {mask.dtype}")
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"mask labels must lie in 0..65535, got {low}..{high}")
    return save_png(path, mask.astype(np.uint8 if high <= 255 else np.uint16))
