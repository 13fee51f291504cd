"""Dermoscopy photographs (ISIC 2018 look): skin, one pigmented lesion, hairs, dermoscope vignette.

The lesion footprint is star-shaped with many harmonics (irregular, notched border) and a soft
edge. Its colour varies across the lesion (light and dark brown, black, blue-grey, pink mixed by
smooth random weights), darker towards the centre, with a reticular pigment network (zero
crossings of band-pass noise) and dark dots and globules. Hairs are dark quadratic Bezier curves
drawn over everything, lesion included, as in real dermoscopy: the label still covers pixels under
hairs. Some images carry the round black frame of a contact dermoscope.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import bezier_curve, disk

from medsam3.data.phantoms.common import (
    PhantomCase,
    PhantomKind,
    band_noise,
    outline_mask,
    radial_profile,
    smooth_noise,
    to_uint8,
)

CONCEPTS = {"skin lesion": 1}

PIGMENTS = np.array(
    [
        [0.62, 0.42, 0.30],  # light brown
        [0.38, 0.22, 0.14],  # dark brown
        [0.14, 0.09, 0.08],  # black
        [0.40, 0.42, 0.48],  # blue-grey (deep melanin)
        [0.78, 0.48, 0.46],  # pink (vascular, regression)
    ]
)


def _skin(rng: np.random.Generator, shape: tuple[int, int], s: float) -> np.ndarray:
    """Skin albedo with tone variation and fine skin-line texture."""
    tone = np.array([rng.uniform(0.82, 0.93), rng.uniform(0.6, 0.72), rng.uniform(0.5, 0.62)])
    broad = 1.0 + 0.05 * smooth_noise(rng, shape, 12 * s)
    lines = 1.0 + 0.035 * band_noise(rng, shape, 0.8 * s, 3.0 * s)
    redness = np.clip(smooth_noise(rng, shape, 10 * s), 0, None)[..., None] * np.array([0.0, -0.04, -0.03])
    return tone * (broad * lines)[..., None] + redness


def _hairs(rng: np.random.Generator, shape: tuple[int, int], s: float) -> np.ndarray:
    """Coverage [0, 1] of 0-10 dark hairs crossing the image."""
    h, w = shape
    hair = np.zeros(shape, dtype=bool)
    if rng.random() < 0.45:
        for _ in range(rng.integers(1, 11)):
            p = rng.uniform(-0.1, 1.1, (3, 2)) * np.array([h, w])
            rr, cc = bezier_curve(*np.rint(p).astype(int).ravel(), weight=rng.uniform(0.5, 2.0), shape=shape)
            hair[rr, cc] = True
        if s > 1.2:
            hair = ndi.binary_dilation(hair)
    return np.clip(ndi.gaussian_filter(hair.astype(np.float32), 0.5) * 1.6, 0, 1)


def make_dermoscopy(rng: np.random.Generator, size: int) -> PhantomCase:
    """One photograph with one lesion covering roughly 10-40 % of the field."""
    shape = (size, size)
    s = size / 128.0
    rgb = _skin(rng, shape, s)

    theta, rel = radial_profile(rng, rng.uniform(0.1, 0.24), int(rng.integers(6, 17)))
    radius = rng.uniform(0.18, 0.36) * size
    center = (rng.uniform(0.38, 0.62) * size, rng.uniform(0.38, 0.62) * size)
    lesion = outline_mask(shape, center, radius, theta, rel, rng.uniform(0.65, 1.0), rng.uniform(0, np.pi))
    inside = ndi.distance_transform_edt(lesion)
    outside = ndi.distance_transform_edt(~lesion)
    softness = rng.uniform(0.8, 3.0) * s
    alpha = 1.0 / (1.0 + np.exp(-(inside - outside) / softness))  # fuzzy border

    chosen = rng.choice(len(PIGMENTS), size=int(rng.integers(2, 4)), replace=False)
    weights = np.stack([smooth_noise(rng, shape, 6 * s) for _ in chosen], axis=-1) * 2.0
    weights = np.exp(weights - weights.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    pigment = weights @ PIGMENTS[chosen]
    centrality = np.clip(inside / max(inside.max(), 1.0), 0, 1)
    pigment = pigment * (1.0 - 0.35 * centrality[..., None])  # darker centre
    network = np.exp(-((band_noise(rng, shape, 1.0 * s, 3.5 * s) / 0.3) ** 2))
    pigment = pigment * (1.0 - 0.3 * network[..., None])
    dots = np.zeros(shape, dtype=bool)
    coords = np.argwhere(inside > 2 * s)
    for _ in range(rng.integers(0, 15) if len(coords) else 0):
        rr, cc = disk(tuple(coords[rng.integers(len(coords))]), rng.uniform(1.0, 2.2) * s, shape=shape)
        dots[rr, cc] = True
    pigment = np.where(dots[..., None], PIGMENTS[2] * 1.2, pigment)
    rgb = rgb * (1 - alpha[..., None]) + pigment * alpha[..., None]

    hair = _hairs(rng, shape, s)
    rgb = rgb * (1 - hair[..., None]) + np.array([0.1, 0.07, 0.05]) * hair[..., None]

    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(rows - (size - 1) / 2, cols - (size - 1) / 2) / (size / 2)
    light = 1.0 - 0.25 * np.clip(r / 1.41, 0, 1) ** 2 + 0.04 * smooth_noise(rng, shape, 20 * s)
    rgb = rgb * light[..., None] + rng.normal(0, 0.01, rgb.shape)
    label = lesion.astype(np.uint8)
    round_frame = rng.random() < 0.35
    if round_frame:
        ring = r > rng.uniform(1.0, 1.15)
        rgb = np.where(ring[..., None], 0.02, rgb)
        label[ring] = 0
    return PhantomCase(
        case_id="",
        image=to_uint8(np.clip(rgb, 0, 1)),
        label=label,
        spacing=None,
        meta={
            "hairs": bool(hair.any()),
            "round_frame": bool(round_frame),
            "pigments": [int(c) for c in chosen],
        },
    )


KIND = PhantomKind(
    name="dermoscopy",
    concepts=CONCEPTS,
    modality="dermoscopy",
    channel_names={"0": "R", "1": "G", "2": "B"},
    file_ending=".png",
    default_size=128,
    make=make_dermoscopy,
    description="Dermoscopy RGB photographs: skin texture, one pigmented lesion with an irregular border, "
    "colour variegation, pigment network and dots, hairs over the lesion, some with a round "
    "dermoscope frame.",
)
