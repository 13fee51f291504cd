"""Fluorescence microscopy of stained nuclei (DAPI/Hoechst look, as in DSB2018), 16-bit camera counts.

Image formation follows a widefield microscope with a scientific camera: a nucleus's dye density
(per-nucleus brightness, chromatin texture, darker nucleoli) is blurred by the point spread function,
turned into photons over a dim, unevenly lit background, sampled with Poisson shot noise, then
converted to counts with a camera gain, offset and Gaussian read noise.
Concepts: "cell nucleus" (interphase) and "mitotic cell" (small, condensed, very bright).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from medsam3.data.phantoms.common import PhantomCase, PhantomKind, apart, random_blob, smooth_noise

CONCEPTS = {"cell nucleus": 1, "mitotic cell": 2}


def _place(
    rng: np.random.Generator,
    occupied: np.ndarray,
    centers: np.ndarray,
    radius: float,
    irregularity: float,
    aspect: float,
) -> np.ndarray | None:
    """Try a few positions near the cluster centres; return a mask that keeps clear of others."""
    shape = occupied.shape
    for _ in range(30):
        c = centers[rng.integers(len(centers))] + rng.normal(0, shape[0] / 6, 2)
        c = np.clip(c, 0, np.array(shape) - 1)
        mask = random_blob(rng, shape, (c[0], c[1]), radius, irregularity, 4, aspect)
        if mask.sum() >= 6 and apart(mask, occupied, gap=1):
            return mask
    return None


def make_nuclei(rng: np.random.Generator, size: int) -> PhantomCase:
    """One field of view with 8-30 nuclei (scaled with area) and sometimes a few mitotic cells."""
    shape = (size, size)
    scale = size / 128.0 * rng.uniform(0.8, 1.25)  # magnification varies between images
    occupied = np.zeros(shape, dtype=bool)
    label = np.zeros(shape, dtype=np.uint8)
    dye = np.zeros(shape, dtype=np.float32)
    chromatin = 1.0 + 0.25 * smooth_noise(rng, shape, 1.0)
    centers = rng.uniform(0.15, 0.85, (rng.integers(1, 4), 2)) * size

    n_nuclei = int(rng.integers(8, 26) * (size / 128.0) ** 2)
    n_mitotic = int(rng.integers(1, 4)) if rng.random() < 0.5 else 0
    kinds = [1] * n_nuclei + [2] * n_mitotic
    rng.shuffle(kinds)
    placed: list[int] = []
    for value in kinds:
        if value == 1:
            radius = rng.uniform(4.5, 8.0) * scale
            irregularity, aspect = rng.uniform(0.04, 0.14), 1 / rng.uniform(1.0, 1.5)
        else:  # condensed chromosomes: small, elongated (metaphase plate), very bright
            radius = rng.uniform(2.5, 3.8) * scale
            irregularity, aspect = 0.08, 1 / rng.uniform(1.2, 2.2)
        mask = _place(rng, occupied, centers, radius, irregularity, aspect)
        if mask is None:
            continue
        occupied |= mask
        label[mask] = value
        placed.append(value)
        # Dye density: flat-topped with a soft edge (distance to the border), per-nucleus brightness.
        edge = np.clip(ndi.distance_transform_edt(mask) / 2.5, 0, 1) ** 0.5
        if value == 1:
            brightness = rng.lognormal(0.0, 0.3)
            density = edge * brightness * chromatin
            inside = np.argwhere(ndi.binary_erosion(mask, iterations=2))
            rr, cc = np.ogrid[: shape[0], : shape[1]]
            for _ in range(rng.integers(0, 3) if len(inside) else 0):  # nucleoli exclude the dye
                r0, c0 = inside[rng.integers(len(inside))]
                spot = (rr - r0) ** 2 + (cc - c0) ** 2 <= (radius * 0.22) ** 2
                density = np.where(spot & mask, density * 0.55, density)
        else:
            density = edge * rng.uniform(2.2, 3.2) * (1.0 + 0.1 * chromatin)
        dye = np.where(mask, density, dye)

    psf_sigma = rng.uniform(0.8, 1.3) * size / 128.0
    signal = ndi.gaussian_filter(dye, psf_sigma)
    illumination = 1.0 + 0.15 * smooth_noise(rng, shape, size / 3.0)
    photons_per_nucleus = rng.uniform(150, 500)
    background = rng.uniform(4, 15) * (1.0 + 0.3 * smooth_noise(rng, shape, size / 8.0).clip(-2, 2))
    expected = np.clip((signal * photons_per_nucleus + background) * illumination, 0, None)
    photons = rng.poisson(expected).astype(np.float32)
    gain, offset, read_noise = rng.uniform(1.5, 4.0), 100.0, rng.uniform(1.0, 3.0)
    counts = offset + gain * photons + rng.normal(0, read_noise, shape)
    image = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    return PhantomCase(
        case_id="",
        image=image,
        label=label,
        spacing=None,
        meta={
            "pixel_size_um": round(0.65 / scale, 4),
            "placed": {name: int(sum(1 for v in placed if v == value)) for name, value in CONCEPTS.items()},
            "camera": {
                "gain_adu_per_photon": round(gain, 3),
                "offset_adu": offset,
                "read_noise_adu": round(read_noise, 3),
            },
        },
    )


KIND = PhantomKind(
    name="nuclei",
    concepts=CONCEPTS,
    modality="fluorescence microscopy",
    channel_names={"0": "fluorescence"},
    file_ending=".tif",
    default_size=128,
    make=make_nuclei,
    description="Widefield fluorescence of stained nuclei, 16-bit counts with Poisson shot noise; "
    "nuclei of one concept never touch.",
)
