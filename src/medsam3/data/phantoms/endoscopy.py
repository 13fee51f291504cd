"""Colonoscopy frames (Kvasir-SEG look): wet pink mucosa, vessels, folds, a raised polyp with shading.

The scene is a tube seen along its axis: light from the scope tip falls off with distance, so the
far lumen is dark and haustral folds show as rings of shading. Mucosa albedo carries a submucosal
vessel network (zero crossings of band-pass noise). A polyp is a dome (height from the distance
transform of its irregular footprint) lit by the scope: Lambertian shading plus Phong specular
highlights on the wet surface. Lens vignetting and, in half the cases, the black corners of the
round endoscope image. About a fifth of the frames hold no polyp (negatives).
The scene can be rendered through a moving window, which :mod:`.video` uses for clips.
"""

from __future__ import annotations

from dataclasses import dataclass

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

CONCEPTS = {"polyp": 1}


@dataclass
class Polyp:
    """A polyp's footprint: centre (row, col) in canvas pixels, radius and outline profile."""

    center: tuple[float, float]
    radius: float
    theta: np.ndarray
    rel: np.ndarray
    aspect: float
    angle: float
    albedo: np.ndarray  # (3,)

    @property
    def reach(self) -> float:
        """Radius of a disc that holds the whole footprint (at scale 1)."""
        return float(self.radius * self.rel.max())

    def footprint(
        self,
        shape: tuple[int, int],
        offset: tuple[float, float] = (0.0, 0.0),
        scale: float = 1.0,
        rel: np.ndarray | None = None,
    ) -> np.ndarray:
        center = (self.center[0] - offset[0], self.center[1] - offset[1])
        return outline_mask(
            shape,
            center,
            self.radius * scale,
            self.theta,
            self.rel if rel is None else rel,
            self.aspect,
            self.angle,
        )


@dataclass
class Scene:
    """Mucosa albedo and wall illumination on a canvas at least as large as the view."""

    albedo: np.ndarray  # (H, W, 3) in [0, 1]
    illumination: np.ndarray  # (H, W)
    sparkle: np.ndarray  # (H, W) specular highlights on the mucosa, [0, 1]
    round_field: bool
    light: np.ndarray  # (3,) unit vector toward the light
    base: np.ndarray  # (3,) mean mucosa colour


def sample_scene(rng: np.random.Generator, canvas: tuple[int, int], view: int) -> Scene:
    """Random mucosa, vessels, folds and lumen position on ``canvas``; features sized for ``view``."""
    s = view / 128.0
    base = np.array([rng.uniform(0.78, 0.9), rng.uniform(0.38, 0.5), rng.uniform(0.32, 0.42)])
    tint = 1.0 + 0.07 * np.stack([smooth_noise(rng, canvas, 10 * s) for _ in range(3)], axis=-1)
    albedo = base * tint
    vessel_net = np.exp(-((band_noise(rng, canvas, 1.6 * s, 9.0 * s) / 0.12) ** 2))
    vessel_net *= np.clip(smooth_noise(rng, canvas, 12 * s) + 0.3, 0, 1)  # vessels show in patches
    albedo = albedo * (1.0 - vessel_net[..., None] * np.array([0.1, 0.35, 0.28]))

    rows, cols = np.mgrid[0 : canvas[0], 0 : canvas[1]].astype(np.float32)
    lumen = np.array(canvas) / 2 + rng.uniform(-0.3, 0.3, 2) * view
    d = np.hypot(rows - lumen[0], cols - lumen[1]) / view
    angle = np.arctan2(rows - lumen[0], cols - lumen[1])
    lumen_radius = rng.uniform(0.08, 0.2)
    depth_light = np.clip(d / (lumen_radius * 2.5), 0, 1) ** 1.2  # far wall gets little light
    wander = 1.2 * np.sin(3 * angle + rng.uniform(0, 6)) + 1.5 * smooth_noise(rng, canvas, 14 * s)
    fold_phase = 2 * np.pi * np.log(d + 0.05) / rng.uniform(0.3, 0.5) + wander
    folds = 1.0 + rng.uniform(0.08, 0.18) * np.cos(fold_phase)
    illumination = (0.08 + 0.92 * depth_light) * folds
    glints = smooth_noise(rng, canvas, 1.5 * s) * (np.cos(fold_phase) > 0.8) * (d > lumen_radius * 1.5)
    sparkle = np.clip((glints - 2.6) / 0.5, 0, 1)  # a few wet glints on fold crests
    light = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 1.0])
    return Scene(
        albedo.astype(np.float32),
        illumination.astype(np.float32),
        sparkle.astype(np.float32),
        bool(rng.random() < 0.5),
        light / np.linalg.norm(light),
        base,
    )


def sample_polyp(rng: np.random.Generator, scene: Scene, center: tuple[float, float], view: int) -> Polyp:
    """A sessile polyp of 8-28 % of the view, with an irregular footprint, coloured like its mucosa."""
    theta, rel = radial_profile(rng, rng.uniform(0.05, 0.18), 5)
    albedo = np.clip(
        scene.base * np.array([rng.uniform(1.0, 1.1), rng.uniform(0.85, 1.1), rng.uniform(0.85, 1.1)]), 0, 1
    )
    return Polyp(
        center,
        rng.uniform(0.08, 0.28) * view,
        theta,
        rel,
        rng.uniform(0.7, 1.0),
        rng.uniform(0, np.pi),
        albedo,
    )


def _shade_polyp(footprint: np.ndarray, light: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Lambertian and specular terms of a dome standing on ``footprint``."""
    dist = ndi.distance_transform_edt(footprint)
    dome = np.clip(dist / max(dist.max(), 1.0), 0, 1) ** 0.6 * radius * 0.8
    height = ndi.gaussian_filter(dome, max(1.0, radius / 5))  # smooth: no ridge along the medial axis
    gy, gx = np.gradient(height)
    normal = np.stack([-gx, -gy, np.ones_like(gx)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    lambert = np.clip(normal @ light, 0, 1)
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    specular = np.clip(normal @ half, 0, 1) ** 60
    return lambert, specular


def render(
    scene: Scene,
    polyps: list[tuple[Polyp, float, np.ndarray | None]],
    offset: tuple[int, int],
    view: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """RGB frame (view x view, uint8) seen through the window at ``offset``, and each polyp's mask.

    ``polyps`` holds (polyp, scale, outline profile or None) so a clip can make polyps breathe.
    """
    r0, c0 = offset
    win = (slice(r0, r0 + view), slice(c0, c0 + view))
    shape = (view, view)
    albedo = scene.albedo[win].copy()
    light = scene.illumination[win].copy()
    spec = scene.sparkle[win].copy()
    masks = []
    for polyp, scale, rel in polyps:
        mask = polyp.footprint(shape, (r0, c0), scale, rel)
        masks.append(mask)
        if not mask.any():
            continue
        lambert, specular = _shade_polyp(mask, scene.light, polyp.radius * scale)
        pits = 1.0 + 0.04 * smooth_noise(rng, shape, 0.8)  # fine surface (pit pattern) texture
        albedo = np.where(mask[..., None], polyp.albedo * pits[..., None], albedo)
        closer = np.maximum(light, 0.6) * 1.15  # the polyp stands out of the wall toward the scope
        light = np.where(mask, closer * (0.35 + 0.65 * lambert), light)
        spec = np.where(mask, np.maximum(spec, specular), spec)

    rows, cols = np.mgrid[0:view, 0:view].astype(np.float32)
    r = np.hypot(rows - (view - 1) / 2, cols - (view - 1) / 2) / (view / 2)
    vignette = 1.0 - 0.45 * np.clip(r / 1.41, 0, 1) ** 2.5
    rgb = albedo * (light * vignette)[..., None] + spec[..., None] * np.array([1.0, 0.97, 0.95])
    rgb = rgb + rng.normal(0, 0.012, rgb.shape)  # sensor noise
    if scene.round_field:
        rgb = np.where((r > 1.12)[..., None], 0.0, rgb)
        masks = [m & (r <= 1.12) for m in masks]
    return to_uint8(np.clip(rgb, 0, 1) ** (1 / 1.1)), masks


def make_endoscopy(rng: np.random.Generator, size: int) -> PhantomCase:
    """One frame: a polyp in 80 % of the cases (two in some), none in the rest."""
    scene = sample_scene(rng, (size, size), size)
    polyps: list[Polyp] = []
    if rng.random() < 0.8:
        wanted = 2 if rng.random() < 0.15 else 1
        for _ in range(30):
            if len(polyps) == wanted:
                break
            p = sample_polyp(rng, scene, tuple(rng.uniform(0.2, 0.8, 2) * size), size)
            if all(np.hypot(*np.subtract(p.center, q.center)) > p.reach + q.reach + 3 for q in polyps):
                polyps.append(p)
    image, masks = render(scene, [(p, 1.0, None) for p in polyps], (0, 0), size, rng)
    label = np.zeros((size, size), dtype=np.uint8)
    for mask in masks:
        label[mask] = CONCEPTS["polyp"]
    return PhantomCase(
        case_id="",
        image=image,
        label=label,
        spacing=None,
        meta={"round_field": scene.round_field, "polyps_placed": len(polyps)},
    )


KIND = PhantomKind(
    name="endoscopy",
    concepts=CONCEPTS,
    modality="endoscopy",
    channel_names={"0": "R", "1": "G", "2": "B"},
    file_ending=".png",
    default_size=128,
    make=make_endoscopy,
    description="Colonoscopy RGB frames: mucosa with vessels and folds, vignetting, specular highlights, "
    "shaded sessile polyps (none in about 20 % of the frames).",
)
