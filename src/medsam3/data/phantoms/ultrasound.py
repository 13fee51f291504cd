"""Breast ultrasound, B-mode (BUSI look): layered anatomy, speckle, lesions with their acoustic signs.

The echo map (tissue reflectivity) holds skin, subcutaneous fat with Cooper's ligaments,
fibroglandular tissue and the pectoral muscle. A "breast tumor" is hypoechoic with an irregular
(lobulated or spiculated) margin and casts a posterior acoustic shadow; a "breast cyst" is anechoic,
oval, smooth, with posterior enhancement. About a quarter of the cases hold neither (negatives).
Speckle is fully developed: the envelope of band-limited complex Gaussian scattering (Rayleigh
amplitude) multiplies the echo map; depth attenuation, log compression to a 45-60 dB dynamic range,
and for a third of the cases a convex-probe sector scan conversion, finish the picture.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from medsam3.data.phantoms.common import (
    PhantomCase,
    PhantomKind,
    band_noise,
    outline_mask,
    radial_profile,
    smooth_noise,
    to_uint8,
)

CONCEPTS = {"breast tumor": 1, "breast cyst": 2}


def _layer_boundary(rng: np.random.Generator, width: int, mean: float, wobble: float) -> np.ndarray:
    """A depth (fraction of the image) per column that undulates smoothly."""
    return mean + wobble * smooth_noise(rng, (width,), width / 6.0)


def _tissue_echo(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Reflectivity of normal breast tissue, by layer."""
    depth_px, width = shape
    z = (np.arange(depth_px, dtype=np.float32) / depth_px)[:, None]
    skin_end = _layer_boundary(rng, width, 0.05, 0.005)[None]
    fat_end = _layer_boundary(rng, width, rng.uniform(0.15, 0.3), 0.03)[None]
    muscle_start = _layer_boundary(rng, width, rng.uniform(0.72, 0.85), 0.03)[None]
    muscle_end = muscle_start + rng.uniform(0.08, 0.12)

    fat = 0.22 * (1 + 0.2 * smooth_noise(rng, shape, 3.0))
    ligaments = np.exp(-((band_noise(rng, shape, 1.0, 6.0) / 0.12) ** 2))  # thin bright curvy septa
    fat = fat + 0.6 * ligaments
    gland = 0.75 * (1 + 0.35 * smooth_noise(rng, shape, (1.5, 4.0))).clip(0.2, None)
    muscle = 0.45 * (1 + 0.5 * smooth_noise(rng, shape, (0.6, 8.0))).clip(0.1, None)  # fibre striations
    deep = 0.03 * np.ones(shape, dtype=np.float32)

    echo = np.where(z < skin_end, 1.2, np.where(z < fat_end, fat, gland))
    echo = np.where((z >= muscle_start) & (z < muscle_end), muscle, echo)
    echo = np.where(z >= muscle_end, deep, echo)
    fascia = np.abs(z - muscle_start) < 0.012  # bright fascia line on top of the muscle
    return np.where(fascia, 1.3, echo).astype(np.float32)


def _lesion(
    rng: np.random.Generator, shape: tuple[int, int], cyst: bool, avoid: np.ndarray
) -> np.ndarray | None:
    """A lesion mask in the glandular layer, clear of ``avoid`` by a few pixels."""
    size = shape[0]
    for _ in range(20):
        if cyst:
            radius = rng.uniform(0.05, 0.11) * size
            theta, rel = radial_profile(rng, 0.03, 3)
            aspect = rng.uniform(0.55, 0.85)  # wider than tall
        else:
            radius = rng.uniform(0.08, 0.18) * size
            theta, rel = radial_profile(rng, rng.uniform(0.15, 0.35), rng.integers(5, 14))
            aspect = rng.uniform(0.7, 1.25)  # malignant masses may be taller than wide
        center = (rng.uniform(0.3, 0.6) * size, rng.uniform(0.2, 0.8) * size)
        mask = outline_mask(shape, center, radius, theta, rel, aspect, rng.uniform(-0.3, 0.3))
        if mask.sum() >= 12 and not (ndi.binary_dilation(mask, iterations=4) & avoid).any():
            return mask
    return None


def _posterior(mask: np.ndarray, size: int) -> np.ndarray:
    """Soft weight of the region below a lesion (shadow or enhancement travels with the beam)."""
    below = np.maximum.accumulate(mask, axis=0) & ~mask
    return ndi.gaussian_filter(below.astype(np.float32), (1.0, 0.015 * size + 0.5))


def _speckle(rng: np.random.Generator, shape: tuple[int, int], size: int) -> np.ndarray:
    """Rayleigh-distributed speckle with an axial/lateral resolution cell, mean power 1."""
    sigma = (0.5 * size / 128 + 0.3, 1.1 * size / 128 + 0.3)
    re = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    im = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    envelope = np.hypot(re, im)
    return envelope / np.sqrt(np.mean(envelope**2))


def _scan_convert(
    image: np.ndarray, label: np.ndarray, half_angle: float, apex: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample (depth, angle) beam data onto a Cartesian sector, as a convex probe displays it."""
    depth_px, width = image.shape
    out = image.shape
    rows, cols = np.mgrid[0 : out[0], 0 : out[1]].astype(np.float32)
    # Apex sits ``apex`` pixels above the image top; depth spans the remaining height.
    span = out[0] - 1
    y, x = rows + apex, cols - (out[1] - 1) / 2.0
    radius = np.hypot(x, y)
    angle = np.arctan2(x, y)
    src_r = (radius - apex) / span * (depth_px - 1)
    src_c = (angle / half_angle + 1.0) / 2.0 * (width - 1)
    inside = (src_r >= 0) & (src_r <= depth_px - 1) & (np.abs(angle) <= half_angle)
    coords = np.stack([src_r, src_c])
    img = ndi.map_coordinates(image.astype(np.float32), coords, order=1, mode="nearest")
    lab = ndi.map_coordinates(label, coords, order=0, mode="nearest")
    return np.where(inside, img, 0).astype(np.uint8), np.where(inside, lab, 0).astype(np.uint8)


def make_ultrasound(rng: np.random.Generator, size: int) -> PhantomCase:
    """One B-mode frame: tumour (60 %), cyst (35 %), both, or neither."""
    shape = (size, size)
    echo = _tissue_echo(rng, shape)
    label = np.zeros(shape, dtype=np.uint8)
    lesions: list[str] = []

    if rng.random() < 0.6:
        tumor = _lesion(rng, shape, cyst=False, avoid=label > 0)
        if tumor is not None:
            inside = rng.uniform(0.03, 0.09) * (1 + 0.4 * smooth_noise(rng, shape, 2.0)).clip(0.2, None)
            if rng.random() < 0.4:  # echogenic halo around an invasive margin
                halo = ndi.binary_dilation(tumor, iterations=max(1, size // 64)) & ~tumor
                echo = np.where(halo, echo * 1.6, echo)
            echo = np.where(tumor, inside, echo)
            echo = echo * (1.0 - rng.uniform(0.35, 0.75) * _posterior(tumor, size))
            label[tumor] = CONCEPTS["breast tumor"]
            lesions.append("breast tumor")
    if rng.random() < 0.35:
        cyst = _lesion(rng, shape, cyst=True, avoid=label > 0)
        if cyst is not None:
            echo = np.where(cyst, 0.015, echo)
            echo = echo * (1.0 + rng.uniform(0.5, 0.9) * _posterior(cyst, size))
            label[cyst] = CONCEPTS["breast cyst"]
            lesions.append("breast cyst")

    depth = (np.arange(size, dtype=np.float32) / size)[:, None]
    attenuation = np.exp(-rng.uniform(0.4, 1.0) * depth)  # what time-gain compensation leaves over
    amplitude = echo * attenuation * _speckle(rng, shape, size) + 1e-4
    decibels = 20.0 * np.log10(amplitude)
    dynamic_range = rng.uniform(45.0, 60.0)
    top = np.percentile(decibels, 99.5)
    image = to_uint8(np.clip((decibels - (top - dynamic_range)) / dynamic_range, 0, 1) ** 1.3)

    field_of_view_mm = rng.uniform(35.0, 50.0)
    sector = rng.random() < 1 / 3
    if sector:
        image, label = _scan_convert(
            image, label, np.deg2rad(rng.uniform(25, 35)), rng.uniform(0.15, 0.4) * size
        )
    return PhantomCase(
        case_id="",
        image=image,
        label=label,
        spacing=(field_of_view_mm / size, field_of_view_mm / size),
        meta={
            "probe": "convex" if sector else "linear",
            "dynamic_range_db": round(dynamic_range, 1),
            "lesions": lesions,
        },
    )


KIND = PhantomKind(
    name="ultrasound",
    concepts=CONCEPTS,
    modality="ultrasound",
    channel_names={"0": "ultrasound"},
    file_ending=".png",
    default_size=128,
    make=make_ultrasound,
    description="Breast B-mode ultrasound with Rayleigh speckle: hypoechoic tumours with posterior shadow, "
    "anechoic cysts with posterior enhancement, negatives without either.",
)
