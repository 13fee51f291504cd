"""Uploaded bytes in, a decoded image or volume out, through the toolkit's own validating readers.

Nothing the client sends names a file on the server: the upload is stored under a name the server
picks (``upload`` plus an ending from a fixed list, chosen from the client's file name or sniffed
from the bytes), a zipped DICOM series is unpacked member by member into numbered files (member
names are ignored, so "../" cannot escape), and every size is bounded while reading, not after.
Errors name the client's file, never a server path.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from medsam3.data.image_io import MedicalImage, read_image
from medsam3.data.volume_io import Volume, read_volume
from medsam3.errors import InputFileError, MedSAM3Error
from medsam3.serve.settings import MiB, ServeSettings

log = logging.getLogger("medsam3.serve")

#: client file ending -> (kind, format name). Only these are ever written.
FORMATS: dict[str, tuple[str, str]] = {
    ".png": ("image", "png"),
    ".jpg": ("image", "jpeg"),
    ".jpeg": ("image", "jpeg"),
    ".bmp": ("image", "bmp"),
    ".tif": ("image", "tiff"),
    ".tiff": ("image", "tiff"),
    ".dcm": ("image", "dicom"),
    ".dicom": ("image", "dicom"),
    ".nii.gz": ("volume", "nifti"),
    ".nii": ("volume", "nifti"),
    ".nrrd": ("volume", "nrrd"),
    ".mha": ("volume", "mha"),
    ".zip": ("volume", "dicom-series"),
}
_CHUNK = 1 * MiB
_NAME_CHARS = re.compile(r"[^\w .()+,=@-]")
_warnings_lock = threading.Lock()  # warnings.catch_warnings is process-wide state


class UploadError(MedSAM3Error):
    """An upload refused before or while reading it, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass
class Decoded:
    """What an upload turned out to be."""

    kind: str  # "image" or "volume"
    fmt: str
    name: str
    image: MedicalImage | None = None
    volume: Volume | None = None
    notes: list[str] = field(default_factory=list)
    stored: Path | None = None  # the stored upload (a 2D DICOM is re-read to write DICOM-SEG)

    @property
    def nbytes(self) -> int:
        if self.image is not None:
            return int(self.image.rgb.nbytes + self.image.raw.nbytes)
        return int(self.volume.array.nbytes) if self.volume is not None else 0


def display_name(client_name: str | None) -> str:
    """The client's file name as text for messages: last path part, odd characters replaced, short."""
    name = (client_name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _NAME_CHARS.sub("_", name).strip(" .") or "upload"
    return name[:100]


def ending_of(name: str) -> str | None:
    lower = name.lower()
    for ending in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(ending):
            return ending
    return None


def _sniff(head: bytes) -> str | None:
    """An ending for bytes whose name said nothing usable."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ".dcm"
    if head.startswith(b"PK\x03\x04"):
        return ".zip"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    if head.startswith(b"\x1f\x8b"):
        return ".nii.gz"
    if head.startswith(b"NRRD"):
        return ".nrrd"
    return None


def store_upload(stream: BinaryIO, client_name: str | None, directory: Path, settings: ServeSettings) -> Path:
    """Copy the upload into ``directory`` under a server-chosen name, at most ``max_upload_bytes``."""
    name = display_name(client_name)
    ending = ending_of(name)
    head = stream.read(132)
    if ending is None:
        ending = _sniff(head)
        if ending is None:
            shown = Path(name).suffix or "no file ending"
            raise UploadError(415, f"{name}: unsupported file type ({shown}); upload " + ", ".join(sorted(FORMATS)))
    target = directory / f"upload{ending}"
    partial = directory / f".partial{ending}"
    size = len(head)
    try:
        with open(partial, "wb") as out:
            out.write(head)
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise UploadError(
                        413, f"{name}: larger than the server's upload limit of {_mb(settings.max_upload_bytes)}"
                    )
                out.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _mb(nbytes: int) -> str:
    return f"{nbytes / MiB:.0f} MB" if nbytes >= MiB else f"{nbytes} bytes"


# ----------------------------------------------------------------------------- size checks before decoding


def _header_size(path: Path, fmt: str) -> tuple[int, int] | None:
    """(values per frame, frames) as the file's header declares them; None when it cannot tell."""
    try:
        if fmt in ("png", "jpeg", "bmp"):
            from PIL import Image

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(path) as image:
                        return image.width * image.height, 1
            except Image.DecompressionBombError:
                return -1, 1  # more than PIL itself would decode
        if fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return (int(np.prod(tif.series[0].shape)), 1) if tif.series else None
        if fmt == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return int(ds.Rows) * int(ds.Columns), int(getattr(ds, "NumberOfFrames", 1) or 1)
        if fmt in ("nifti", "nrrd", "mha"):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return int(np.prod(reader.GetSize())), 1
    except Exception:  # the real reader will explain what is wrong with the file
        return None
    return None


def _check_header_size(path: Path, kind: str, fmt: str, name: str, settings: ServeSettings) -> bool:
    """Refuse grids too large to decode (a small compressed file can declare a huge one) before decoding.

    Returns whether the file holds several frames (a multi-frame DICOM, read as a volume).
    """
    found = _header_size(path, fmt)
    if found is None:
        return False
    per_frame, frames = found
    volume = kind == "volume" or frames > 1
    count, limit = per_frame * frames, settings.max_voxels if volume else settings.max_pixels
    what = "voxels" if volume else "pixels"
    if count < 0:
        raise UploadError(413, f"{name}: more {what} than the server's limit of {limit:,}")
    if count > limit:
        raise UploadError(413, f"{name}: {count:,} {what} is more than the server's limit of {limit:,}")
    return frames > 1


# ----------------------------------------------------------------------------- zipped DICOM series


def unzip_series(archive: Path, folder: Path, name: str, settings: ServeSettings) -> Path:
    """Unpack the DICOM files of ``archive`` into ``folder`` as 00000.dcm, 00001.dcm, ... (names ignored)."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InputFileError(name, f"not a readable zip archive ({error})") from None
    folder.mkdir()
    kept, total = 0, 0
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > settings.max_zip_members:
            raise UploadError(
                413, f"{name}: {len(members)} files in the archive; the limit is {settings.max_zip_members}"
            )
        for number, member in enumerate(members):
            if member.flag_bits & 0x1:
                raise InputFileError(name, "the zip archive is encrypted")
            out = folder / f"{number:05d}.dcm"
            try:
                with zf.open(member) as src, open(out, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > settings.max_unzipped_bytes:
                            limit = _mb(settings.max_unzipped_bytes)
                            raise UploadError(413, f"{name}: unpacks to more than the server's limit of {limit}")
                        dst.write(chunk)
            except UploadError:
                raise
            except Exception as error:  # BadZipFile, zlib.error, EOFError, NotImplementedError (compression)
                raise InputFileError(name, f"corrupt zip archive ({' '.join(str(error).split())[:160]})") from None
            with open(out, "rb") as handle:
                head = handle.read(132)
            if head[128:132] == b"DICM":
                kept += 1
            else:
                out.unlink()
    if kept == 0:
        raise InputFileError(name, "the zip archive holds no DICOM files (Part 10, with the 'DICM' header)")
    return folder


# ----------------------------------------------------------------------------- decoding


def _public(message: str, directory: Path, name: str) -> str:
    """A reader's message with server paths replaced by the client's file name."""
    for path in sorted({str(p) for p in (directory / "series", *directory.glob("upload*"))}, key=len, reverse=True):
        message = message.replace(path, name)
    return message.replace(str(directory), name)


def decode_upload(
    path: Path, client_name: str | None, settings: ServeSettings, *, series_uid: str | None = None
) -> Decoded:
    """Read a stored upload with the toolkit's readers; every failure is a :class:`MedSAM3Error`."""
    name = display_name(client_name)
    ending = ending_of(path.name) or ""
    kind, fmt = FORMATS[ending]
    directory = path.parent
    if path.stat().st_size == 0:
        raise InputFileError(name, "is an empty file (0 bytes)")
    try:
        with _warnings_lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoded = _decode(path, kind, fmt, name, settings, series_uid)
    except MedSAM3Error as error:
        if isinstance(error, InputFileError):
            raise InputFileError(name, _public(error.problem, directory, name)) from None
        error.args = (_public(str(error), directory, name),)
        raise
    except MemoryError:
        raise UploadError(413, f"{name}: too large to decode in the server's memory") from None
    except Exception as error:  # a reader's library failed on odd bytes: still the file's fault
        reason = _public(" ".join(str(error).split())[:200], directory, name)
        log.warning("upload %s could not be decoded: %s: %s", name, type(error).__name__, reason)
        raise InputFileError(name, f"could not be read ({type(error).__name__}: {reason})") from None
    decoded.notes = [_public(str(w.message), directory, name) for w in caught if _worth_telling(w)]
    if decoded.nbytes > settings.max_session_bytes:
        raise UploadError(413, f"{name}: decoded it needs {_mb(decoded.nbytes)}, more than the server holds per upload")
    return decoded


def _worth_telling(record: warnings.WarningMessage) -> bool:
    return not issubclass(record.category, (DeprecationWarning, PendingDeprecationWarning, ResourceWarning))


def _decode(path: Path, kind: str, fmt: str, name: str, settings: ServeSettings, series_uid: str | None) -> Decoded:
    if fmt == "dicom-series":
        folder = unzip_series(path, path.parent / "series", name, settings)
        path.unlink()  # the archive is not needed once unpacked
        volume = read_volume(folder, series_uid=series_uid)
        return _volume(volume, fmt, name, settings)
    multi_frame = _check_header_size(path, kind, fmt, name, settings)
    if kind == "volume" or multi_frame:
        return _volume(read_volume(path), "dicom-multiframe" if multi_frame else fmt, name, settings)
    image = read_image(path)
    if image.rgb.shape[0] * image.rgb.shape[1] > settings.max_pixels:
        raise UploadError(413, f"{name}: {image.height * image.width:,} pixels is more than the server's limit")
    image.path = Path(name)
    return Decoded(kind="image", fmt=fmt, name=name, image=image, stored=path)


def _volume(volume: Volume, fmt: str, name: str, settings: ServeSettings) -> Decoded:
    if volume.array.size > settings.max_voxels:
        raise UploadError(
            413, f"{name}: {volume.array.size:,} voxels is more than the server's limit of {settings.max_voxels:,}"
        )
    volume.path = Path(name)
    return Decoded(kind="volume", fmt=fmt, name=name, volume=volume)


def remove_tree(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
