"""One box on one slice -> the whole 3D object: LiteMedSAM's box decoder, slice to slice, both ways.

MedSAM2-style 3D inference (reference.md section 3): the user's box is drawn on its key slice by
the pretrained box decoder; each next slice (outwards, in both directions) is prompted with the
previous slice's mask box (the user's box on the first step), enlarged by ``margin``; the walk
stops where the object ends. No text and no detector are involved, so it works with any concept, trained or not.

Where does the object end? Each candidate slice is measured against the previous one (area ratio,
the decoder's own IoU estimate, the share of the new mask lying on the previous one) and
:class:`StopRule` says "ended" when one of them falls below its floor. The defaults come from
``benchmarks/bench_volume_box.py`` (docs/volumes-3d-box.md): the slice that fails is decoded but
not kept, so a lesion spanning n slices costs n + 2 encoder runs.

All objects move together: one sweep up, one sweep down, every slice encoded at most once per
sweep and its boxes decoded in one batch. Several key slices of one object work: when the walk from
one key slice reaches another key slice of the same object (overlapping its mask) it hands over,
and the other key slice does not walk back over the covered slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from medsam3.data.masks import mask_box, mask_iou_matrix
from medsam3.errors import PromptError
from medsam3.infer.types import Box


@dataclass(frozen=True)
class Seed:
    """A user's (or a detector's) box ``box`` (xyxy pixels) on slice ``index`` of the slice axis."""

    index: int
    box: Box


@dataclass(frozen=True)
class StopRule:
    """When a candidate slice counts as "the object has ended" (any floor missed -> stop).

    ``max_iou_drop``: the decoder's own IoU estimate may fall at most this far below its estimate on
    the key slice (the measured separator: on lung2 0.84-0.92 on tumour slices, 0.73-0.80 beyond;
    on a phantom liver tumour 0.83-0.89 on, <= 0.75 beyond). The others are safety nets:
    ``min_area_ratio`` (area over the previous slice's), ``min_overlap`` (the share of the new mask
    lying on the previous one) and ``min_pixels``.
    """

    max_iou_drop: float = 0.1
    min_area_ratio: float = 0.25
    min_overlap: float = 0.5
    min_pixels: int = 4

    def reason(self, step: SliceMask, previous: SliceMask, key: SliceMask) -> str | None:
        if step.area < self.min_pixels:
            return "empty"
        if step.iou_estimate < key.iou_estimate - self.max_iou_drop:
            return "low IoU estimate"
        if step.area < self.min_area_ratio * previous.area:
            return "area collapse"
        if step.overlap < self.min_overlap:
            return "off the previous slice"
        return None


@dataclass
class SliceMask:
    """One slice of one object, with what the stopping rule reads."""

    index: int
    mask: np.ndarray  # (H, W) bool
    iou_estimate: float
    mean_probability: float  # over the mask
    overlap: float  # share of this mask on the previous slice's (1.0 on a key slice)
    logits: object = None  # the decoder's low-resolution logits (a dense prompt for the next slice)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class ObjectWalk:
    """Everything one seed produced: its slices, and where and why each direction stopped."""

    seed: Seed
    slices: dict[int, SliceMask] = field(default_factory=dict)
    stops: dict[str, tuple[int, str]] = field(default_factory=dict)  # "up"/"down" -> (slice, reason)
    handed_over: dict[str, int] = field(default_factory=dict)  # direction -> the seed (index) it reached

    @property
    def extent(self) -> tuple[int, int] | None:
        return (min(self.slices), max(self.slices)) if self.slices else None


def enlarge(box: Sequence[float], margin: float, min_pixels: float, height: int, width: int) -> Box:
    """``box`` grown by ``margin`` of its size (at least ``min_pixels``) on each side, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx = max(margin * (x1 - x0), min_pixels)
    dy = max(margin * (y1 - y0), min_pixels)
    return (max(x0 - dx, 0.0), max(y0 - dy, 0.0), min(x1 + dx, float(width)), min(y1 + dy, float(height)))


class _Decoder:
    """Encodes slices on demand (counting them) and draws batches of boxes on the current one."""

    def __init__(self, predictor, set_slice: Callable[[int], None], mask_threshold: float, dense: bool):
        self.predictor = predictor
        self.set_slice = set_slice
        self.threshold = mask_threshold
        self.dense = dense
        self.current: int | None = None
        self.encoded = 0

    def draw(self, index: int, boxes: list[Box], previous: list[SliceMask | None]) -> list[SliceMask]:
        if self.current != index:
            self.set_slice(index)
            self.current = index
            self.encoded += 1
        dense = None
        if self.dense and all(p is not None and p.logits is not None for p in previous) and previous:
            import torch

            dense = torch.cat([p.logits for p in previous])
        drawn = self.predictor.draw_boxes(boxes, mask_logits=dense)
        out = []
        for k, prev in enumerate(previous):
            probs = drawn.probs[k]
            mask = probs > self.threshold
            area = int(mask.sum())
            overlap = 1.0 if prev is None else (float((mask & prev.mask).sum()) / area if area else 0.0)
            out.append(
                SliceMask(
                    index=index,
                    mask=mask,
                    iou_estimate=float(drawn.iou[k]),
                    mean_probability=float(probs[mask].mean()) if area else 0.0,
                    overlap=overlap,
                    logits=drawn.logits[k : k + 1],
                )
            )
        return out


def propagate_seeds(
    predictor,
    set_slice: Callable[[int], None],
    count: int,
    seeds: Sequence[Seed],
    *,
    size: tuple[int, int],
    rule: StopRule | None = None,
    margin: float = 0.1,
    margin_pixels: float = 2.0,
    mask_threshold: float = 0.5,
    dense_prompt: bool = False,
    blank: Callable[[int], bool] = lambda i: False,
    handover_iou: float = 0.3,
    progress: Callable[[int], None] | None = None,
    first_step_from_seed: bool = True,
) -> tuple[list[ObjectWalk], int]:
    """Walk every seed's object through slices ``0..count-1``; returns the walks and the encoder runs.

    ``set_slice(i)`` must make ``predictor`` hold slice ``i`` (encoded); ``size`` is (H, W) of a slice.
    A seed on a blank slice is a user error (nothing there to outline); a box that draws nothing on its
    own slice gives an empty walk (the caller notes it).
    """
    rule = rule or StopRule()
    height, width = size
    for seed in seeds:
        if not 0 <= seed.index < count:
            raise PromptError(f"key slice {seed.index} is outside the volume (0..{count - 1} along the axis)")
        if blank(seed.index):
            raise PromptError(f"key slice {seed.index} is blank (one constant value): there is nothing in the box")
    decoder = _Decoder(predictor, set_slice, mask_threshold, dense_prompt)
    walks = [ObjectWalk(seed) for seed in seeds]
    by_slice: dict[int, list[int]] = {}
    for k, seed in enumerate(seeds):
        by_slice.setdefault(seed.index, []).append(k)

    drawn_keys: set[int] = set()

    def key_masks(index: int) -> None:
        """Draw the user's boxes of the seeds on ``index`` (their walks start there), once."""
        ks = [k for k in by_slice.get(index, []) if k not in drawn_keys]
        if not ks:
            return
        drawn_keys.update(ks)
        drawn = decoder.draw(index, [seeds[k].box for k in ks], [None] * len(ks))
        for k, step in zip(ks, drawn, strict=True):
            if step.area:
                walks[k].slices[index] = step

    for direction, name in ((1, "up"), (-1, "down")):
        order = range(count) if direction == 1 else range(count - 1, -1, -1)
        fronts: dict[int, SliceMask] = {}  # walk -> its last kept slice
        for i in order:
            if direction == 1:
                key_masks(i)
            for k in by_slice.get(i, []):
                if walks[k].slices and name not in walks[k].handed_over and not _covered(walks, k, name):
                    fronts[k] = walks[k].slices[i]
            going = {k: f for k, f in fronts.items() if f.index == i}
            nxt = i + direction
            if not going:
                continue
            if not 0 <= nxt < count:
                for k in going:
                    walks[k].stops[name] = (i, "volume edge")
                    del fronts[k]
                continue
            if blank(nxt):
                for k in going:
                    walks[k].stops[name] = (nxt, "blank slice")
                    del fronts[k]
                continue
            if direction == 1:
                key_masks(nxt)  # before the fronts arrive: a walk may hand over to a key slice there
            ks = list(going)
            boxes = [enlarge(_step_box(going[k], seeds[k], first_step_from_seed), margin, margin_pixels, height, width)
                     for k in ks]
            steps = decoder.draw(nxt, boxes, [going[k] for k in ks])
            if progress is not None:
                progress(decoder.encoded)
            for k, step in zip(ks, steps, strict=True):
                why = rule.reason(step, going[k], walks[k].slices[seeds[k].index])
                if why is not None:
                    walks[k].stops[name] = (nxt, why)
                    del fronts[k]
                    continue
                other = _key_of_same_object(walks, by_slice.get(nxt, []), k, step, handover_iou)
                if other is not None:
                    walks[k].handed_over[name] = other
                    walks[k].stops[name] = (nxt, f"reached key slice {nxt}")
                    del fronts[k]
                    continue
                walks[k].slices[nxt] = step
                fronts[k] = step
    return walks, decoder.encoded


def _step_box(front: SliceMask, seed: Seed, first_step_from_seed: bool) -> Box:
    """The box the next slice is prompted with (before the margin): the front's mask box.

    The first step off a key slice takes the user's box instead: it is what the user knows of the
    object's extent, and the key slice's mask errors (an undersized outline of a small lesion) would
    otherwise shrink every later slice (bench_volume_box.py, mean 3D Dice 0.483 -> 0.54 on the real
    volumes with the exact box).
    """
    if first_step_from_seed and front.index == seed.index:
        return seed.box
    return mask_box(front.mask)


def _key_of_same_object(walks, seeds_here: list[int], k: int, step: SliceMask, handover_iou: float) -> int | None:
    """Another seed on this slice whose key mask is the object this walk arrived with (IoU)."""
    for other in seeds_here:
        if other != k and walks[other].slices.get(step.index) is not None:
            if mask_iou_matrix(walks[other].slices[step.index].mask[None], step.mask[None])[0, 0] >= handover_iou:
                return other
    return None


def _covered(walks: list[ObjectWalk], k: int, name: str) -> bool:
    """Has another walk already come over this seed's ``name`` side (it handed over to this seed)?"""
    back = "down" if name == "up" else "up"
    return any(w.handed_over.get(back) == k for j, w in enumerate(walks) if j != k)
