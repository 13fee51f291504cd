"""Object identity across frames: IoU association, detector propagation, SAM 3's video model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam3.data.masks import mask_box, mask_iou_matrix
from medsam3.errors import ModelSpecError
from medsam3.infer.tracking import (
    SMALL_TRACKER,
    IoUTracker,
    Sam3VideoTracker,
    box_iou,
    build_video_model,
    drop_duplicates,
    match_by_iou,
    propagate,
)
from medsam3.infer.types import PromptResult


def _disk(size: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_mask_iou_matrix_and_boxes():
    a = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True  # 4 px
    a[1, 2:, 2:] = True
    b = np.zeros((3, 4, 4), bool)
    b[0, :2, :1] = True  # 2 px inside a[0]
    b[1, 2:, 2:] = True
    iou = mask_iou_matrix(a, b)
    np.testing.assert_allclose(iou, [[0.5, 0, 0], [0, 1, 0]])
    assert mask_iou_matrix(a[:0], b).shape == (0, 3)
    assert match_by_iou(iou, 0.6) == [(1, 1)]
    assert sorted(match_by_iou(iou, 0.4)) == [(0, 0), (1, 1)]
    assert mask_box(a[1]) == (2.0, 2.0, 4.0, 4.0) and mask_box(np.zeros((3, 3), bool)) is None
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


def test_ids_stay_with_moving_disks_through_shuffles_gaps_and_newcomers():
    rng = np.random.default_rng(0)
    size = (64, 80)
    tracker = IoUTracker(iou_threshold=0.3, max_gap=2)
    first_ids: dict[str, int] = {}
    for frame in range(12):
        objects = {
            "left": _disk(size, (20 + frame, 12 + 2 * frame), 7),  # moves right and down
            "right": _disk(size, (44 - frame, 70 - 2 * frame), 6),  # moves the other way
        }
        if frame >= 6:
            objects["late"] = _disk(size, (55, 40), 5)  # appears half way
        if frame in (3, 4):
            objects.pop("left")  # missed by the detector for two frames: within max_gap
        names = list(objects)
        rng.shuffle(names)  # detections come in any order
        ids = tracker.update(frame, np.stack([objects[n] for n in names]), [0.9] * len(names))
        for name, object_id in zip(names, ids, strict=True):
            assert first_ids.setdefault(name, object_id) == object_id, f"{name} changed id on frame {frame}"
    assert sorted(first_ids.values()) == [1, 2, 3] and first_ids["late"] == 3
    assert tracker.tracks[first_ids["left"]].frames == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    assert len(tracker.tracks[first_ids["late"]].frames) == 6
    areas = tracker.tracks[first_ids["right"]].areas
    assert len(areas) == 12 and all(a == areas[0] for a in areas)
    assert tracker.tracks[first_ids["right"]].velocity == pytest.approx((-1.0, -2.0))


def test_a_long_absence_or_another_prompt_gets_a_new_id():
    size = (32, 32)
    disk = _disk(size, (16, 16), 6)
    tracker = IoUTracker(iou_threshold=0.3, max_gap=1)
    assert tracker.update(0, disk[None], [0.8]) == [1]
    assert tracker.update(3, disk[None], [0.8]) == [2]  # gone for two frames: a new object
    assert tracker.tracks[1].last_mask is None  # a retired track keeps no mask
    # two prompts over the same pixels never exchange ids
    assert tracker.update(4, np.stack([disk, disk]), [0.8, 0.7], groups=[0, 1]) == [2, 3]
    assert tracker.update(5, np.stack([disk, disk]), [0.7, 0.8], groups=[1, 0]) == [3, 2]
    # two detections of one track in one frame: only one keeps the id
    assert tracker.update(6, np.stack([disk, disk]), [0.9, 0.8], groups=[0, 0]) == [2, 4]
    with pytest.raises(ValueError, match="2 masks, 1 scores"):
        tracker.update(7, np.stack([disk, disk]), [0.9])


def test_drop_duplicates_keeps_the_best_of_each_object_per_prompt():
    size = (30, 30)
    big = _disk(size, (15, 15), 8)
    inner = _disk(size, (15, 16), 5)  # a weaker second query on the same object
    other = _disk(size, (3, 3), 2)
    empty = np.zeros(size, bool)
    masks = np.stack([inner, big, other, empty, inner])
    keep = drop_duplicates(masks, [0.4, 0.9, 0.3, 0.8, 0.5], [0, 0, 0, 0, 1])
    assert keep == [1, 2, 4]  # the inner duplicate and the empty mask go; another prompt's mask stays


class _BoxDetector:
    """Finds the disks of the current frame that overlap the prompt's box (scripted, not a model)."""

    def __init__(self, frames: list[dict[str, np.ndarray]]):
        self.frames, self.encoded = frames, []

    def set_image(self, index: int) -> None:
        self.index = index
        self.encoded.append(index)

    def predict(self, prompts, score_threshold=None):
        out = []
        for prompt in prompts:
            masks = [m for m in self.frames[self.index].values() if box_iou(mask_box(m), prompt.boxes[0]) > 0]
            out.append(
                PromptResult(
                    prompt,
                    0.9,
                    np.full(len(masks), 0.9, np.float32),
                    np.array([mask_box(m) for m in masks], np.float32).reshape(-1, 4),
                    np.array(masks, bool).reshape(-1, 24, 40),
                )
            )
        return out


def test_propagate_follows_each_seed_both_ways_and_ends_with_the_object():
    size = (24, 40)
    frames = []
    for i in range(10):
        objects = {}
        if 2 <= i <= 8:
            objects["a"] = _disk(size, (8, 6 + 2 * i), 4)
        if i <= 6:
            objects["b"] = _disk(size, (18, 30 - i), 3)
        frames.append(objects)
    detector = _BoxDetector(frames)
    seeds = [mask_box(frames[5]["a"]), mask_box(frames[5]["b"])]
    steps = list(propagate(lambda i: i, 10, "disk", detector, 5, seeds, patience=0))
    by_object: dict[int, list[int]] = {}
    for step in steps:
        by_object.setdefault(step.object_id, []).append(step.index)
        name = "a" if step.object_id == 1 else "b"
        np.testing.assert_array_equal(step.mask, frames[step.index][name])
    assert sorted(by_object[1]) == list(range(2, 9)) and sorted(by_object[2]) == list(range(0, 7))
    # each frame encoded once: anchor, forward until both objects end (b at 7, a at 9), backward to 0
    assert detector.encoded == [5, 6, 7, 8, 9, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="anchor slice 10 is outside"):
        list(propagate(lambda i: i, 10, "disk", detector, 10, seeds))


# ----------------------------------------------------------------------------- SAM 3's video model


def test_video_model_carries_our_detector_and_keeps_memory_bounded(tiny_model):
    model = build_video_model(
        tiny_model, untrained_tracker=SMALL_TRACKER, score_threshold_detection=0.2, new_det_thresh=0.2,
        hotstart_delay=0,
    )  # fmt: skip
    assert model.detector_model is tiny_model.model  # the very module: fine-tuned weights carried as is
    assert model.config.detector_config.image_size == tiny_model.image_size
    tracker = Sam3VideoTracker(model, tiny_model.seam, memory_window=2)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8) for _ in range(5)]
    seen = 0
    for objects in tracker.track(iter(frames), ["tumor", "cyst"]):
        assert objects.masks.shape[1:] == (40, 52) and objects.masks.dtype == bool
        assert objects.masks.sum(axis=0).max(initial=0) <= 1  # one object per pixel
        assert all(m.any() for m in objects.masks) and set(objects.groups) <= {0, 1}
        assert len(objects.object_ids) == len(set(objects.object_ids)) == len(objects.scores)
        session = tracker.session
        assert list(session.processed_frames) == [objects.index]  # pixels of done frames are dropped
        for outputs in session.output_dict_per_obj.values():
            assert all(objects.index - i <= 3 for i in outputs["non_cond_frame_outputs"])  # window 2, pruned after
        seen += len(objects.object_ids)
    assert objects.index == 4 and seen > 0


def test_video_model_needs_trained_tracker_weights_and_loads_them_from_a_checkpoint(tiny_model, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ModelSpecError, match="has no trained weights for 'tiny'"):
        build_video_model(tiny_model)
    source = build_video_model(tiny_model, untrained_tracker=SMALL_TRACKER)
    folder = tmp_path / "sam3_video"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(source.config.to_dict()))
    tracker_weights = {
        k: v.detach().clone().contiguous()
        for k, v in source.state_dict().items()
        if k.startswith(("tracker_model.", "tracker_neck."))
    }
    save_file(tracker_weights, str(folder / "model.safetensors"))
    loaded = build_video_model(tiny_model, tracker=folder)
    state = loaded.state_dict()
    for key, value in tracker_weights.items():
        assert np.array_equal(state[key].numpy(), value.numpy()), key
    assert loaded.detector_model is tiny_model.model
    # incomplete or mismatched checkpoints are refused
    first = sorted(tracker_weights)[0]
    save_file({k: v for k, v in tracker_weights.items() if k != first}, str(folder / "model.safetensors"))
    with pytest.raises(ModelSpecError, match="tracker weights incomplete, 1 missing"):
        build_video_model(tiny_model, tracker=folder)
    config = source.config.to_dict()
    config["detector_config"]["image_size"] = 1008
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSpecError, match="tracker made for 1008 px images"):
        build_video_model(tiny_model, tracker=folder)
    with pytest.raises(ModelSpecError, match="not a folder holding a SAM 3 video checkpoint"):
        build_video_model(tiny_model, tracker=tmp_path / "missing" / "x")
    with pytest.raises(ModelSpecError, match="must exceed 64"):
        build_video_model(tiny_model, untrained_tracker={**SMALL_TRACKER, "hidden": 64})
