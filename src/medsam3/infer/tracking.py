"""Follow objects through slices and frames: IoU association, detector propagation, SAM 3's tracker.

Three ways to keep an object's identity from one frame (or slice) to the next:

- :class:`IoUTracker` associates each frame's detections with the live tracks by mask IoU
  (Hungarian matching, per prompt), tolerating short gaps. It needs nothing but the detector, so
  it works with every model, including the fine-tuned ``nano``.
- :func:`propagate` starts from seed boxes on an anchor slice and walks both ways; on each new
  slice the detector is prompted with the concept *and* the object's box from the previous slice
  (MedSAM-3's text + box mode, its strongest), and the instance overlapping the previous mask
  most continues the object. This is the ``track`` method for volumes.
- :class:`Sam3VideoTracker` runs transformers' ``Sam3VideoModel`` (SAM 3's detector plus its
  SAM 2-style memory tracker) with *our* detector inside.

What was found in transformers 5.24 (``models/sam3_video``, ``models/sam3_tracker_video``):
``Sam3VideoModel.detector_model`` is a plain ``Sam3Model``, so a fine-tuned detector can be
carried exactly (here the very module is shared, no copy). The tracker (``tracker_model``: memory
attention, memory encoder, SAM mask decoder; and ``tracker_neck``) has trained weights only in
Meta's ``facebook/sam3`` checkpoint, made for the full 1008 px architecture; ``nano`` and ``tiny``
have no trained tracker, so with them the video model can only run with a random tracker (tests).
The tracker also needs a hidden size above its fixed 64 memory channels: at 64 the object
pointers keep a stray dimension and ``torch.cat`` fails (a transformers limitation), so small
detectors get a tracker neck of their own width. Streaming sessions keep every processed frame
and every frame's memory; :class:`Sam3VideoTracker` prunes both to the window the tracker reads,
so memory stays flat with clip length.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam3.data.masks import mask_iou_matrix
from medsam3.errors import ModelSpecError
from medsam3.infer.types import Box, Prompt

# ----------------------------------------------------------------------------- IoU association


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    rows, cols = np.nonzero(mask)
    return (float(rows.mean()), float(cols.mean())) if rows.size else None


def shift_mask(mask: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``mask`` moved by (dy, dx) pixels, rounded; what leaves the frame is lost, what enters is empty."""
    dy, dx = int(round(dy)), int(round(dx))
    if dy == 0 and dx == 0:
        return mask
    height, width = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = mask[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def box_iou(a: Box, b: Box) -> float:
    """IoU of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_by_iou(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) of a one-to-one assignment maximising total IoU, each pair at least ``threshold``."""
    from scipy.optimize import linear_sum_assignment

    if iou.size == 0:
        return []
    rows, cols = linear_sum_assignment(-iou)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if iou[r, c] >= threshold]


def drop_duplicates(
    masks: np.ndarray, scores: Sequence[float], groups: Sequence[int], overlap: float = 0.5
) -> list[int]:
    """Indices of detections to keep: non-empty, and not mostly covered by a better one of the same prompt.

    SAM 3 often returns a weaker second query on the same object (box NMS misses it when the
    boxes differ); a detection whose mask lies ``overlap`` or more inside a higher-scoring kept
    mask of its prompt would only spawn a spurious object id.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    kept: list[int] = []
    for i in order:
        area = int(masks[i].sum())
        if area == 0:
            continue
        if any(groups[j] == groups[i] and (masks[i] & masks[j]).sum() >= overlap * area for j in kept):
            continue
        kept.append(int(i))
    return sorted(kept)


@dataclass
class Track:
    """One object followed through a clip: where it was seen, how large, how confidently."""

    object_id: int
    group: int  # the prompt it belongs to
    last_mask: np.ndarray | None = field(repr=False)  # None once the track has retired
    last_frame: int
    frames: list[int] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    centroid: tuple[float, float] | None = None
    velocity: tuple[float, float] = (0.0, 0.0)  # pixels per frame (rows, cols), from the last two sightings

    def predicted_mask(self, frame: int) -> np.ndarray:
        """The last mask moved on at the track's velocity to ``frame`` (constant-velocity guess)."""
        steps = frame - self.last_frame
        return shift_mask(self.last_mask, self.velocity[0] * steps, self.velocity[1] * steps)

    def observe(self, frame: int, mask: np.ndarray, score: float) -> None:
        centroid = _centroid(mask)
        if self.centroid is not None and centroid is not None and frame > self.last_frame:
            gap = frame - self.last_frame
            self.velocity = ((centroid[0] - self.centroid[0]) / gap, (centroid[1] - self.centroid[1]) / gap)
        self.centroid = centroid if centroid is not None else self.centroid
        self.last_mask, self.last_frame = mask, frame
        self.frames.append(frame)
        self.areas.append(int(mask.sum()))
        self.scores.append(float(score))

    def to_json(self, prompt: str | None = None) -> dict:
        return {
            "id": self.object_id,
            "prompt": prompt,
            "first_frame": self.frames[0],
            "last_frame": self.frames[-1],
            "frames_present": len(self.frames),
            "frames": self.frames,
            "area": self.areas,
            "score": [round(s, 4) for s in self.scores],
            "mean_score": round(float(np.mean(self.scores)), 4),
        }


class IoUTracker:
    """Gives detections stable object ids by matching them to live tracks of the same prompt by IoU.

    Each track's last mask is first moved on at the track's own velocity (its centroid's motion
    between its last two sightings), so an object that moves steadily, or is missed for a frame
    while moving, still overlaps where it is expected.

    A track survives up to ``max_gap`` frames without a match (an object briefly missed by the
    detector keeps its id); after that it retires and a reappearance gets a new id. Only the last
    mask of each track is kept, so memory does not grow with clip length (``Track.frames`` and
    ``areas`` are small lists).
    """

    def __init__(self, iou_threshold: float = 0.1, max_gap: int = 2):
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.max_gap = max_gap
        self.tracks: dict[int, Track] = {}
        self._next_id = 1

    def live(self, frame: int, group: int) -> list[Track]:
        return [
            t
            for t in self.tracks.values()
            if t.group == group
            and t.last_mask is not None
            and frame - t.last_frame <= self.max_gap + 1
            and t.last_frame < frame
        ]

    def update(
        self,
        frame: int,
        masks: np.ndarray,
        scores: Sequence[float],
        groups: Sequence[int] | None = None,
    ) -> list[int]:
        """Object ids for this frame's detections (N, H, W), in input order."""
        masks = np.asarray(masks, dtype=bool)
        groups = [0] * len(masks) if groups is None else [int(g) for g in groups]
        if not (len(masks) == len(scores) == len(groups)):
            raise ValueError(f"{len(masks)} masks, {len(scores)} scores and {len(groups)} groups")
        ids: list[int | None] = [None] * len(masks)
        for group in sorted(set(groups)):
            members = [i for i, g in enumerate(groups) if g == group]
            tracks = self.live(frame, group)
            if tracks:
                expected = np.stack([t.predicted_mask(frame) for t in tracks])
                iou = mask_iou_matrix(expected, masks[members])
                for r, c in match_by_iou(iou, self.iou_threshold):
                    ids[members[c]] = tracks[r].object_id
            for i in members:
                if ids[i] is None:
                    ids[i] = self._next_id
                    self.tracks[self._next_id] = Track(self._next_id, group, masks[i], frame - 1)
                    self._next_id += 1
        for i, object_id in enumerate(ids):
            self.tracks[object_id].observe(frame, masks[i], scores[i])
        for track in self.tracks.values():  # retired tracks let go of their mask
            if track.last_mask is not None and frame - track.last_frame > self.max_gap:
                track.last_mask = None  # type: ignore[assignment]
        return ids  # type: ignore[return-value]


# ----------------------------------------------------------------------------- detector propagation


@dataclass
class TrackStep:
    """One object on one slice: its mask, box and the detector's score there."""

    index: int
    object_id: int
    mask: np.ndarray = field(repr=False)
    box: Box
    score: float


@dataclass
class _Follow:
    object_id: int
    box: Box
    mask: np.ndarray | None
    misses: int = 0


def _best_continuation(result, previous: _Follow, min_iou: float) -> tuple[int, float] | None:
    """Index of the instance that continues ``previous`` (mask IoU, else box IoU) and that IoU."""
    if len(result) == 0:
        return None
    if previous.mask is not None and previous.mask.shape == result.masks.shape[1:]:
        overlaps = mask_iou_matrix(previous.mask[None], result.masks)[0]
    else:
        overlaps = np.array([box_iou(previous.box, tuple(b)) for b in result.boxes], dtype=np.float32)
    best = int(np.argmax(overlaps))
    return (best, float(overlaps[best])) if overlaps[best] >= min_iou else None


def propagate(
    frame_at: Callable[[int], np.ndarray],
    count: int,
    text: str,
    predictor,
    anchor: int,
    seeds: Sequence[Box],
    *,
    min_iou: float = 0.1,
    patience: int = 1,
    score_threshold: float | None = None,
    skip: Callable[[int], bool] | None = None,
) -> Iterator[TrackStep]:
    """Follow each seed box from slice ``anchor`` outwards in both directions, one encode per slice.

    On the anchor the detector gets the concept plus each seed box; the instance whose box overlaps
    the seed most becomes object k (ids 1..len(seeds), in seed order). Then, slice by slice, every
    live object is prompted with the concept and its previous box (all objects in one batched
    detector pass); the instance overlapping the previous mask by at least ``min_iou`` continues
    it. An object missed on more than ``patience`` consecutive slices ends; a direction ends when
    no object is live. ``skip(i)`` marks slices not worth encoding (blank): they count as misses.
    ``predictor`` needs ``set_image(rgb)`` and ``predict(prompts, score_threshold=...)``.
    """
    if not 0 <= anchor < count:
        raise ValueError(f"anchor slice {anchor} is outside 0..{count - 1}")
    settings = {} if score_threshold is None else {"score_threshold": score_threshold}
    predictor.set_image(frame_at(anchor))
    results = predictor.predict([Prompt(text, boxes=(tuple(s),)) for s in seeds], **settings)
    started: list[_Follow] = []
    for object_id, (seed, result) in enumerate(zip(seeds, results, strict=True), start=1):
        if len(result) == 0:
            continue
        best = int(np.argmax([box_iou(tuple(seed), tuple(b)) for b in result.boxes]))
        box = tuple(float(v) for v in result.boxes[best])
        started.append(_Follow(object_id, box, result.masks[best]))  # type: ignore[arg-type]
        yield TrackStep(anchor, object_id, result.masks[best], box, float(result.scores[best]))  # type: ignore[arg-type]
    for step in (1, -1):
        live = [_Follow(f.object_id, f.box, f.mask) for f in started]
        index = anchor + step
        while live and 0 <= index < count:
            if skip is not None and skip(index):
                for follow in live:
                    follow.misses += 1
            else:
                predictor.set_image(frame_at(index))
                prompts = [Prompt(text, boxes=(f.box,)) for f in live]
                for follow, result in zip(live, predictor.predict(prompts, **settings), strict=True):
                    found = _best_continuation(result, follow, min_iou)
                    if found is None:
                        follow.misses += 1
                        continue
                    best, _ = found
                    follow.box = tuple(float(v) for v in result.boxes[best])  # type: ignore[assignment]
                    follow.mask, follow.misses = result.masks[best], 0
                    yield TrackStep(index, follow.object_id, follow.mask, follow.box, float(result.scores[best]))
            live = [f for f in live if f.misses <= patience]
            index += step


# ----------------------------------------------------------------------------- SAM 3's video model

#: The tracker sizes used when a random (untrained) tracker is built for a small detector.
SMALL_TRACKER = dict(
    hidden=128,
    memory_attention_num_layers=1,
    memory_attention_feed_forward_hidden_size=256,
    memory_fuser_intermediate_dim=256,
    mask_decoder_mlp_dim=256,
)
_TRACKER_PREFIXES = ("tracker_model.", "tracker_neck.")
_MEMORY_CHANNELS = 64  # fixed inside transformers' tracker (cross-attention kv_in_dim)


def _tracker_config(detector_config, hidden: int, **sizes):
    """A ``Sam3TrackerVideoConfig`` whose grid and image size follow the detector's."""
    from transformers import Sam3TrackerVideoConfig

    vision = detector_config.vision_config.to_dict()
    vision["fpn_hidden_size"] = hidden
    config = Sam3TrackerVideoConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=hidden),
        mask_decoder_config=dict(
            hidden_size=hidden, mlp_dim=sizes.pop("mask_decoder_mlp_dim", 2048), iou_head_hidden_dim=hidden
        ),
        memory_attention_hidden_size=hidden,
        memory_encoder_hidden_size=hidden,
        mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden,
        **sizes,
    )
    config.image_size = detector_config.image_size  # also sets the feature grid and RoPE sizes
    return config


def _resolve_tracker_folder(tracker: str | Path) -> Path:
    folder = Path(tracker)
    if folder.is_dir():
        return folder
    if folder.exists() or str(tracker).count("/") != 1:
        raise ModelSpecError(f"{tracker}: not a folder holding a SAM 3 video checkpoint (config.json + safetensors)")
    try:  # a hub id such as facebook/sam3
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(tracker), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:  # hub errors come in many classes; all mean "not available"
        raise ModelSpecError(
            f"{tracker}: cannot get the SAM 3 video checkpoint ({type(error).__name__}); "
            "download it where the hub is reachable and pass the folder"
        ) from None


def _read_tracker_weights(folder: Path) -> dict:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelSpecError(f"{folder}: no .safetensors weights in the tracker folder")
    weights = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(_TRACKER_PREFIXES):
                    weights[key] = handle.get_tensor(key)
    if not weights:
        raise ModelSpecError(f"{folder}: the checkpoint has no tracker weights (tracker_model.*, tracker_neck.*)")
    return weights


def build_video_model(
    loaded,
    tracker: str | Path | None = None,
    *,
    untrained_tracker: dict | None = None,
    **settings,
):
    """A ``Sam3VideoModel`` whose detector is ``loaded.model`` itself (fine-tuned weights carried as is).

    The tracker comes from ``tracker``: a folder (or hub id) of a SAM 3 video checkpoint such as
    ``facebook/sam3``; only its ``tracker_model.*``/``tracker_neck.*`` weights are used, and they
    must all be present. Without one, ``untrained_tracker`` (sizes, e.g. :data:`SMALL_TRACKER`)
    builds a random tracker, for tests and timing only. ``settings`` override ``Sam3VideoConfig``
    fields (``score_threshold_detection``, ``new_det_thresh``, ``hotstart_delay``...).
    """
    import torch
    from transformers import AutoModel, Sam3VideoConfig, Sam3VideoModel
    from transformers.models.sam3.modeling_sam3 import Sam3VisionNeck

    detector_config = loaded.model.config
    if loaded.backbone.name != "sam3":
        raise ModelSpecError(
            f"SAM 3's video tracker reads SAM 3's own image features; '{loaded.spec}' has the "
            f"{loaded.backbone.name} backbone: use the detector-driven tracking (no --tracker)"
        )
    if tracker is not None:
        folder = _resolve_tracker_folder(tracker)
        try:
            saved = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise ModelSpecError(f"{folder}: no readable config.json ({error})") from None
        tracker_config = saved.get("tracker_config")
        if not tracker_config:
            raise ModelSpecError(f"{folder}: config.json has no tracker_config (not a SAM 3 video checkpoint)")
        saved_size = saved.get("detector_config", {}).get("image_size", detector_config.image_size)
        if saved_size != detector_config.image_size:
            raise ModelSpecError(
                f"{folder}: tracker made for {saved_size} px images, the detector takes {detector_config.image_size}"
            )
        hidden = int(tracker_config.get("vision_config", {}).get("fpn_hidden_size", 256))
        base = {k: v for k, v in saved.items() if k in Sam3VideoConfig.__dataclass_fields__}
        base.pop("detector_config", None)
        base["tracker_config"] = tracker_config
    elif untrained_tracker is not None:
        sizes = dict(untrained_tracker)
        hidden = int(sizes.pop("hidden", 256))
        base = {"tracker_config": _tracker_config(detector_config, hidden, **sizes).to_dict()}
    else:
        raise ModelSpecError(
            f"SAM 3's video tracker has no trained weights for '{loaded.spec}': pass a SAM 3 video "
            "checkpoint (e.g. a facebook/sam3 snapshot) as the tracker, or use the detector-driven tracking"
        )
    if hidden <= _MEMORY_CHANNELS:
        raise ModelSpecError(f"the tracker's hidden size must exceed {_MEMORY_CHANNELS}, got {hidden}")
    config = Sam3VideoConfig(detector_config=detector_config.to_dict(), **{**base, **settings})
    with torch.device("meta"):  # the throwaway detector built here is never materialised
        model = Sam3VideoModel(config)
    neck_config = detector_config.vision_config.__class__(**detector_config.vision_config.to_dict())
    neck_config.fpn_hidden_size = hidden
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.tracker_model = AutoModel.from_config(config.tracker_config, remove_vision_encoder=True)
        model.tracker_neck = Sam3VisionNeck(neck_config)
    model.detector_model = loaded.model
    model.tracker_model.to(loaded.device)
    model.tracker_neck.to(loaded.device)
    if tracker is not None:
        _load_tracker(model, _read_tracker_weights(folder), folder)
    return model.eval()


def _load_tracker(model, weights: dict, folder: Path) -> None:
    """Copy a checkpoint's tracker tensors in; every tracker parameter and buffer must be there."""
    import torch

    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith(_TRACKER_PREFIXES)}
    missing = sorted(set(targets) - set(weights))
    if missing:
        raise ModelSpecError(f"{folder}: tracker weights incomplete, {len(missing)} missing (first: {missing[0]})")
    with torch.no_grad():
        for key, target in targets.items():
            if target.shape != weights[key].shape:
                raise ModelSpecError(
                    f"{folder}: tracker weight {key} has shape {tuple(weights[key].shape)}, "
                    f"the model needs {tuple(target.shape)}"
                )
            target.copy_(weights[key])


@dataclass
class FrameObjects:
    """Everything the video model reports on one frame, masks at the frame's size."""

    index: int
    object_ids: list[int]
    groups: list[int]  # prompt index of each object
    scores: list[float]
    masks: np.ndarray = field(repr=False)  # (N, H, W) bool, no pixel in two objects


class Sam3VideoTracker:
    """Stream frames through ``Sam3VideoModel`` and get per-frame objects with SAM 3's own ids.

    Only the state the tracker reads is kept: the current frame's pixels and features, and for
    each object the memories of the last ``memory_window`` frames (SAM 3 reads 7 mask memories
    and 16 object pointers back), so memory does not grow with the clip.
    """

    def __init__(self, video_model, seam, *, memory_window: int | None = None):
        self.model = video_model
        self.seam = seam
        config = video_model.config.tracker_config
        self.memory_window = memory_window or max(config.num_maskmem, config.max_object_pointers_in_encoder) + 1

    def track(self, frames: Iterable[np.ndarray], prompts: Sequence[str]) -> Iterator[FrameObjects]:
        import torch
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        model = self.model
        device = next(model.detector_model.parameters()).device
        session = Sam3VideoInferenceSession(
            inference_device=device, inference_state_device=device, video_storage_device=device, dtype=torch.float32
        )
        texts = [" ".join(p.split()) for p in prompts]
        for text in texts:
            pid = session.add_prompt(text)
            ids, mask = self.seam.backbone.tokenize([text])
            session.prompt_input_ids[pid] = ids.to(device)
            session.prompt_attention_masks[pid] = mask.to(device)
        group_of = {pid: texts.index(text) for pid, text in session.prompts.items()}
        self.session = session  # the live session, for inspection
        for index, rgb in enumerate(frames):
            pixels = self.seam.pixel_values([rgb])
            with torch.inference_mode():
                out = model(inference_session=session, frame=pixels, frame_idx=index)
            yield self._frame_objects(session, out, index, rgb.shape[:2], group_of)
            self._prune(session, index)

    def _frame_objects(self, session, out, index: int, size: tuple[int, int], group_of: dict) -> FrameObjects:
        import torch
        import torch.nn.functional as F

        hidden = set(out.suppressed_obj_ids or ()) | set(session.hotstart_removed_obj_ids)
        ids = [i for i in sorted(out.obj_id_to_mask) if i not in hidden]
        if not ids:
            return FrameObjects(index, [], [], [], np.zeros((0, *size), dtype=bool))
        logits = [out.obj_id_to_mask[i].float().reshape(1, 1, *out.obj_id_to_mask[i].shape[-2:]) for i in ids]
        up = F.interpolate(torch.cat(logits), size=size, mode="bilinear", align_corners=False)[:, 0]
        scores = [float(out.obj_id_to_score.get(i, 0.0)) for i in ids]
        # one object per pixel: the most confident object's logit wins
        winner = torch.argmax(up, dim=0)
        masks = [(up[k] > 0) & (winner == k) for k in range(len(ids))]
        masks_np = torch.stack(masks).cpu().numpy()
        keep = [k for k in range(len(ids)) if masks_np[k].any()]
        return FrameObjects(
            index,
            [int(ids[k]) for k in keep],
            [group_of[session.obj_id_to_prompt_id[ids[k]]] for k in keep],
            [scores[k] for k in keep],
            masks_np[keep],
        )

    def _prune(self, session, index: int) -> None:
        """Drop pixels of finished frames and memories older than the tracker's window."""
        for old in [i for i in (session.processed_frames or {}) if i <= index]:
            del session.processed_frames[old]
        oldest = index - self.memory_window
        for outputs in session.output_dict_per_obj.values():
            for old in [i for i in outputs["non_cond_frame_outputs"] if i < oldest]:
                del outputs["non_cond_frame_outputs"][old]
