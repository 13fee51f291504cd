"""A random abdomen in millimetres, rendered to Hounsfield units on any axial grid (shared by ct, ct3d).

The anatomy is a set of analytic solids (elliptic cylinders and ellipsoids) placed relative to a
body outline, bent by one smooth random deformation so that organ borders are not perfect
ellipses. Rendering a single plane gives a 2D slice; rendering a stack gives a volume whose
organs are smooth across slices. Coordinates follow DICOM/ITK LPS: +x patient left (image
right), +y posterior (image down), +z superior; array axes are (z, y, x).

Densities follow two acquisition phases: unenhanced (liver ~60, spleen ~48, kidney ~32 HU) and
portal venous (liver ~105, spleen ~115, kidney cortex ~170 HU); liver tumours are hypodense to the
liver by 25-65 HU. Fat -100, muscle 45-55, cortical bone ~800, cancellous bone ~230, air -1000.
Label values: liver 1, kidney 2, spleen 3, liver tumor 4 (liver excludes tumour pixels, as in
LiTS and MSD Task03).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

CONCEPTS = {"liver": 1, "kidney": 2, "spleen": 3, "liver tumor": 4}
LIVER, KIDNEY, SPLEEN, TUMOR = 1, 2, 3, 4
Z_RANGE_MM = (0.0, 150.0)  # inferior pole of the kidneys to the liver dome


@dataclass
class Solid:
    """An ellipsoid (``radii[2]`` = inf: an elliptic cylinder along z), rotated about z by ``angle``."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float = 0.0

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        q = (u / self.radii[0]) ** 2 + (v / self.radii[1]) ** 2
        if np.isfinite(self.radii[2]):
            q = q + (dz / self.radii[2]) ** 2
        return q <= 1.0


@dataclass
class Abdomen:
    """One random patient: body size, organ solids, densities and a smooth deformation."""

    body_axes: tuple[float, float]  # half width, half depth (mm)
    fat_mm: float
    muscle_mm: float
    outline: np.ndarray  # (k, 2) amplitude, phase of the body outline harmonics
    waves: np.ndarray  # (3, n, 5): per axis, n waves of (amplitude, kx, ky, kz, phase)
    hu: dict[str, float]
    liver: list[Solid]
    spleen: Solid
    kidneys: list[Solid]
    renal_sinus: list[Solid]
    gallbladder: Solid
    stomach: Solid
    bowel: list[tuple[Solid, str]]
    tumors: list[tuple[Solid, float]]  # solid and its density (HU)
    phase: str
    extras: dict[str, Solid] = field(default_factory=dict)


def _hu_table(rng: np.random.Generator, phase: str) -> dict[str, float]:
    u = rng.uniform
    if phase == "unenhanced":
        hu = {
            "liver": u(55, 66),
            "spleen": u(44, 52),
            "kidney": u(28, 36),
            "medulla": u(28, 36),
            "aorta": u(35, 45),
            "ivc": u(35, 45),
            "muscle": u(40, 50),
            "bowel_wall": u(30, 40),
        }
    else:
        hu = {
            "liver": u(95, 115),
            "spleen": u(105, 125),
            "kidney": u(150, 190),
            "medulla": u(100, 130),
            "aorta": u(150, 190),
            "ivc": u(120, 150),
            "muscle": u(50, 60),
            "bowel_wall": u(60, 90),
        }
    hu.update(
        fat=u(-110, -90),
        fluid=u(0, 15),
        bile=u(0, 15),
        cortical=u(700, 950),
        cancellous=u(180, 280),
        disc=u(70, 100),
        csf=u(5, 15),
        air=-1000.0,
        stool=u(-350, -150),
    )
    return hu


def _place_tumors(
    rng: np.random.Generator, liver: list[Solid], hu_liver: float, z_near: float | None, gap_mm: float
) -> list[tuple[Solid, float]]:
    """0-3 tumours whose centre and extent lie in the liver, kept apart from each other."""
    count = int(rng.choice([0, 1, 1, 2, 2, 3])) if z_near is None else int(rng.choice([0, 1, 1, 2]))
    tumors: list[tuple[Solid, float]] = []
    lobe = liver[0]
    for _ in range(40 * count):
        if len(tumors) == count:
            break
        r = float(rng.uniform(6, 20))
        c = np.array(lobe.center) + rng.uniform(-1, 1, 3) * np.array(lobe.radii) * 0.75
        if z_near is not None:
            c[2] = z_near + rng.uniform(-0.4, 0.4) * r
        probe = c[None, :] + np.array([[0, 0, 0], [r, 0, 0], [-r, 0, 0], [0, r, 0], [0, -r, 0]])
        if not all(any(s.inside(*p) for s in liver) for p in probe):
            continue
        if any(
            np.linalg.norm(c - np.array(t.center)) < 1.15 * (r + max(t.radii)) + gap_mm for t, _ in tumors
        ):
            continue
        radii = (r * rng.uniform(0.85, 1.1), r * rng.uniform(0.85, 1.1), r)
        tumors.append((Solid(tuple(c), radii, rng.uniform(0, np.pi)), hu_liver - rng.uniform(25, 65)))
    return tumors


def sample_abdomen(rng: np.random.Generator, tumor_z: float | None = None, gap_mm: float = 12.0) -> Abdomen:
    """Draw one patient. ``tumor_z``: place liver tumours across this plane (so a 2D slice shows them)."""
    bx, by = rng.uniform(135, 175), rng.uniform(100, 125)
    s = (bx + by) / 2 / 135.0  # organ size follows body size, loosely
    phase = str(rng.choice(["unenhanced", "portal venous"]))
    hu = _hu_table(rng, phase)

    def jit(v: float, sd: float = 6.0) -> float:
        return float(v + rng.normal(0, sd))

    spine_y = 0.55 * by
    liver = [
        Solid(
            (jit(-0.42 * bx), jit(-0.05 * by), jit(100, 8)), (70 * s, 78 * s, 62 * s), rng.uniform(-0.2, 0.2)
        ),
        Solid(
            (jit(0.06 * bx), jit(-0.45 * by), jit(110, 8)), (58 * s, 30 * s, 35 * s), rng.uniform(-0.3, 0.1)
        ),
    ]
    kidneys, sinus = [], []
    for side, z0 in ((-1, 45.0), (1, 55.0)):
        ang = side * rng.uniform(0.3, 0.6)
        c = (jit(side * 0.45 * bx, 4), jit(0.42 * by, 4), jit(z0, 5))
        kidneys.append(Solid(c, (24 * s, 30 * s, 50 * s), ang))
        sinus.append(Solid((c[0] - side * 14 * s, c[1] - 8 * s, c[2]), (10 * s, 12 * s, 25 * s), ang))
    bowel = []
    for _ in range(rng.integers(6, 11)):
        c = (rng.uniform(-0.55, 0.55) * bx, rng.uniform(-0.75, 0.1) * by, rng.uniform(0, 90))
        radii = (rng.uniform(9, 20), rng.uniform(9, 20), rng.uniform(20, 50))
        bowel.append((Solid(c, radii, rng.uniform(0, np.pi)), str(rng.choice(["air", "fluid", "stool"]))))
    waves = np.zeros((3, 2, 5))
    for axis in range(3):
        for w in range(2):
            k = rng.normal(0, 1, 3)
            k = k / np.linalg.norm(k) * 2 * np.pi / rng.uniform(120, 220)
            waves[axis, w] = (rng.uniform(1.5, 4.0), *k, rng.uniform(0, 2 * np.pi))
    extras = {
        "vertebra": Solid((0, spine_y, 0), (21 * s, 17 * s, np.inf)),
        "canal": Solid((0, spine_y + 25 * s, 0), (8 * s, 7 * s, np.inf)),
        "spinous": Solid((0, spine_y + 40 * s, 0), (5 * s, 10 * s, np.inf)),
        "aorta": Solid((jit(18, 3), spine_y - 30 * s, 0), (11 * s, 11 * s, np.inf)),
        "ivc": Solid((jit(-24, 3), spine_y - 32 * s, 0), (13 * s, 9 * s, np.inf)),
        "paraspinal_l": Solid((32 * s, spine_y + 30 * s, 0), (22 * s, 17 * s, np.inf)),
        "paraspinal_r": Solid((-32 * s, spine_y + 30 * s, 0), (22 * s, 17 * s, np.inf)),
    }
    return Abdomen(
        body_axes=(bx, by),
        fat_mm=rng.uniform(8, 30),
        muscle_mm=rng.uniform(7, 14),
        outline=np.stack([rng.normal(0, 0.02, 4), rng.uniform(0, 2 * np.pi, 4)], axis=1),
        waves=waves,
        hu=hu,
        liver=liver,
        spleen=Solid(
            (jit(0.62 * bx), jit(0.35 * by), jit(105, 6)), (25 * s, 50 * s, 45 * s), rng.uniform(0.4, 0.8)
        ),
        kidneys=kidneys,
        renal_sinus=sinus,
        gallbladder=Solid(
            (jit(-0.3 * bx), jit(-0.45 * by), jit(75, 6)), (14 * s, 22 * s, 30 * s), rng.uniform(0, 1)
        ),
        stomach=Solid(
            (jit(0.35 * bx), jit(-0.3 * by), jit(112, 6)), (40 * s, 30 * s, 40 * s), rng.uniform(-0.5, 0.5)
        ),
        bowel=bowel,
        tumors=_place_tumors(rng, liver, hu["liver"], tumor_z, gap_mm),
        phase=phase,
        extras=extras,
    )


def _deform(abd: Abdomen, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
    """Bend space by a few long sine waves, so every organ border wobbles consistently."""
    out = []
    for axis, base in enumerate((x, y, z)):
        d = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
        for amp, kx, ky, kz, ph in abd.waves[axis]:
            d += amp * np.sin(kx * x + ky * y + kz * z + ph)
        out.append(base + d)
    return tuple(out)


def render(
    abd: Abdomen, rng: np.random.Generator, z_mm: np.ndarray, shape: tuple[int, int], pixel_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """HU image (int16, (Z, H, W)) and label map (uint8) of the planes at ``z_mm``."""
    h, w = shape
    z = np.asarray(z_mm, dtype=np.float32)[:, None, None]
    y = ((np.arange(h, dtype=np.float32) - (h - 1) / 2) * pixel_mm)[None, :, None]
    x = ((np.arange(w, dtype=np.float32) - (w - 1) / 2) * pixel_mm)[None, None, :]
    full = (len(z), h, w)
    x, y, z = (np.broadcast_to(a, full) for a in (x, y, z))
    xd, yd, zd = _deform(abd, x, y, z)
    hu_t = abd.hu
    bx, by = abd.body_axes

    theta = np.arctan2(yd / by, xd / bx)
    wobble = 1.0 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(abd.outline))
    rho = np.hypot(xd / bx, yd / by) / wobble  # 1.0 on the skin
    mean_axis = (bx + by) / 2
    inner_fat = 1.0 - abd.fat_mm / mean_axis
    cavity = rho <= inner_fat - abd.muscle_mm / mean_axis

    planes = np.asarray(z_mm, dtype=np.float32)
    z_reach = float(np.abs(abd.waves[2, :, 0]).sum()) + 1.0  # the most the deformation moves along z

    def ins(solid: Solid, deformed: bool = True) -> np.ndarray:
        """``solid.inside`` on the full grid, evaluated only on the planes the solid can reach."""
        cx, cy, cz = (xd, yd, zd) if deformed else (x, y, z)
        if not np.isfinite(solid.radii[2]):
            return solid.inside(cx, cy, cz)
        out = np.zeros(full, dtype=bool)
        near = np.flatnonzero(np.abs(planes - solid.center[2]) <= solid.radii[2] + z_reach)
        if len(near):
            out[near] = solid.inside(cx[near], cy[near], cz[near])
        return out

    hu = np.full(full, hu_t["air"], dtype=np.float32)
    label = np.zeros(full, dtype=np.uint8)

    def paint(mask: np.ndarray, value: float | np.ndarray, lab: int = 0) -> None:
        hu[mask] = value if np.isscalar(value) else value[mask]
        label[mask] = lab

    paint(rho <= 1.0, hu_t["fat"])
    paint((rho <= inner_fat) & ~cavity, hu_t["muscle"])
    paint(cavity, hu_t["fat"] + 10)  # visceral fat, a little denser than subcutaneous
    for solid, content in abd.bowel:
        loop = ins(solid) & cavity
        lumen = ins(Solid(solid.center, tuple(r - 2.5 for r in solid.radii), solid.angle)) & cavity
        paint(loop, hu_t["bowel_wall"])
        paint(lumen, {"air": hu_t["air"] + 50, "fluid": hu_t["fluid"], "stool": hu_t["stool"]}[content])
    stomach = ins(abd.stomach) & cavity
    paint(stomach, hu_t["bowel_wall"])
    gastric = Solid(abd.stomach.center, tuple(r - 4 for r in abd.stomach.radii), abd.stomach.angle)
    contents = ins(gastric) & cavity
    air_level = abd.stomach.center[1] - 0.25 * abd.stomach.radii[1]  # air rises anteriorly (supine)
    paint(contents & (y < air_level), hu_t["air"] + 30)
    paint(contents & (y >= air_level), hu_t["fluid"] + 10)
    paint(abd.extras["aorta"].inside(xd, yd, zd) & cavity, hu_t["aorta"])
    paint(abd.extras["ivc"].inside(xd, yd, zd) & cavity, hu_t["ivc"])

    liver = np.zeros(full, dtype=bool)
    for lobe in abd.liver:
        liver |= ins(lobe)
    paint(liver & cavity, hu_t["liver"], LIVER)
    paint(ins(abd.gallbladder) & cavity, hu_t["bile"])
    paint(ins(abd.spleen) & cavity, hu_t["spleen"], SPLEEN)
    for kidney, sinus in zip(abd.kidneys, abd.renal_sinus, strict=True):
        whole = ins(kidney) & cavity
        medulla = ins(Solid(kidney.center, tuple(r * 0.7 for r in kidney.radii), kidney.angle))
        paint(whole, hu_t["kidney"], KIDNEY)
        paint(whole & medulla, hu_t["medulla"], KIDNEY)
        paint(whole & ins(sinus), hu_t["fat"] + 20)  # renal sinus fat is not kidney
    for tumor, density in abd.tumors:
        paint(ins(tumor, deformed=False) & (label == LIVER), density, TUMOR)

    # Posterior muscles and bone come last: they clear any organ label they overlap.
    for name in ("paraspinal_l", "paraspinal_r"):
        paint(abd.extras[name].inside(xd, yd, zd) & (rho <= 1.0), hu_t["muscle"] + 5)
    disc = np.mod(zd, 32.0) < 8.0  # intervertebral discs every ~32 mm
    vertebra = abd.extras["vertebra"].inside(xd, yd, zd)
    shell = vertebra & ~Solid(
        (0, abd.extras["vertebra"].center[1], 0), tuple(r - 3 for r in abd.extras["vertebra"].radii)
    ).inside(xd, yd, zd)
    paint(vertebra, np.where(disc, hu_t["disc"], hu_t["cancellous"]))
    paint(shell & ~disc, hu_t["cortical"])
    paint(abd.extras["spinous"].inside(xd, yd, zd) & ~disc, hu_t["cortical"] * 0.8)
    paint(abd.extras["canal"].inside(xd, yd, zd), hu_t["csf"])
    ribs = _ribs(rho, theta, zd, inner_fat, abd.muscle_mm / mean_axis)
    paint(ribs, hu_t["cortical"] * 0.7)

    hu = ndi.gaussian_filter(hu, (0.3 if len(z_mm) > 1 else 0.0, 0.6, 0.6))  # partial volume
    label = _absorb_specks(label)
    label = np.stack([_absorb_specks(plane, max_voxels=2) for plane in label])  # slivers within a slice
    label = _bridge_corner_joints(label)
    noise_sd = rng.uniform(8, 16)
    noise = ndi.gaussian_filter(rng.standard_normal(full).astype(np.float32), (0, 0.7, 0.7))
    hu = hu + noise * (noise_sd / max(float(noise.std()), 1e-6))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def _absorb_specks(label: np.ndarray, max_voxels: int = 6) -> np.ndarray:
    """Give tiny face-connected label fragments (left where painting cut an organ) their surroundings' label.

    Without this, a one-voxel fragment touching its organ only at a corner would count as an
    instance of its own under face connectivity but not under full connectivity.
    """
    label = label.copy()
    for value in np.unique(label[label > 0]):
        parts, count = ndi.label(label == value)  # face connectivity: the strictest reading
        sizes = np.bincount(parts.ravel(), minlength=count + 1)
        for index in np.nonzero(sizes[1:] <= max_voxels)[0] + 1:
            speck = parts == index
            border = ndi.binary_dilation(speck, structure=np.ones((3,) * label.ndim, dtype=bool)) & ~speck
            label[speck] = np.bincount(label[border]).argmax()
    return label


def _bridge_corner_joints(label: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Join same-label pixels that touch only at a corner within a slice, through a neighbour pixel.

    Keeps the instance count of every concept the same under 4- and 8-connectivity in each slice.
    The bridge takes a background pixel, or for a tumour a liver pixel (tumours sit in the liver).
    """
    label = label.copy()
    for _ in range(rounds):
        changed = False
        for value in np.unique(label[label > 0]):
            m = label == value
            takeable = (0, LIVER) if value == TUMOR else (0,)
            # Corner joints "\\" and "/": diagonal pair set, the two other pixels of the 2x2 block not.
            for joint, candidates in (
                (m[:, :-1, :-1] & m[:, 1:, 1:] & ~m[:, :-1, 1:] & ~m[:, 1:, :-1], ((0, 1), (1, 0))),
                (m[:, :-1, 1:] & m[:, 1:, :-1] & ~m[:, :-1, :-1] & ~m[:, 1:, 1:], ((0, 0), (1, 1))),
            ):
                for z, r, c in np.argwhere(joint):
                    options = [(z, r + dr, c + dc) for dr, dc in candidates]
                    for owner in takeable:
                        pick = next((p for p in options if label[p] == owner), None)
                        if pick is not None:
                            label[pick] = value
                            changed = True
                            break
        if not changed:
            break
    return label


def _ribs(rho: np.ndarray, theta: np.ndarray, z: np.ndarray, inner_fat: float, muscle: float) -> np.ndarray:
    """Rib cross-sections in the body wall of the upper abdomen, with intercostal gaps along z."""
    ribs = (np.abs(rho - (inner_fat - muscle / 2)) < muscle * 0.45) & (z > 70)
    where = np.nonzero(ribs)
    t, zz = theta[where], z[where]
    angles = np.deg2rad(np.array([-150, -120, -60, -30, 30, 60, 120, 150], dtype=np.float32))
    gap = np.abs((t[:, None] - angles[None] + np.pi) % (2 * np.pi) - np.pi).min(axis=1)
    ribs[where] = (gap < 0.06) & (np.mod(zz + 7 * np.sign(t), 28.0) < 14.0)
    return ribs
