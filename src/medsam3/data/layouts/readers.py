"""File-level helpers shared by the layout readers: suffixes, header-only sizes, label maps.

Indexing a dataset must be cheap, so sizes come from file headers (PIL, tifffile, ITK's
``ReadImageInformation``) without decoding pixels. Label maps are read exactly (no scaling, no
colour conversion surprises) because their values *are* the annotation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from medsam3.data.volume_io import VOLUME_SUFFIXES, read_volume
from medsam3.errors import InputFileError
from medsam3.utils.files import file_suffix

#: Endings read as 2D images or 2D masks.
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_TIFF = (".tif", ".tiff")


def is_volume_file(path: str | Path) -> bool:
    return file_suffix(path) in VOLUME_SUFFIXES


def files_with(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Regular, non-hidden files in ``folder`` with one of ``suffixes``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and file_suffix(p) in suffixes
    )


def _stamp(path: Path) -> tuple[str, int, int]:
    """Cache key that changes when the file does."""
    try:
        stat = path.stat()
    except OSError:
        raise InputFileError(path, "no such file") from None
    return (str(path), stat.st_mtime_ns, stat.st_size)


def image_size_2d(path: Path) -> tuple[int, int]:
    """(height, width) of a 2D image from its header only."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputFileError(path, "is an empty file (0 bytes)")
    try:
        if file_suffix(path) in _TIFF:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise InputFileError(path, "TIFF file holds no image")
                series = tif.series[0]
                axes, shape = series.axes, series.shape
            if "Y" not in axes or "X" not in axes:
                raise InputFileError(path, f"TIFF has no image plane (axes {axes})")
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
        return int(height), int(width)
    except InputFileError:
        raise
    except Exception as error:  # PIL and tifffile raise many types for a bad file
        raise InputFileError(
            path, f"unreadable or corrupt image ({' '.join(str(error).split())[:160]})"
        ) from None


def volume_grid(path: Path) -> tuple[tuple[int, int, int], tuple, tuple, tuple]:
    """(shape (Z, Y, X), spacing (z, y, x), origin, direction) of a volume from its header only (ITK),
    in the conventions of ``read_volume``'s :class:`~medsam3.data.volume_io.Volume`."""
    import SimpleITK as sitk

    from medsam3.data.volume_io import _geometry_3d
    from medsam3.utils.terminal import quiet_native_stderr

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputFileError(path, "is an empty file (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_native_stderr():
            reader.ReadImageInformation()
    except RuntimeError as error:
        reason = " ".join(str(error).split())[-160:]
        raise InputFileError(path, f"unreadable or corrupt volume header ({reason})") from None
    size = list(reader.GetSize())
    if len(size) == 2:
        size.append(1)
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) != 3:
        raise InputFileError(path, f"is a {len(size)}D image of size {tuple(size)}; expected a 3D volume")
    spacing, origin, direction = _geometry_3d(
        path, reader.GetDimension(), tuple(reader.GetSize()), reader.GetSpacing(), reader.GetOrigin(),
        reader.GetDirection(),
    )  # fmt: skip
    shape = (int(size[2]), int(size[1]), int(size[0]))
    return shape, tuple(reversed(spacing)), tuple(origin), tuple(direction)


def volume_size(path: Path) -> tuple[int, int, int]:
    """(Z, Y, X) size of a volume from its header only (ITK), the array order ``read_volume`` gives."""
    return volume_grid(path)[0]


def _to_labels(array: np.ndarray, path: Path, binary: bool) -> np.ndarray:
    """A decoded mask image as an (H, W) integer label map.

    Binary masks (0/255 PNG, noisy JPEG) are thresholded at half range, so JPEG ringing does not
    create specks. Colour masks must be grey in disguise (equal channels) unless binary.
    """
    if array.ndim == 3:
        channels = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
        if binary:
            array = channels.max(axis=2)
        elif np.all(channels == channels[..., :1]):
            array = channels[..., 0]
        else:
            raise InputFileError(path, "label map has colour pixels; expected one integer label per pixel")
    if array.ndim != 2:
        raise InputFileError(path, f"expected a 2D mask, got an array of shape {array.shape}")
    if binary:
        top = float(array.max()) if array.size else 0.0
        threshold = 0.5 if top <= 1 else (top + 1) / 2.0 if top < 128 else 128
        return (array >= threshold).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputFileError(path, "label map holds non-integer values")
        array = array.astype(np.int64)
    if array.size and int(array.min()) < 0:
        raise InputFileError(path, f"label map holds negative values ({int(array.min())})")
    return array


@functools.lru_cache(maxsize=8)
def _read_mask_2d_cached(stamp: tuple[str, int, int], binary: bool) -> np.ndarray:
    path = Path(stamp[0])
    if stamp[2] == 0:
        raise InputFileError(path, "is an empty file (0 bytes)")
    try:
        if file_suffix(path) in _TIFF:
            import tifffile

            array = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                image.load()
                if image.mode == "1":
                    array = np.asarray(image).astype(np.uint8)  # bilevel: 0/1
                elif image.mode in ("P", "I;16", "I;16B", "I;16L", "I", "F", "L", "LA", "RGB", "RGBA"):
                    array = np.asarray(image)  # palette index = label value (VOC style)
                else:
                    array = np.asarray(image.convert("RGB"))
    except InputFileError:
        raise
    except Exception as error:
        raise InputFileError(
            path, f"unreadable or corrupt mask ({' '.join(str(error).split())[:160]})"
        ) from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    labels = _to_labels(np.asarray(array), path, binary)
    labels.setflags(write=False)
    return labels


def read_mask_2d(path: Path, binary: bool = False) -> np.ndarray:
    """An (H, W) integer label map from a PNG/JPEG/BMP/TIFF mask (read-only array, cached)."""
    return _read_mask_2d_cached(_stamp(Path(path)), binary)


@functools.lru_cache(maxsize=2)
def _read_label_volume_cached(stamp: tuple[str, int, int]) -> np.ndarray:
    volume = read_volume(stamp[0])
    raw = volume.array
    rounded = np.rint(raw)
    if not np.array_equal(rounded, raw):
        raise InputFileError(stamp[0], "label volume holds non-integer values")
    if raw.size and float(raw.min()) < 0:
        raise InputFileError(stamp[0], f"label volume holds negative values ({float(raw.min()):g})")
    top = float(raw.max()) if raw.size else 0.0
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
    labels = rounded.astype(dtype)
    labels.setflags(write=False)
    return labels


def read_label_volume(path: Path) -> np.ndarray:
    """A (Z, Y, X) integer label volume, read with the same reader and axis order as the images."""
    return _read_label_volume_cached(_stamp(Path(path)))


@functools.lru_cache(maxsize=2)
def _read_volume_cached(stamp: tuple[str, int, int]):
    return read_volume(stamp[0])


def read_volume_cached(path: Path):
    """``read_volume`` with a small cache: consecutive slices of one volume decode it once."""
    return _read_volume_cached(_stamp(Path(path)))


def verify_image(path: Path) -> None:
    """Decode an image or volume fully, raising :class:`InputFileError` if it is corrupt."""
    if is_volume_file(path):
        read_volume_cached(path)
    else:
        from medsam3.data.image_io import read_image

        read_image(path)


def clear_caches() -> None:
    """Forget cached masks and volumes (tests that rewrite files in place use this)."""
    _read_mask_2d_cached.cache_clear()
    _read_label_volume_cached.cache_clear()
    _read_volume_cached.cache_clear()
