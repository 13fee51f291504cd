"""Video in and out: MP4/AVI (PyAV), folders of frames, multi-frame DICOM cine; overlay MP4s out.

Frames are decoded one at a time as the caller iterates, so a long clip never sits in memory.
Every source yields (H, W, 3) uint8 RGB frames of one size; a frame of another size, a frame that
does not decode, or a file that is not a video raises :class:`~medsam3.errors.InputFileError`
naming the file (and the frame). A folder of frames is checked for equal sizes before the first
frame is decoded, so nothing downstream starts on a clip that cannot finish.

Gray or 16-bit DICOM cine is displayed with the file's own VOI window when it has one, else with
one percentile stretch computed on the first frame and kept for the whole clip (a per-frame
stretch would make the clip flicker).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from medsam3.errors import InputFileError
from medsam3.utils.files import file_suffix

#: Container formats read with PyAV (FFmpeg).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg")
#: Image files a frame folder may hold (sorted by name, numbers in natural order).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: Used when a source records no frame rate (frame folders, DICOM without timing).
DEFAULT_FPS = 10.0


@dataclass
class Video:
    """A clip opened for streaming. Iterate it for (H, W, 3) uint8 frames, decoded one at a time."""

    path: Path
    kind: str  # "container" (mp4/avi...), "frames" (a folder) or "dicom" (multi-frame cine)
    fps: float
    size: tuple[int, int]  # (height, width) of every frame
    frame_count: int | None  # None when the container does not say
    _open: Callable[[], Iterator[np.ndarray]] = field(repr=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for index, frame in enumerate(self._open()):
            if frame.shape[:2] != self.size:
                raise InputFileError(
                    self.path,
                    f"frame {index} is {frame.shape[1]}x{frame.shape[0]} but the clip is "
                    f"{self.size[1]}x{self.size[0]}: frames of varying size are not supported",
                )
            yield frame


def _natural_key(path: Path) -> list:
    """'frame_2' before 'frame_10': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def read_video(path: str | Path) -> Video:
    """Open an MP4/AVI/... file, a folder of PNG/JPEG/TIFF frames, or a multi-frame DICOM file."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or folder")
    if path.is_dir():
        return _frame_folder(path)
    if path.stat().st_size == 0:
        raise InputFileError(path, "is an empty file (0 bytes)")
    suffix = file_suffix(path)
    if suffix in DICOM_SUFFIXES or _is_dicom(path):
        return _dicom_cine(path)
    if suffix in VIDEO_SUFFIXES:
        return _container(path)
    raise InputFileError(
        path,
        f"unsupported video format '{suffix or path.name}'; supported: {', '.join(VIDEO_SUFFIXES)}, "
        "a folder of frames, or a multi-frame DICOM file",
    )


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


# ----------------------------------------------------------------------------- containers (PyAV)


def _av_reason(error: Exception) -> str:
    return " ".join(str(error).split())[:160] or type(error).__name__


def _container(path: Path) -> Video:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputFileError(path, "has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else DEFAULT_FPS
            count = int(stream.frames) or None
            first = next(iter(_decode(path, container)), None)
    except InputFileError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise InputFileError(path, f"not a readable video ({_av_reason(error)})") from None
    if first is None:
        raise InputFileError(path, "the video has no decodable frames")

    def frames() -> Iterator[np.ndarray]:
        try:
            with av.open(str(path)) as container:
                yield from _decode(path, container)
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise InputFileError(path, f"video stops decoding ({_av_reason(error)})") from None

    return Video(path, "container", fps, tuple(first.shape[:2]), count, frames)  # type: ignore[arg-type]


def _decode(path: Path, container) -> Iterator[np.ndarray]:
    import av

    index = 0
    try:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")
            index += 1
    except av.error.FFmpegError as error:
        raise InputFileError(path, f"frame {index} does not decode ({_av_reason(error)})") from None


# ----------------------------------------------------------------------------- frame folders


def _frame_folder(folder: Path) -> Video:
    """Sorted image files of one size; sizes are checked from the headers before decoding."""
    from PIL import Image, UnidentifiedImageError

    from medsam3.data.image_io import read_image

    files = sorted((p for p in folder.iterdir() if p.is_file() and file_suffix(p) in FRAME_SUFFIXES), key=_natural_key)
    if not files:
        raise InputFileError(folder, f"no frames in this folder (looked for {', '.join(FRAME_SUFFIXES)} files)")
    sizes: dict[tuple[int, int], Path] = {}
    for file in files:
        try:
            with Image.open(file) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as error:
            raise InputFileError(file, f"not a readable image frame ({_av_reason(error)})") from None
        sizes.setdefault((height, width), file)
    if len(sizes) > 1:
        (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
        raise InputFileError(
            folder,
            f"frames of varying size: {file_a.name} is {size_a[1]}x{size_a[0]}, {file_b.name} is "
            f"{size_b[1]}x{size_b[0]}; all frames of a clip must have one size",
        )

    def frames() -> Iterator[np.ndarray]:
        for file in files:
            yield read_image(file).rgb

    return Video(folder, "frames", DEFAULT_FPS, next(iter(sizes)), len(files), frames)


# ----------------------------------------------------------------------------- DICOM cine


def _dicom_fps(ds) -> float:
    """Frame rate from Cine Rate, Recommended Display Frame Rate or Frame Time (ms), in that order."""
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        value = getattr(ds, keyword, None)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    frame_time = getattr(ds, "FrameTime", None)
    if frame_time not in (None, "") and float(frame_time) > 0:
        return 1000.0 / float(frame_time)
    return DEFAULT_FPS


def _first_number(value) -> float | None:
    """A DICOM number that may be multi-valued (several windows): the first one, or None."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _gray_display(ds, first: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """One mapping from stored gray values to uint8 for the whole clip (no flicker)."""
    from medsam3.data.windowing import apply_window, gray_to_rgb, to_uint8

    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    center = _first_number(getattr(ds, "WindowCenter", None))
    width = _first_number(getattr(ds, "WindowWidth", None))
    if center is None or width is None or width <= 0:
        values = first.astype(np.float32) * slope + intercept
        low, high = np.percentile(values, [0.5, 99.5])
        center, width = (low + high) / 2, max(float(high - low), 1e-6)
    invert = str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"

    def display(frame: np.ndarray) -> np.ndarray:
        unit = apply_window(frame.astype(np.float32) * slope + intercept, center, width)
        return gray_to_rgb(to_uint8(1.0 - unit if invert else unit))

    return display


def _dicom_cine(path: Path) -> Video:
    import pydicom
    from pydicom.pixels import iter_pixels

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # pydicom raises InvalidDicomError, OSError, ValueError...
        raise InputFileError(path, f"not a readable DICOM file ({_av_reason(error)})") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise InputFileError(path, "DICOM file has no image (no Rows/Columns)")
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    size = (int(ds.Rows), int(ds.Columns))

    def raw_frames() -> Iterator[np.ndarray]:
        index = 0
        try:
            for frame in iter_pixels(path):  # decodes (and converts YBR to RGB) one frame at a time
                yield frame
                index += 1
        except Exception as error:
            raise InputFileError(path, f"DICOM frame {index} does not decode ({_av_reason(error)})") from None

    def frames() -> Iterator[np.ndarray]:
        display = None
        for frame in raw_frames():
            if samples == 3:
                yield np.ascontiguousarray(frame if frame.dtype == np.uint8 else np.clip(frame, 0, 255), np.uint8)
                continue
            if display is None:
                display = _gray_display(ds, frame)
            yield display(frame)

    return Video(path, "dicom", _dicom_fps(ds), size, count, frames)


# ----------------------------------------------------------------------------- writing


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even height and width (edge pixels repeated): H.264 in yuv420p needs even sizes."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> int:
    """Encode (H, W, 3) uint8 frames as an MP4 (H.264, or MPEG-4 Part 2 without libx264), atomically.

    Odd sizes are padded by one pixel to even (a yuv420p requirement). Returns the frame count;
    a clip with no frames, or frames of varying size, is refused and no file is left behind.
    """
    import av

    from medsam3.errors import MedSAM3Error
    from medsam3.utils.files import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise MedSAM3Error(f"{path}: overlay videos are written as .mp4")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    if not fps > 0:
        raise MedSAM3Error(f"{path}: frame rate must be positive, got {fps}")
    rate = Fraction(float(fps)).limit_denominator(1001)  # 29.97 fps is 30000/1001
    written = 0
    size = None
    with atomic_path(path, suffix=".mp4") as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = None
            for frame in frames:
                frame = np.asarray(frame)
                if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                    raise MedSAM3Error(f"{path}: frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
                if size is None:
                    size = frame.shape[:2]
                    stream = container.add_stream(codec, rate=rate)
                    stream.height, stream.width = _even(frame).shape[:2]
                    stream.pix_fmt = "yuv420p"
                    stream.options = {"crf": "18"} if codec == "libx264" else {"qscale": "3"}
                elif frame.shape[:2] != size:
                    raise MedSAM3Error(f"{path}: frame {written} is {frame.shape[:2]}, the clip is {size}")
                for packet in stream.encode(av.VideoFrame.from_ndarray(_even(frame), format="rgb24")):
                    container.mux(packet)
                written += 1
            if stream is None:
                raise MedSAM3Error(f"{path}: no frames to write")
            for packet in stream.encode():
                container.mux(packet)
    return written
