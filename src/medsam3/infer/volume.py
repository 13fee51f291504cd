"""Segment a 3D volume by naming concepts: slice by slice, made consistent in 3D, or tracked.

Slices are streamed: each is windowed, encoded once by the vision encoder, answered for every
prompt, and its features are dropped before the next slice (``batch_slices`` encodes a few at a
time on a GPU). What is kept per voxel is one byte per prompt (the best instance score there,
quantised) and the output label map, so memory grows with the voxel count but never with model
features: a 500-slice CT costs what one slice costs on the model side.

Two methods:

- ``slices``: the detector on every slice at a permissive candidate threshold, then 3D
  consistency. Candidates of one prompt that touch across neighbouring slices form 3D connected
  components (in-plane 8-connectivity, slice-to-slice overlap); each component's score is fused
  over neighbouring slices (the best mean of per-slice peak scores in a window of
  ``fusion_window`` slices), and a component is kept only when that fused score reaches the score
  threshold and it spans at least ``min_slices`` slices. So a weak detection next to strong ones
  survives (hysteresis), and an isolated one-slice blip does not.
- ``track``: start from the most confident slice (or the user's ``box_slice`` and ``box``) and
  propagate both ways with :func:`medsam3.infer.tracking.propagate` (concept + previous box on each
  slice), or with SAM 3's video model when a :class:`~medsam3.infer.tracking.Sam3VideoTracker` is
  given. Without a box, finding the anchor takes one detector pass over all slices first, so
  slices the object spans are encoded twice; with ``box_slice``/``box`` each visited slice is
  encoded once.

``slices`` is the default: with the trained ``nano`` on phantom CT it matched ``track`` on the
liver and beat it on kidneys and liver tumours (tumours away from the anchor slice are never
reached by tracking), at about half the encoder runs (``benchmarks/bench_volume.py --accuracy``).

Blank (constant) slices are not sent to the model; an empty or constant volume gives an empty
label map and a note, not an error. Multi-prompt output is a label map (value k = prompt k, a
voxel claimed by two prompts goes to the higher score) with a JSON legend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from medsam3.data.masks import label_components
from medsam3.data.volume_io import Volume, slice_rgb, take_slice
from medsam3.errors import MedSAM3Error, PromptError
from medsam3.infer.types import Box, Prompt, as_prompts
from medsam3.model.tower_memo import TowerMemo

METHODS = ("auto", "slices", "track", "propagate")
_DETAIL = 10  # components listed per prompt in the legend


@dataclass
class VolumeSegmentation:
    """A volume's label map and how it was obtained."""

    label_map: np.ndarray  # (Z, Y, X) uint8 (uint16 beyond 255 prompts): value k = legend[k]
    legend: dict[int, str]
    slice_scores: np.ndarray  # (prompts, slices along axis): best instance score on each slice, 0 = none
    method: str
    axis: int
    encoded_slices: int = 0  # vision-encoder runs
    skipped_slices: list[int] = field(default_factory=list)  # blank slices never sent to the model
    anchors: dict[str, int] = field(default_factory=dict)  # track: the start slice of each prompt
    components: dict[str, dict] = field(default_factory=dict)  # slices: kept / dropped 3D components
    notes: list[str] = field(default_factory=list)

    def voxels(self, value: int) -> int:
        return int(np.count_nonzero(self.label_map == value))

    def to_json(self, volume: Volume | None = None) -> dict:
        """The legend file: label values, per-prompt statistics, per-slice scores and notes."""
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0 if volume is not None else None
        prompts = []
        for value, text in self.legend.items():
            count = self.voxels(value)
            along = np.flatnonzero(np.any(self.label_map == value, axis=tuple(a for a in range(3) if a != self.axis)))
            entry = {
                "label": value,
                "prompt": text,
                "voxels": count,
                "volume_ml": None if voxel_ml is None else round(count * voxel_ml, 4),
                "slices": [int(along[0]), int(along[-1])] if along.size else None,
                "max_score": round(float(self.slice_scores[value - 1].max(initial=0.0)), 4),
            }
            if text in self.anchors:
                entry["anchor_slice"] = self.anchors[text]
            if text in self.components:
                entry["components"] = self.components[text]
            prompts.append(entry)
        return {
            "labels": {str(k): v for k, v in self.legend.items()},
            "method": self.method,
            "axis": self.axis,
            "shape": list(self.label_map.shape),
            "prompts": prompts,
            "slice_scores": {
                text: [round(float(s), 4) for s in self.slice_scores[value - 1]] for value, text in self.legend.items()
            },
            "encoded_slices": self.encoded_slices,
            "skipped_slices": self.skipped_slices,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------- helpers


def _index(axis: int, i: int) -> tuple:
    where: list = [slice(None)] * 3
    where[axis] = i
    return tuple(where)


def _quantise(score: float) -> int:
    """A score in (0, 1] as 1..255 (0 means no candidate)."""
    return int(np.clip(np.ceil(score * 255.0), 1, 255))


def _blank_slices(volume: Volume, axis: int) -> np.ndarray:
    """True for slices holding a single value (padding, air-only): nothing for the model to find."""
    other = tuple(a for a in range(3) if a != axis)
    array = volume.array
    return np.asarray(array.max(axis=other) == array.min(axis=other))


def _encoded(volume: Volume, indices: Sequence[int], predictor, settings: _Settings) -> Iterator[int]:
    """Set ``predictor`` to each slice in turn (yielding its index); features of a batch are dropped after it.

    With ``batch`` > 1 and a predictor that encodes batches (:meth:`Sam3Predictor.encode`), ``batch``
    slices go through the image encoder in one forward; otherwise each slice is encoded by ``set_image``.
    """
    axis, window, batch = settings.axis, settings.window, settings.batch
    if batch <= 1 or not hasattr(predictor, "encode"):
        for i in indices:
            predictor.set_image(slice_rgb(volume, i, axis, window))
            yield i
        return
    for start in range(0, len(indices), batch):
        chunk = list(indices[start : start + batch])
        encoded = predictor.encode([slice_rgb(volume, i, axis, window) for i in chunk])
        for i, image in zip(chunk, encoded, strict=True):
            predictor.set_encoded(image)
            yield i
        del encoded


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class SliceComponents:
    """3D connected components of one prompt's candidates, built slice by slice (no 3D label array).

    Each slice's candidate mask is split into 2D components (8-connected); a 2D component joins
    the 3D component of every component it overlaps on the previous slice.
    """

    def __init__(self) -> None:
        self.sets = _UnionFind()
        self.slice_of: list[int] = []
        self.peak: list[float] = []
        self._previous: tuple[int, np.ndarray, int] | None = None  # (slice, 2D labels, first node id)

    def add_slice(self, index: int, scores: np.ndarray) -> None:
        """``scores`` (H, W) uint8 quantised candidate scores of slice ``index`` (slices in order)."""
        labels, count = label_components(scores > 0)  # 8-connected in-plane
        if count == 0:
            self._previous = None
            return
        first = len(self.slice_of)
        peaks = ndimage.maximum(scores, labels, index=np.arange(1, count + 1))
        for peak in np.atleast_1d(peaks):
            self.sets.add()
            self.slice_of.append(index)
            self.peak.append(float(peak) / 255.0)
        if self._previous is not None and self._previous[0] == index - 1:
            _, before, before_first = self._previous
            both = (before > 0) & (labels > 0)
            if both.any():
                codes = np.unique(before[both].astype(np.int64) * (count + 1) + labels[both])
                for a, b in zip(codes // (count + 1), codes % (count + 1), strict=True):
                    self.sets.union(before_first + int(a) - 1, first + int(b) - 1)
        self._previous = (index, labels, first)

    def decide(self, threshold: float, min_slices: int, window: int, forced: set[int] = frozenset()) -> dict:
        """Keep or drop each 3D component; returns the kept roots and a summary for the legend."""
        roots = [self.sets.find(n) for n in range(len(self.slice_of))]
        per_root: dict[int, dict[int, float]] = {}
        for node, root in enumerate(roots):
            slices = per_root.setdefault(root, {})
            slices[self.slice_of[node]] = max(slices.get(self.slice_of[node], 0.0), self.peak[node])
        kept, summary = set(), {"kept": [], "dropped": []}
        forced_roots = {roots[n] for n in forced}
        for root, slices in per_root.items():
            span = max(slices) - min(slices) + 1
            fused = _fused_score(slices, window)
            keep = root in forced_roots or (fused >= threshold and span >= min_slices)
            record = {"slices": [min(slices), max(slices)], "fused_score": round(fused, 4)}
            summary["kept" if keep else "dropped"].append(record)
            if keep:
                kept.add(root)
        self.roots = roots
        self.kept = kept
        return summary


def _fused_score(slices: dict[int, float], window: int) -> float:
    """Best mean of per-slice peak scores over ``window`` consecutive slices (missing slices count 0).

    A component shorter than the window is averaged over the whole window, so a lone one-slice
    detection of score s fuses to s / window.
    """
    low, high = min(slices), max(slices)
    peaks = np.array([slices.get(i, 0.0) for i in range(low, high + 1)], dtype=np.float64)
    window = max(int(window), 1)
    if len(peaks) < window:
        return float(peaks.sum() / window)
    return float(np.convolve(peaks, np.ones(window), mode="valid").max() / window)


# ----------------------------------------------------------------------------- the methods


@dataclass
class _Settings:
    """What every method needs besides the volume and prompts."""

    axis: int
    window: object
    batch: int
    threshold: float  # instance score a kept object must reach
    candidate: float  # score a detection needs to be considered at all (hysteresis low end)
    nms_iou: float | None
    progress: Callable[[int, int], None] | None


def segment_volume(
    volume: Volume,
    prompts: Sequence[Prompt | str],
    predictor,
    *,
    axis: int = 0,
    method: str = "auto",
    box_slice: int | None = None,
    box: Box | None = None,
    seeds: Sequence[tuple[int, Box]] = (),
    window=None,
    batch_slices: int = 1,
    score_threshold: float | None = None,
    candidate_threshold: float | None = None,
    min_slices: int = 2,
    fusion_window: int = 3,
    nms_iou: float | None = 0.5,
    video_tracker=None,
    progress: Callable[[int, int], None] | None = None,
) -> VolumeSegmentation:
    """Label every voxel of ``volume`` with the prompt whose concept it shows (0 = none).

    ``predictor`` is a :class:`~medsam3.infer.predictor.Sam3Predictor` (or anything with
    ``set_image`` and ``predict``). ``score_threshold`` defaults to the predictor's;
    ``candidate_threshold`` to half of it: ``slices`` keeps detections down to it when they are
    connected to a confident component, ``track`` keeps following an object down to it. ``box``
    (xyxy pixels of slice ``box_slice``) applies to every prompt: ``slices`` uses it as an
    exemplar on that slice and always keeps what it finds there; ``track`` starts from it.
    ``video_tracker`` (a :class:`~medsam3.infer.tracking.Sam3VideoTracker`) makes ``track`` use
    SAM 3's video model. ``progress(done, total)`` is called after each encoded slice.

    ``propagate`` (:mod:`medsam3.infer.propagation`): the box decoder draws each box on its slice and
    walks outwards both ways until the object ends; ``seeds`` adds more (slice, box) pairs (several
    lesions, several key slices of one object); with boxes it takes exactly one prompt, whose label
    they get. Without boxes it starts from each prompt's most confident slice (one detector pass).
    ``auto`` is ``propagate`` when a box is given and the model has a box decoder, else ``slices``.
    """
    if method not in METHODS:
        raise MedSAM3Error(f"unknown method '{method}': use {' or '.join(METHODS)}")
    if axis not in (0, 1, 2):
        raise MedSAM3Error(f"slice axis must be 0, 1 or 2, got {axis}")
    if (box is None) != (box_slice is None):
        raise PromptError("give --box-slice and --box together: the box is drawn on that slice")
    prompts = as_prompts(prompts)
    count = volume.shape[axis]
    keys = ([(box_slice, box)] if box is not None else []) + list(seeds)
    height, width = (s for a, s in enumerate(volume.shape) if a != axis)
    for index, drawn in keys:
        take_slice(volume.array, index, axis, volume.path)  # out-of-range slice: a clear error
        Prompt(prompts[0].text, boxes=(tuple(drawn),)).check_inside(height, width)
    keys = [(int(index), tuple(float(v) for v in drawn)) for index, drawn in keys]
    if method == "auto":
        drawable = getattr(getattr(predictor, "seam", None), "has_box_decoder", False)
        method = "propagate" if keys and drawable else "slices"
    if method != "propagate" and len(keys) > 1:
        raise PromptError(f"several boxes need method 'propagate' (the {method} method takes one box)")
    if method == "propagate" and keys and len(prompts) != 1:
        raise PromptError("boxes with method 'propagate' take one prompt: the boxed objects get its label")
    if keys:
        box_slice, box = keys[0]
    threshold = float(predictor.score_threshold if score_threshold is None else score_threshold)
    settings = _Settings(
        axis=axis,
        window=window,
        batch=max(1, int(batch_slices)),
        threshold=threshold,
        candidate=threshold / 2 if candidate_threshold is None else float(candidate_threshold),
        nms_iou=nms_iou,
        progress=progress,
    )
    result = VolumeSegmentation(
        label_map=np.zeros(volume.shape, dtype=np.uint8 if len(prompts) < 256 else np.uint16),
        legend={k: p.text for k, p in enumerate(prompts, start=1)},
        slice_scores=np.zeros((len(prompts), count), dtype=np.float32),
        method=method,
        axis=axis,
    )
    blank = _blank_slices(volume, axis)
    result.skipped_slices = [int(i) for i in np.flatnonzero(blank)]
    if blank.all():
        result.notes.append(f"{volume.path}: the volume is empty or constant: nothing to segment")
        return result
    before = getattr(predictor, "encode_count", 0)
    # one byte per voxel and prompt: the best candidate score there (0 = none)
    scores = np.zeros((len(prompts), *volume.shape), dtype=np.uint8)
    if method == "slices":
        _detect_all_slices(volume, prompts, predictor, result, blank, scores, settings, box_slice, box)
        _keep_consistent(prompts, result, scores, settings, box_slice, box, min(min_slices, count),
                         min(fusion_window, count))  # fmt: skip
    elif method == "propagate":
        _propagate(volume, prompts, predictor, result, blank, scores, settings, keys)
    elif video_tracker is not None:
        anchors = _anchors(volume, prompts, predictor, result, blank, settings, box_slice, box)
        _track_with_video_model(volume, prompts, video_tracker, result, anchors, scores, settings)
    else:
        anchors = _anchors(volume, prompts, predictor, result, blank, settings, box_slice, box)
        _track_with_detector(volume, prompts, predictor, result, blank, anchors, scores, settings)
    _merge(result, scores)
    result.encoded_slices = getattr(predictor, "encode_count", 0) - before
    return result


def pair_box_slices(slices: Sequence[int], boxes: Sequence[Box]) -> list[tuple[int, Box]]:
    """``--box-slice`` and ``--box`` values as (slice, box) key boxes: one slice for every box, or one each."""
    if bool(slices) != bool(boxes):
        raise PromptError("--box and --box-slice go together: each box is drawn on a slice")
    if len(slices) == 1:
        return [(int(slices[0]), tuple(b)) for b in boxes]
    if len(slices) != len(boxes):
        raise PromptError(f"{len(boxes)} --box but {len(slices)} --box-slice: give one slice, or one per box")
    return [(int(i), tuple(b)) for i, b in zip(slices, boxes, strict=True)]


def _paint(plane: np.ndarray, masks: np.ndarray, instance_scores: Sequence[float]) -> None:
    """Keep the best quantised score per pixel of a slice (lowest painted first)."""
    for k in np.argsort(np.asarray(instance_scores), kind="stable"):
        region = masks[k]
        plane[region] = np.maximum(plane[region], _quantise(float(instance_scores[k])))


def _detect_all_slices(volume, prompts, predictor, result, blank, scores, settings, box_slice, box) -> None:
    """The detector on every non-blank slice, candidates down to the low threshold painted in."""
    boxed = [Prompt(p.text, boxes=(box,)) for p in prompts] if box is not None else None
    todo = [int(i) for i in np.flatnonzero(~blank)]
    for done, i in enumerate(_encoded(volume, todo, predictor, settings), start=1):
        asked = boxed if i == box_slice else prompts
        found = predictor.predict(asked, score_threshold=settings.candidate, nms_iou=settings.nms_iou)
        for p, res in enumerate(found):
            _paint(scores[p][_index(settings.axis, i)], res.masks, res.scores)
            result.slice_scores[p, i] = float(res.scores.max(initial=0.0))
        if settings.progress is not None:
            settings.progress(done, len(todo))


def _keep_consistent(prompts, result, scores, settings, box_slice, box, min_slices, fusion_window) -> None:
    """3D components per prompt, fused scores, drop what is weak or isolated (in place on ``scores``)."""
    axis, count = settings.axis, result.slice_scores.shape[1]
    for p, prompt in enumerate(prompts):
        comps, forced = SliceComponents(), set()
        for i in range(count):
            plane = scores[p][_index(axis, i)]
            first = len(comps.slice_of)
            comps.add_slice(i, plane)
            if i == box_slice and len(comps.slice_of) > first:
                labels, _ = label_components(plane > 0)
                x0, y0, x1, y1 = (int(round(v)) for v in box)
                inside = np.unique(labels[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)])
                forced.update(first + int(v) - 1 for v in inside if v > 0)
        summary = comps.decide(settings.threshold, min_slices, fusion_window, forced)
        dropped = sorted(summary["dropped"], key=lambda c: -c["fused_score"])
        result.components[prompt.text] = {
            "kept": len(summary["kept"]),
            "dropped": len(dropped),
            "kept_detail": summary["kept"][:_DETAIL],
            "strongest_dropped": dropped[:_DETAIL],
        }
        node = 0
        for i in range(count):
            plane = scores[p][_index(axis, i)]
            labels, n = label_components(plane > 0)  # the same labelling as add_slice
            keep = np.zeros(n + 1, dtype=bool)
            keep[1:] = [comps.roots[node + j] in comps.kept for j in range(n)]
            node += n
            plane[~keep[labels]] = 0


def _merge(result: VolumeSegmentation, scores: np.ndarray) -> None:
    """Label each voxel with the prompt of highest score there (``scores`` is (P, Z, Y, X) uint8)."""
    best = np.zeros(result.label_map.shape, dtype=np.uint8)
    for p in range(scores.shape[0]):
        wins = scores[p] > best
        result.label_map[wins] = p + 1
        best[wins] = scores[p][wins]


@dataclass
class _Anchor:
    index: int
    seeds: list[Box]
    score: float


def _anchors(volume, prompts, predictor, result, blank, settings, box_slice, box) -> dict[str, _Anchor]:
    """Where each prompt's tracking starts: the user's box, else its most confident slice.

    Without a box this is one text-only detector pass over every non-blank slice.
    """
    if box is not None:
        return {p.text: _Anchor(int(box_slice), [box], 1.0) for p in prompts}
    best: dict[str, _Anchor] = {}
    todo = [int(i) for i in np.flatnonzero(~blank)]
    for done, i in enumerate(_encoded(volume, todo, predictor, settings), start=1):
        found = predictor.predict(prompts, score_threshold=settings.threshold, nms_iou=settings.nms_iou)
        for p, res in enumerate(found):
            top = float(res.scores.max(initial=0.0))
            result.slice_scores[p, i] = top
            if len(res) and top > getattr(best.get(res.prompt.text), "score", 0.0):
                best[res.prompt.text] = _Anchor(i, [tuple(float(v) for v in b) for b in res.boxes], top)
        if settings.progress is not None:
            settings.progress(done, len(todo))
    for prompt in prompts:
        if prompt.text in best:
            result.anchors[prompt.text] = best[prompt.text].index
        else:
            result.notes.append(f"'{prompt.text}': no slice scored above {settings.threshold:g}; nothing to track")
    return best


def _track_with_detector(volume, prompts, predictor, result, blank, anchors, scores, settings) -> None:
    """Propagate each prompt's seeds from its anchor with concept + previous-box prompts."""
    from medsam3.infer.tracking import propagate

    axis, count = settings.axis, len(blank)

    def frame_at(i: int) -> np.ndarray:
        return slice_rgb(volume, i, axis, settings.window)

    for p, prompt in enumerate(prompts):
        anchor = anchors.get(prompt.text)
        if anchor is None:
            continue
        result.anchors[prompt.text] = anchor.index
        steps = propagate(frame_at, count, prompt.text, predictor, anchor.index, anchor.seeds,
                          score_threshold=settings.candidate, skip=lambda i: bool(blank[i]))  # fmt: skip
        for step in steps:
            plane = scores[p][_index(axis, step.index)]
            plane[step.mask] = np.maximum(plane[step.mask], _quantise(step.score))
            result.slice_scores[p, step.index] = max(result.slice_scores[p, step.index], step.score)


def _track_with_video_model(volume, prompts, tracker, result, anchors, scores, settings) -> None:
    """SAM 3's video model over the slices, from the anchor to each end (two streams).

    One anchor serves every prompt (the most confident one): the video model detects new
    objects on every frame anyway, the anchor only sets where its memory starts.
    """
    axis, count = settings.axis, volume.shape[settings.axis]
    if not anchors:
        return
    anchor = max(anchors.values(), key=lambda a: a.score).index
    result.anchors = {text: anchor for text in anchors}
    result.notes.append("SAM 3 video model: text prompts only, boxes are not passed to its tracker")
    texts = [p.text for p in prompts]
    for order in (range(anchor, count), range(anchor, -1, -1)):
        frames = (slice_rgb(volume, i, axis, settings.window) for i in order)
        for objects, i in zip(tracker.track(frames, texts), order, strict=True):
            for group, score, mask in zip(objects.groups, objects.scores, objects.masks, strict=True):
                plane = scores[group][_index(axis, i)]
                plane[mask] = np.maximum(plane[mask], _quantise(score))
                result.slice_scores[group, i] = max(result.slice_scores[group, i], score)


def _propagate(volume, prompts, predictor, result, blank, scores, settings, keys) -> None:
    """Each object walked slice to slice by the box decoder from its key box (or its best detection)."""
    from medsam3.infer.propagation import Seed

    if keys:
        _walk(volume, prompts, predictor, result, blank, scores, settings,
              {0: [Seed(index, drawn) for index, drawn in keys]})  # fmt: skip
        return
    with _slices_remembered(predictor):  # the anchor scan encodes every slice; the walks read them again
        anchors = _anchors(volume, prompts, predictor, result, blank, settings, None, None)
        per_prompt = {p: [Seed(anchors[q.text].index, b) for b in anchors[q.text].seeds]
                      for p, q in enumerate(prompts) if q.text in anchors}  # fmt: skip
        _walk(volume, prompts, predictor, result, blank, scores, settings, per_prompt)


@contextmanager
def _slices_remembered(predictor):
    """Keep the image tower's output per slice for one job (text-only propagation encodes each slice
    for the anchor scan, then again for the walks: with this, once). A memo the caller attached wins."""
    seam = getattr(predictor, "seam", None)
    if seam is None or seam.tower_memo is not None:
        yield
        return
    seam.share_tower_outputs(TowerMemo())
    try:
        yield
    finally:
        seam.share_tower_outputs(None)


def _walk(volume, prompts, predictor, result, blank, scores, settings, per_prompt) -> None:
    """Walk each prompt's seeds through the volume and record masks, scores and stops."""
    from medsam3.infer.propagation import propagate_seeds

    axis, count = settings.axis, len(blank)
    size = tuple(n for a, n in enumerate(volume.shape) if a != axis)

    def set_slice(i: int) -> None:
        predictor.set_image(slice_rgb(volume, i, axis, settings.window))

    def progress(done: int) -> None:
        if settings.progress is not None:
            settings.progress(min(done, count), count)

    for p, seeds in per_prompt.items():
        walks, _ = propagate_seeds(predictor, set_slice, count, seeds, size=size,
                                   blank=lambda i: bool(blank[i]), progress=progress)  # fmt: skip
        text = prompts[p].text
        result.anchors[text] = seeds[0].index
        objects = []
        for walk in walks:
            for i, step in walk.slices.items():
                plane = scores[p][_index(axis, i)]
                level = _quantise(min(max(step.iou_estimate, 1e-3), 1.0))
                plane[step.mask] = np.maximum(plane[step.mask], level)
                result.slice_scores[p, i] = max(result.slice_scores[p, i], min(max(step.iou_estimate, 0.0), 1.0))
            if not walk.slices:
                result.notes.append(f"'{text}': the box on slice {walk.seed.index} outlines nothing there")
            objects.append({
                "key_slice": walk.seed.index,
                "box": [round(v, 2) for v in walk.seed.box],
                "slices": list(walk.extent) if walk.extent else None,
                "stops": {d: {"slice": s, "reason": why} for d, (s, why) in walk.stops.items()},
            })  # fmt: skip
        result.components[text] = {"objects": objects}


# ----------------------------------------------------------------------------- files


def legend_path(mask_path: str | Path) -> Path:
    """``MASK.nii.gz`` -> ``MASK.json``: the legend sits next to the mask."""
    from medsam3.utils.files import strip_suffix

    mask_path = Path(mask_path)
    return mask_path.with_name(strip_suffix(mask_path) + ".json")


def check_volume_outputs(volume_path: str | Path, out: str | Path, dicom_seg: str | Path | None = None) -> Path:
    """Refuse unusable output paths of :func:`segment_volume_file` before any work; returns ``out``."""
    from medsam3.data.volume_io import MASK_SUFFIXES
    from medsam3.utils.outputs import check_distinct, check_output_file

    out = Path(out)
    if not out.name.lower().endswith(MASK_SUFFIXES):
        raise MedSAM3Error(f"{out}: the mask is written as {', '.join(MASK_SUFFIXES)}")
    outputs = [("--out", out), ("its legend", legend_path(out))]
    if dicom_seg is not None:
        outputs.append(("--dicom-seg", Path(dicom_seg)))
    series = Path(volume_path).is_dir()  # a DICOM series folder is read whole: nothing may be added to it
    for option, path in outputs:
        check_output_file(path, inputs=[volume_path], sealed=[volume_path] if series else [], option=option)
    check_distinct(outputs)
    return out


def segment_volume_file(
    volume_path: str | Path,
    prompts: Sequence[Prompt | str],
    predictor,
    out: str | Path,
    *,
    dicom_seg: str | Path | None = None,
    series_uid: str | None = None,
    notes: Sequence[str] = (),
    **options,
) -> VolumeSegmentation:
    """Read a volume, segment it, write the label map (input geometry), its JSON legend, and DICOM-SEG.

    The library behind ``medsam3 segment-volume``. Every output path is checked before any work
    (none may be, or lie inside, the input; none may be a folder; they must differ from each other),
    and the DICOM-SEG request too. The mask, DICOM-SEG and legend are written to temporaries and
    moved into place together (legend last): a failure leaves earlier files untouched. An empty
    result writes an empty mask, legend and DICOM-SEG (one empty segment per prompt), with a note.
    """
    from medsam3.data.volume_io import check_dicom_seg_sources, read_volume, write_dicom_seg, write_mask
    from medsam3.utils.files import atomic_files, write_json_atomic

    out = check_volume_outputs(volume_path, out, dicom_seg)
    volume = read_volume(volume_path, series_uid=series_uid)
    if dicom_seg is not None and not volume.source_files:
        raise MedSAM3Error(f"{dicom_seg}: DICOM-SEG needs a DICOM series folder as input, not {volume.path}")
    if dicom_seg is not None:
        check_dicom_seg_sources(volume, dicom_seg)
    seg = segment_volume(volume, prompts, predictor, **options)
    seg.notes[:0] = list(notes)
    with atomic_files() as files:
        write_mask(files.path(out), seg.label_map, volume)
        written_seg = None
        if dicom_seg is not None:
            write_dicom_seg(files.path(dicom_seg), seg.label_map, volume, dict(seg.legend))
            written_seg = str(dicom_seg)
            if not seg.label_map.any():
                seg.notes.append(f"nothing was found: {dicom_seg} holds only empty segments")
        legend = seg.to_json(volume)
        loaded = getattr(predictor, "loaded", None)
        model = getattr(loaded, "spec", None)
        precision = loaded.precision.to_json() if loaded is not None else None
        write_json_atomic(
            files.path(legend_path(out)),
            {
                "volume": str(volume.path),
                "mask": out.name,
                "dicom_seg": written_seg,
                "model": model,
                "precision": precision,
                "spacing": list(volume.spacing),
                **legend,
            },
            allow_nan=False,
        )
    return seg
