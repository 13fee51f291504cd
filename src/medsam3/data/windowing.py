"""Intensity windowing: turn raw scanner values (HU, MR signal, 16-bit counts) into [0, 1] for display.

SAM 3 sees 8-bit RGB. CT values are Hounsfield units spanning about -1024..3000, so a window
(center, width) picks the tissue range worth seeing; MR, ultrasound and fluorescence have no
absolute scale, so a robust percentile stretch is used instead.

Window presets follow common radiology practice (level/width, HU). Bone uses the widespread
(400, 1800) setting rather than the narrower (300, 1500) variant.
"""

from __future__ import annotations

import math
import re

import numpy as np

from medsam3.errors import InputFileError, MedSAM3Error

#: Named CT windows: name -> (center, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

#: The window applied to CT when neither the caller nor the file names one.
DEFAULT_CT_WINDOW = "abdomen"

Window = tuple[float, float]


class WindowError(MedSAM3Error):
    """A window specification that cannot be used (unknown preset, bad numbers)."""


def _known() -> str:
    return ", ".join(f"{name} ({c:g},{w:g})" for name, (c, w) in WINDOW_PRESETS.items())


def parse_window(spec: str | tuple[float, float] | list[float] | None) -> Window | None:
    """Read a window given as a preset name ("lung"), "center,width" ("40,400") or a pair.

    ``None`` stays ``None`` (meaning: let the file or the modality decide).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        key = text.lower().replace("-", "_").replace(" ", "_")
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        parts = [p for p in re.split(r"[,/:;\s]+", text) if p]
        if len(parts) != 2:
            raise WindowError(
                f"unknown window '{spec}': give CENTER,WIDTH (e.g. 40,400) or a preset: {_known()}"
            )
        try:
            values = (float(parts[0]), float(parts[1]))
        except ValueError:
            raise WindowError(
                f"unknown window '{spec}': give CENTER,WIDTH (e.g. 40,400) or a preset: {_known()}"
            ) from None
    else:
        try:
            values = tuple(float(v) for v in spec)
        except (TypeError, ValueError):
            raise WindowError(
                f"window {spec!r} must be two numbers (center, width) or a preset name"
            ) from None
        if len(values) != 2:
            raise WindowError(f"window {spec!r} must be two numbers (center, width), got {len(values)}")
    center, width = values
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise WindowError(
            f"window center {center:g}, width {width:g}: width must be a positive finite number"
        )
    return (center, width)


def apply_window(raw: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``[center - width/2, center + width/2]`` linearly onto [0, 1], clipping outside (float32)."""
    if not width > 0:
        raise WindowError(f"window width must be positive, got {width:g}")
    low = center - width / 2.0
    out = (np.asarray(raw, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_normalize(raw: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """Stretch the ``lo``..``hi`` percentile range of ``raw`` onto [0, 1] (float32), ignoring NaN.

    Robust to a few hot pixels, which a plain min/max stretch is not. A constant image maps to 0.
    Colour images are stretched jointly over all channels so their balance is kept.
    """
    if not 0.0 <= lo < hi <= 100.0:
        raise WindowError(f"percentiles must satisfy 0 <= lo < hi <= 100, got lo={lo}, hi={hi}")
    data = np.asarray(raw, dtype=np.float32)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.float32)
    p_lo, p_hi = np.percentile(finite, [lo, hi])
    if p_hi <= p_lo:
        # Nearly constant: fall back to the full range so a tiny bright object still shows.
        p_lo, p_hi = float(finite.min()), float(finite.max())
        if p_hi <= p_lo:
            return np.zeros(data.shape, dtype=np.float32)
    out = (data - np.float32(p_lo)) / np.float32(p_hi - p_lo)
    out = np.clip(out, 0.0, 1.0, out=out)
    out[~np.isfinite(out)] = 0.0
    return out


def looks_like_hu(raw: np.ndarray) -> bool:
    """Guess whether ``raw`` holds CT Hounsfield units: lots of air near -1000, nothing absurdly high.

    Used only when the modality is unknown (NIfTI/NRRD carry none). MR and microscopy data are
    non-negative, so a clearly negative low percentile is a strong CT signal.
    """
    data = np.asarray(raw)
    if data.size == 0 or not np.issubdtype(data.dtype, np.number):
        return False
    sample = data.reshape(-1)
    if sample.size > 1_000_000:
        sample = sample[:: sample.size // 1_000_000]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return False
    p1 = float(np.percentile(sample, 1))
    top = float(sample.max())
    # Air is -1000 HU; scanners pad outside the field of view with -1024, -2048 or -3024.
    return -3100.0 <= p1 <= -500.0 and top <= 32767.0


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """Round [0, 1] floats to uint8 0..255."""
    return np.clip(np.rint(np.asarray(unit, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """Repeat an (H, W) image over three channels, which is what SAM 3 takes."""
    return np.repeat(np.asarray(gray)[..., None], 3, axis=-1)


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Any in-memory image as the (H, W, 3) uint8 picture SAM 3 (and every overlay) takes.

    Shapes: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha dropped). Values: uint8 as they are;
    bool as 0/255; other numbers in [0, 1] scaled by 255, in [0, 255] rounded, and anything wider
    (16-bit counts, HU) percentile-stretched like a deep file in :mod:`medsam3.data.image_io`.
    NaN or infinite pixels, and empty images, raise :class:`~medsam3.errors.InputFileError`.
    Returns a writable, C-contiguous array (a copy when the input was read-only).
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., 0] if array.shape[2] == 1 else array[..., :3]
    if array.ndim not in (2, 3):
        raise InputFileError(name, f"expected an (H, W) or (H, W, 3) image, got shape {np.asarray(image).shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputFileError(name, "empty image (0 pixels)")
    if array.dtype == bool:
        array = array.astype(np.uint8) * np.uint8(255)
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise InputFileError(name, f"unsupported pixel type {array.dtype}")
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            what = "NaN" if np.isnan(values).any() else "infinite"
            raise InputFileError(name, f"image contains {what} values")
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            array = to_uint8(values)
        elif low >= 0.0 and high <= 255.0:
            array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        else:
            array = to_uint8(percentile_normalize(values))
    if array.ndim == 2:
        array = gray_to_rgb(array)
    return np.array(array, order="C", copy=True) if not array.flags.writeable else np.ascontiguousarray(array)
