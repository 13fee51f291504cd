"""Building blocks shared by the phantom generators: the case record, seeding, shapes, textures.

Every generator draws from one ``numpy.random.Generator`` per case, seeded from (seed, kind, case
index), so case 7 is the same whether 8 or 80 cases are generated.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon


@dataclass
class PhantomCase:
    """One generated case: an image, its label map (one value per concept) and where it came from.

    ``image``/``label`` shapes: 2D (H, W) or (H, W, 3); 3D (Z, Y, X); video (T, H, W, 3) with a
    label map (T, H, W) whose values are object ids (see ``meta["objects"]``).
    ``spacing`` is in mm per array axis of the label map, or None for photographs.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...] | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PhantomKind:
    """What a phantom kind produces and how it is stored."""

    name: str
    concepts: dict[str, int]  # concept phrase -> label value (video: object ids instead, see meta)
    modality: str
    channel_names: dict[str, str]
    file_ending: str
    default_size: int
    make: Callable[[np.random.Generator, int], PhantomCase]
    description: str
    layout: str = "nnunet"  # "nnunet" or "video"


def case_rng(kind: str, seed: int, index: int) -> np.random.Generator:
    """The generator for one case: independent of how many cases are asked for."""
    return np.random.default_rng([int(seed), zlib.crc32(kind.encode()), int(index)])


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]
) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    field_ = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    std = float(field_.std())
    return (field_ - field_.mean()) / (std if std > 0 else 1.0)


def band_noise(rng: np.random.Generator, shape: tuple[int, ...], fine: float, coarse: float) -> np.ndarray:
    """Band-pass noise (difference of Gaussians): its zero crossings draw curvy networks."""
    white = rng.standard_normal(shape).astype(np.float32)
    band = ndi.gaussian_filter(white, fine, mode="wrap") - ndi.gaussian_filter(white, coarse, mode="wrap")
    std = float(band.std())
    return band / (std if std > 0 else 1.0)


def radial_profile(
    rng: np.random.Generator, irregularity: float, harmonics: int, n_points: int = 96
) -> tuple[np.ndarray, np.ndarray]:
    """Angles and relative radii of a star-shaped outline: 1 + sum of decaying random harmonics."""
    theta = np.linspace(0.0, 2.0 * np.pi, n_points, endpoint=False)
    k = np.arange(2, harmonics + 2)[:, None]
    amp = irregularity * rng.standard_normal(harmonics)[:, None] / k**0.8
    phase = rng.uniform(0, 2 * np.pi, harmonics)[:, None]
    rel = 1.0 + (amp * np.cos(k * theta[None] + phase)).sum(axis=0)
    return theta, np.clip(rel, 0.35, 1.8)


def outline_mask(
    shape: tuple[int, int],
    center: tuple[float, float],
    radius: float,
    theta: np.ndarray,
    rel: np.ndarray,
    aspect: float = 1.0,
    angle: float = 0.0,
) -> np.ndarray:
    """Rasterise a star-shaped outline (rows scaled by ``aspect``, rotated by ``angle``) as a mask."""
    r = radius * rel
    dy, dx = r * np.sin(theta) * aspect, r * np.cos(theta)
    ca, sa = np.cos(angle), np.sin(angle)
    rows = center[0] + dy * ca + dx * sa
    cols = center[1] - dy * sa + dx * ca
    mask = np.zeros(shape, dtype=bool)
    rr, cc = draw_polygon(rows, cols, shape=shape)
    mask[rr, cc] = True
    return mask


def random_blob(
    rng: np.random.Generator,
    shape: tuple[int, int],
    center: tuple[float, float],
    radius: float,
    irregularity: float = 0.15,
    harmonics: int = 5,
    aspect: float = 1.0,
) -> np.ndarray:
    """An irregular blob: ellipse-like for small ``irregularity``, lobulated or spiculated for larger."""
    theta, rel = radial_profile(rng, irregularity, harmonics)
    return outline_mask(shape, center, radius, theta, rel, aspect, rng.uniform(0, np.pi))


def apart(mask: np.ndarray, occupied: np.ndarray, gap: int = 1) -> bool:
    """True when ``mask`` is non-empty and at least ``gap`` background pixels away from ``occupied``."""
    if not mask.any():
        return False
    # Full (8- or 26-neighbour) dilation: masks kept apart by it stay apart under any connectivity.
    grown = ndi.binary_dilation(mask, structure=np.ones((3,) * mask.ndim, dtype=bool), iterations=gap)
    return not bool((grown & occupied).any())


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clip a [0, 1] float image to 8 bits."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
