"""Short colonoscopy clips with 1-2 polyps that move with the camera and deform, for tracking tests.

A colonoscopy scene (:mod:`.endoscopy`) is painted on a canvas larger than the view; the scope
pans smoothly across it, so the polyps drift through the frame, while each polyp breathes (its
size and outline change from frame to frame, as peristalsis and insufflation make them do).
Polyps are placed in view in the first frame and never touch each other in any frame.
The label map of a clip is (T, H, W) with object ids (1, 2), constant for one polyp over time;
``meta["objects"]`` names each id's concept.
"""

from __future__ import annotations

import numpy as np

from medsam3.data.phantoms.common import PhantomCase, PhantomKind
from medsam3.data.phantoms.endoscopy import Polyp, render, sample_polyp, sample_scene

FRAMES = 12
FPS = 8
_GROWTH = 1.2  # most a footprint grows over the clip (scale x outline wobble), for spacing polyps


def make_video(rng: np.random.Generator, size: int, frames: int = FRAMES) -> PhantomCase:
    """One clip, (frames, size, size, 3) uint8, with a label map of object ids."""
    margin = int(round(0.25 * size))
    canvas = (size + 2 * margin, size + 2 * margin)
    scene = sample_scene(rng, canvas, size)

    t = np.arange(frames, dtype=np.float64) / max(frames - 1, 1)
    amp = rng.uniform(0.3, 0.8, 2) * margin
    freq = rng.uniform(0.4, 0.9, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    path = margin + amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t[None] + phase[:, None])
    offsets = np.rint(path.T).astype(int).clip(0, 2 * margin)  # (frames, 2) row, col of the view

    wanted = int(rng.integers(1, 3))
    polyps: list[Polyp] = []
    for _ in range(50):
        if len(polyps) == wanted:
            break
        center = offsets[0] + rng.uniform(0.28, 0.72, 2) * size
        p = sample_polyp(rng, scene, (float(center[0]), float(center[1])), int(size * 0.8))
        if all(
            np.hypot(*np.subtract(p.center, q.center)) > _GROWTH * (p.reach + q.reach) + 4 for q in polyps
        ):
            polyps.append(p)

    breath = [(rng.uniform(0.04, 0.1), rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)) for _ in polyps]
    wobble = [(rng.uniform(0.02, 0.05), rng.uniform(0, 2 * np.pi)) for _ in polyps]
    images, labels = [], []
    for k in range(frames):
        states = []
        for p, (b_amp, b_freq, b_phase), (w_amp, w_phase) in zip(polyps, breath, wobble, strict=True):
            scale = 1.0 + b_amp * np.sin(2 * np.pi * b_freq * t[k] + b_phase)
            rel = p.rel * (1.0 + w_amp * np.sin(2 * p.theta + 2 * np.pi * t[k] + w_phase))
            states.append((p, scale, rel))
        image, masks = render(scene, states, (int(offsets[k, 0]), int(offsets[k, 1])), size, rng)
        label = np.zeros((size, size), dtype=np.uint8)
        for object_id, mask in enumerate(masks, start=1):
            label[mask] = object_id
        images.append(image)
        labels.append(label)
    return PhantomCase(
        case_id="",
        image=np.stack(images),
        label=np.stack(labels),
        spacing=None,
        meta={"objects": {str(i): "polyp" for i in range(1, len(polyps) + 1)}, "fps": FPS, "frames": frames},
    )


KIND = PhantomKind(
    name="video",
    concepts={"polyp": 1},
    modality="endoscopy video",
    channel_names={"0": "R", "1": "G", "2": "B"},
    file_ending=".mp4",
    default_size=96,
    make=make_video,
    description="Colonoscopy clips (12 frames, H.264 MP4) with 1-2 polyps moving with the camera and "
    "deforming; per-frame label PNGs hold object ids, constant per polyp across frames.",
    layout="video",
)
