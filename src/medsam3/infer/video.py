"""Segment a video by naming concepts: per-frame masks with stable object ids, an overlay, a track summary.

The library behind ``medsam3 segment-video``. Frames are streamed: each is encoded once, its
detections get object ids from an :class:`~medsam3.infer.tracking.IoUTracker` (or from SAM 3's
video model when a :class:`~medsam3.infer.tracking.Sam3VideoTracker` is given), its label PNG and
overlay frame are written, and nothing of it is kept but each object's last mask. Output folder::

    OUT/masks/frame_00000.png   object ids (0 = background), 8-bit, 16-bit past id 255
    OUT/overlay.mp4             the clip with each object in its own colour and "prompt #id"
    OUT/tracks.json             per object: prompt, frames present, area (pixels) and score over time

The folder is assembled next to ``OUT`` and moved into place at the end, so a clip that fails
half way (a frame of another size, a corrupt frame) leaves no partial output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam3.data.video_io import Video, read_video, write_video
from medsam3.errors import MedSAM3Error, OutputError
from medsam3.infer.tracking import IoUTracker, Track, drop_duplicates
from medsam3.infer.types import Prompt, as_prompts
from medsam3.utils.outputs import check_output_folder

MASK_PATTERN = "masks/frame_{:05d}.png"


@dataclass
class VideoSegmentation:
    """What was written for a clip, and the objects followed through it."""

    out_dir: Path
    frames: int
    fps: float
    size: tuple[int, int]
    prompts: list[str]
    tracks: list[dict] = field(default_factory=list)  # Track.to_json() entries
    notes: list[str] = field(default_factory=list)


def paint_ids(masks: np.ndarray, ids: Sequence[int], scores: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """An (H, W) object-id map; where objects overlap the higher score wins."""
    top = max(ids, default=0)
    labels = np.zeros(size, dtype=np.uint8 if top <= 255 else np.uint16)
    for k in np.argsort(np.asarray(scores, dtype=np.float64), kind="stable"):
        labels[masks[k]] = ids[k]
    return labels


def _overlay_frame(rgb: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> np.ndarray:
    from medsam3.visualize import instance_color, overlay

    present = [int(v) for v in np.unique(labels) if v]
    if not present:
        return rgb
    return overlay(
        rgb,
        [labels == v for v in present],
        colors=[instance_color(v - 1) for v in present],
        labels=[f"{names[v]} #{v}" for v in present],
    )


def check_video_output(out_dir: str | Path, source: str | Path | None = None) -> Path:
    """Refuse an output folder before any work: a file, unwritable, holding the input, or a folder
    that holds something other than an earlier segment-video output (it is replaced as a whole)."""
    frames = source is not None and Path(source).is_dir()  # a frame folder is read whole
    out_dir = check_output_folder(out_dir, inputs=[source], sealed=[source] if frames else [], replaces=True)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "tracks.json").is_file():
        raise OutputError(f"{out_dir}: exists and is not an earlier segment-video output; choose a new or empty folder")
    return out_dir


def _detections(predictor, rgb: np.ndarray, prompts: list[Prompt], nms_iou: float | None):
    """Masks, scores and prompt index of every instance found in one frame (empty masks and duplicates out)."""
    predictor.set_image(rgb)
    masks, scores, groups = [], [], []
    for p, result in enumerate(predictor.predict(prompts, nms_iou=nms_iou)):
        masks.extend(result.masks)
        scores.extend(float(s) for s in result.scores)
        groups.extend([p] * len(result))
    stack = np.stack(masks) if masks else np.zeros((0, *rgb.shape[:2]), dtype=bool)
    keep = drop_duplicates(stack, scores, groups)
    return stack[keep], [scores[k] for k in keep], [groups[k] for k in keep]


def segment_video(
    source: str | Path | Video,
    prompts: Sequence[Prompt | str],
    predictor,
    out_dir: str | Path,
    *,
    video_tracker=None,
    iou_threshold: float = 0.1,
    max_gap: int = 2,
    nms_iou: float | None = 0.5,
    write_overlay: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> VideoSegmentation:
    """Segment every frame of ``source`` for ``prompts`` and write masks, overlay and tracks (see module doc).

    ``predictor`` is a :class:`~medsam3.infer.predictor.Sam3Predictor` (or anything with
    ``set_image``/``predict``); detections of one prompt are linked across frames by mask IoU
    (``iou_threshold``), an object may vanish for up to ``max_gap`` frames and keep its id.
    With ``video_tracker`` the ids come from SAM 3's video model instead, and ``predictor`` is
    not used.
    """
    from medsam3.data.image_io import save_mask_png
    from medsam3.utils.files import atomic_dir, write_json_atomic

    prompts = as_prompts(prompts)
    out_dir = check_video_output(out_dir, source.path if isinstance(source, Video) else source)
    video = source if isinstance(source, Video) else read_video(source)
    texts = [p.text for p in prompts]
    tracks: dict[int, Track] = {}
    names: dict[int, str] = {}
    count = 0

    def frames_with_ids(folder: Path) -> Iterator[np.ndarray]:
        nonlocal count
        if video_tracker is not None:
            stream = _sam3_stream(video, video_tracker, texts)
        else:
            stream = _iou_stream(video, predictor, prompts, nms_iou, IoUTracker(iou_threshold, max_gap))
        for index, (rgb, masks, scores, groups, ids) in enumerate(stream):
            for k, object_id in enumerate(ids):
                names[object_id] = texts[groups[k]]
                track = tracks.setdefault(object_id, Track(object_id, groups[k], None, index))  # type: ignore[arg-type]
                track.last_frame = index
                track.frames.append(index)
                track.areas.append(int(masks[k].sum()))
                track.scores.append(float(scores[k]))
            labels = paint_ids(masks, ids, scores, video.size)
            save_mask_png(folder / MASK_PATTERN.format(index), labels)
            count = index + 1
            if progress is not None:
                progress(count, video.frame_count)
            yield _overlay_frame(rgb, labels, names)

    with atomic_dir(out_dir) as tmp:
        (tmp / "masks").mkdir()
        if write_overlay:
            write_video(tmp / "overlay.mp4", frames_with_ids(tmp), video.fps)
        else:
            for _ in frames_with_ids(tmp):
                pass
        if count == 0:
            raise MedSAM3Error(f"{video.path}: the video has no frames")
        entries = [tracks[i].to_json(names[i]) for i in sorted(tracks)]
        loaded = getattr(predictor, "loaded", None)
        model = getattr(loaded, "spec", None)
        precision = loaded.precision.to_json() if loaded is not None else None
        write_json_atomic(
            tmp / "tracks.json",
            {
                "video": str(video.path),
                "source_kind": video.kind,
                "frames": count,
                "fps": round(video.fps, 4),
                "size": list(video.size),
                "model": model,
                "precision": precision,
                "tracker": "sam3-video" if video_tracker is not None else "iou",
                "prompts": texts,
                "masks": MASK_PATTERN.replace("{:05d}", "%05d"),
                "overlay": "overlay.mp4" if write_overlay else None,
                "objects": entries,
            },
        )
    return VideoSegmentation(out_dir, count, video.fps, video.size, texts, entries)


def _iou_stream(video: Video, predictor, prompts: list[Prompt], nms_iou, tracker: IoUTracker):
    """Per frame: the frame, its detections and the ids the IoU tracker gives them."""
    for index, rgb in enumerate(video):
        masks, scores, groups = _detections(predictor, rgb, prompts, nms_iou)
        yield rgb, masks, scores, groups, tracker.update(index, masks, scores, groups)


def _sam3_stream(video: Video, video_tracker, texts: list[str]):
    """Per frame: the frame and SAM 3's video-model objects (its ids shifted by one: 0 is background)."""
    current: list[np.ndarray] = []

    def remembered() -> Iterator[np.ndarray]:
        for rgb in video:
            current[:] = [rgb]
            yield rgb

    for objects in video_tracker.track(remembered(), texts):
        yield current[0], objects.masks, objects.scores, objects.groups, [i + 1 for i in objects.object_ids]


def segment_video_file(
    video: str | Path,
    prompts: Sequence[Prompt | str],
    predictor,
    out_dir: str | Path,
    **options,
) -> VideoSegmentation:
    """The CLI's entry point: read ``video`` (file, frame folder or DICOM cine) and :func:`segment_video` it."""
    check_video_output(out_dir, video)
    return segment_video(read_video(video), prompts, predictor, out_dir, **options)
