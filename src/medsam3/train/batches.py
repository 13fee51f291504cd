"""From dataset samples to what one training step needs.

A sample's prompt is its concept phrase, plus (in the paper's text+box paradigm, "T+I") the
ground-truth boxes jittered a little, as a clinician's box would be. Per-sample randomness comes
from a generator seeded by (seed, epoch, sample index), so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from medsam3.data.sample import Sample
from medsam3.errors import MedSAM3Error

PROMPT_MODES = ("text", "text+box", "mixed")


def check_prompt_mode(mode: str) -> str:
    if mode not in PROMPT_MODES:
        raise MedSAM3Error(f"unknown prompt mode '{mode}': choose one of {', '.join(PROMPT_MODES)}")
    return mode


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, scale: float, height: int, width: int) -> np.ndarray:
    """Move each box edge by up to ``scale`` x its side, then clip to the image."""
    if len(boxes) == 0 or scale <= 0:
        return boxes.astype(np.float32)
    sides = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    moved = boxes + rng.uniform(-scale, scale, size=boxes.shape) * sides
    moved[:, [0, 2]] = np.clip(moved[:, [0, 2]], 0, width)
    moved[:, [1, 3]] = np.clip(moved[:, [1, 3]], 0, height)
    bad = (moved[:, 2] - moved[:, 0] < 1) | (moved[:, 3] - moved[:, 1] < 1)
    moved[bad] = boxes[bad]
    return moved.astype(np.float32)


@dataclass
class TrainItem:
    """One sample made ready: image, phrase, prompt boxes and loss target."""

    rgb: np.ndarray
    phrase: str
    prompt_boxes: np.ndarray  # (M, 4) xyxy px; M = 0 for a text-only prompt
    target: dict


def make_item(
    sample: Sample,
    rng: np.random.Generator,
    prompt_mode: str,
    text_box_fraction: float = 0.5,
    box_jitter: float = 0.1,
    augment: Callable[[Sample, np.random.Generator], Sample] | None = None,
    canvas_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> TrainItem:
    """``canvas_size(h, w)``: the original-pixel frame the model's input covers (the seam's); targets
    are expressed in it (boxes normalised by it, masks zero-padded to it)."""
    if augment is not None:
        sample = augment(sample, rng)
    height, width = sample.image.shape[:2]
    use_boxes = prompt_mode == "text+box" or (prompt_mode == "mixed" and rng.random() < text_box_fraction)
    prompt_boxes = (
        jitter_boxes(sample.boxes, rng, box_jitter, height, width) if use_boxes else np.zeros((0, 4), np.float32)
    )
    canvas_h, canvas_w = canvas_size(height, width) if canvas_size else (height, width)
    scale = np.array([canvas_w, canvas_h, canvas_w, canvas_h], dtype=np.float32)
    masks = np.asarray(sample.masks, dtype=bool).reshape(-1, height, width)
    if (canvas_h, canvas_w) != (height, width):
        masks = np.pad(masks, ((0, 0), (0, canvas_h - height), (0, canvas_w - width)))
    target = {
        "boxes": torch.from_numpy(np.asarray(sample.boxes, np.float32).reshape(-1, 4) / scale),
        "masks": torch.from_numpy(masks),
        "present": len(sample.masks) > 0,
    }
    return TrainItem(rgb=sample.image, phrase=sample.concept, prompt_boxes=prompt_boxes, target=target)
