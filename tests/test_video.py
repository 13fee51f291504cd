"""Video in (MP4, frame folders, DICOM cine) and out (masks with stable ids, overlay MP4, tracks.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid
from scipy import ndimage

from medsam3.data.video_io import Video, read_video, write_video
from medsam3.errors import InputFileError, MedSAM3Error
from medsam3.infer.types import PromptResult
from medsam3.infer.video import paint_ids, segment_video, segment_video_file

SIZE = (48, 64)


def _clip(frames: int = 10) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two bright disks on a dark textured background, moving towards each other (never touching)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[: SIZE[0], : SIZE[1]]
    images, truth = [], []
    for t in range(frames):
        a = (yy - 14) ** 2 + (xx - (10 + 2 * t)) ** 2 <= 36
        b = (yy - 34) ** 2 + (xx - (54 - 2 * t)) ** 2 <= 25
        image = rng.integers(10, 50, (*SIZE, 3)).astype(np.uint8)
        image[a | b] = 230
        images.append(image)
        truth.append(np.where(a, 1, 0) + np.where(b, 2, 0))
    return images, truth


def _frame_folder(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"frame_{i}.png")  # unpadded numbers: natural order matters
    return folder


class ThresholdSegmenter:
    """A scripted 'detector': bright connected blobs are instances, reported in shuffled order."""

    score_threshold = 0.5

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.encode_count = 0

    def set_image(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.encode_count += 1

    def predict(self, prompts, nms_iou=None, score_threshold=None):
        parts, n = ndimage.label(self.rgb.mean(axis=2) > 150)
        order = self.rng.permutation(n)
        masks = np.array([parts == k + 1 for k in order], bool).reshape(-1, *self.rgb.shape[:2])
        boxes = np.zeros((n, 4), np.float32)
        return [PromptResult(p, 0.9, np.full(n, 0.9, np.float32), boxes, masks) for p in prompts]


# ----------------------------------------------------------------------------- reading and writing


def test_mp4_round_trip_with_fps_and_padding(tmp_path):
    images, _ = _clip(6)
    assert write_video(tmp_path / "c.mp4", iter(images), 12.5) == 6
    video = read_video(tmp_path / "c.mp4")
    frames = list(video)
    assert (video.kind, video.fps, video.size, video.frame_count) == ("container", 12.5, SIZE, 6)
    assert len(frames) == 6 and frames[0].dtype == np.uint8 and frames[0].shape == (*SIZE, 3)
    assert np.abs(frames[3].astype(int) - images[3]).mean() < 12  # lossy, but the same picture
    odd = [np.full((33, 41, 3), 100, np.uint8)] * 2
    write_video(tmp_path / "odd.mp4", odd, 30000 / 1001)
    back = read_video(tmp_path / "odd.mp4")
    assert back.size == (34, 42) and back.fps == pytest.approx(29.97, abs=1e-3)  # padded to even


def test_write_video_refuses_bad_frames_and_leaves_nothing(tmp_path):
    with pytest.raises(MedSAM3Error, match="no frames to write"):
        write_video(tmp_path / "e.mp4", iter([]), 10)
    mixed = [np.zeros((20, 20, 3), np.uint8), np.zeros((22, 20, 3), np.uint8)]
    with pytest.raises(MedSAM3Error, match=r"frame 1 is \(22, 20\)"):
        write_video(tmp_path / "m.mp4", mixed, 10)
    with pytest.raises(MedSAM3Error, match="written as .mp4"):
        write_video(tmp_path / "m.avi", mixed, 10)
    assert list(tmp_path.iterdir()) == []


def test_frame_folder_in_natural_order_and_size_checks(tmp_path):
    images, _ = _clip(11)
    video = read_video(_frame_folder(tmp_path / "f", images))
    frames = list(video)
    assert video.kind == "frames" and video.frame_count == 11 and video.fps == 10.0
    for got, want in zip(frames, images, strict=True):  # frame_10 comes after frame_9, not after frame_1
        np.testing.assert_array_equal(got, want)
    Image.fromarray(np.zeros((30, 64, 3), np.uint8)).save(tmp_path / "f" / "frame_11.png")
    with pytest.raises(InputFileError, match=r"frames of varying size: frame_0.png is 64x48, frame_11.png is 64x30"):
        read_video(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no frames in this folder"):
        read_video(tmp_path / "empty")
    _frame_folder(tmp_path / "bad", images[:2])
    (tmp_path / "bad" / "frame_2.png").write_bytes(b"not a png at all")
    with pytest.raises(InputFileError, match="frame_2.png: not a readable image frame"):
        read_video(tmp_path / "bad")


def test_unreadable_videos_are_refused(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(InputFileError, match="junk.mp4: not a readable video"):
        read_video(tmp_path / "junk.mp4")
    (tmp_path / "empty.avi").write_bytes(b"")
    with pytest.raises(InputFileError, match="empty file"):
        read_video(tmp_path / "empty.avi")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputFileError, match="unsupported video format '.txt'"):
        read_video(tmp_path / "notes.txt")
    with pytest.raises(InputFileError, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    images, _ = _clip(8)
    write_video(tmp_path / "c.mp4", images, 10)
    data = (tmp_path / "c.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="cut.mp4"):
        list(read_video(tmp_path / "cut.mp4"))


def test_frames_changing_size_mid_stream_are_refused():
    def frames():
        yield np.zeros((20, 30, 3), np.uint8)
        yield np.zeros((21, 30, 3), np.uint8)

    video = Video(Path("clip.mp4"), "container", 10.0, (20, 30), None, frames)
    with pytest.raises(InputFileError, match="clip.mp4: frame 1 is 30x21 but the clip is 30x20"):
        list(video)


def _gray_cine(path: Path, frames: np.ndarray, frame_time: float = 50.0) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundMultiFrameImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.NumberOfFrames, ds.FrameTime = len(frames), frame_time
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = frames.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_cine_colour_and_gray(tmp_path):
    from pydicom.examples import get_path

    video = read_video(get_path("ybr_color"))  # a real 30-frame ultrasound cine, JPEG, YBR colour
    frames = list(video)
    assert (video.kind, video.size, video.frame_count, len(frames)) == ("dicom", (240, 320), 30, 30)
    assert video.fps == pytest.approx(30.0, rel=1e-3) and frames[0].shape == (240, 320, 3)
    ramp = np.stack([np.full((8, 10), 1000 + 500 * k) for k in range(4)])
    ramp[:, 0, 0] = 0  # one dark pixel so the first frame has contrast
    gray = read_video(_gray_cine(tmp_path / "cine.dcm", ramp))
    values = [int(f[4, 4, 0]) for f in gray]
    assert gray.fps == 20.0 and gray.frame_count == 4
    assert values[0] == 255 and values == sorted(values) and len(set(values[1:])) == 1  # one window for the clip


# ----------------------------------------------------------------------------- segment-video


def test_ids_stay_stable_and_files_agree(tmp_path):
    images, truth = _clip(10)
    source = _frame_folder(tmp_path / "clip", images)
    segmenter = ThresholdSegmenter()
    result = segment_video(source, ["disk"], segmenter, tmp_path / "out")
    assert result.frames == 10 and segmenter.encode_count == 10
    masks = [np.asarray(Image.open(tmp_path / "out" / "masks" / f"frame_{i:05d}.png")) for i in range(10)]
    for label in (1, 2):  # each true disk carries one id, the same in every frame
        ids = {int(v) for m, t in zip(masks, truth, strict=True) for v in np.unique(m[t == label])}
        assert len(ids) == 1 and 0 not in ids
    assert {int(v) for m in masks for v in np.unique(m)} == {0, 1, 2}
    tracks = json.loads((tmp_path / "out" / "tracks.json").read_text())
    assert tracks["frames"] == 10 and tracks["tracker"] == "iou" and tracks["prompts"] == ["disk"]
    for obj in tracks["objects"]:
        assert obj["prompt"] == "disk" and obj["frames"] == list(range(10)) and obj["frames_present"] == 10
        assert obj["area"] == [int((m == obj["id"]).sum()) for m in masks]
    overlay = read_video(tmp_path / "out" / "overlay.mp4")
    assert overlay.frame_count == 10 and overlay.size == SIZE and overlay.fps == 10.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["masks", "overlay.mp4", "tracks.json"]
    # an earlier output folder may be replaced; any other non-empty folder is refused
    segment_video(source, ["disk"], ThresholdSegmenter(), tmp_path / "out", write_overlay=False)
    assert not (tmp_path / "out" / "overlay.mp4").exists()
    with pytest.raises(MedSAM3Error, match="is the input .*clip; it would be overwritten"):
        segment_video(source, ["disk"], ThresholdSegmenter(), tmp_path / "clip")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a segment-video output")
    with pytest.raises(MedSAM3Error, match="is not an earlier segment-video output"):
        segment_video(source, ["disk"], ThresholdSegmenter(), tmp_path / "other")


def test_a_clip_that_breaks_half_way_leaves_no_output(tmp_path):
    images, _ = _clip(4)

    def frames():
        yield from images[:3]
        raise InputFileError("clip.mp4", "frame 3 does not decode (broken)")

    video = Video(Path("clip.mp4"), "container", 10.0, SIZE, 4, frames)
    with pytest.raises(InputFileError, match="frame 3 does not decode"):
        segment_video(video, ["disk"], ThresholdSegmenter(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_paint_ids_gives_overlaps_to_the_higher_score():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :3, :3] = True
    masks[1, 2:, 2:] = True
    labels = paint_ids(masks, [7, 300], [0.9, 0.4], (4, 4))
    assert labels.dtype == np.uint16 and labels[2, 2] == 7 and labels[3, 3] == 300
    assert paint_ids(masks[:0], [], [], (4, 4)).dtype == np.uint8


def test_end_to_end_with_the_tiny_model_on_a_phantom_clip(tmp_path, tiny_model):
    from medsam3.data.phantoms import write_phantom_dataset
    from medsam3.infer.predictor import Sam3Predictor

    dataset = write_phantom_dataset(tmp_path / "phantom", "video", n=1, seed=3, size=64)
    clip = next((dataset / "videos").glob("*.mp4"))
    predictor = Sam3Predictor(tiny_model, score_threshold=0.2)
    result = segment_video_file(clip, ["polyp"], predictor, tmp_path / "out")
    assert result.frames == 12 and predictor.encode_count == 12 and result.fps == 8.0
    masks = sorted((tmp_path / "out" / "masks").glob("*.png"))
    assert len(masks) == 12 and read_video(tmp_path / "out" / "overlay.mp4").frame_count == 12
    tracks = json.loads((tmp_path / "out" / "tracks.json").read_text())
    assert tracks["model"] == "tiny" and tracks["source_kind"] == "container" and tracks["size"] == [64, 64]
    for obj in tracks["objects"]:
        for frame, area in zip(obj["frames"], obj["area"], strict=True):
            assert (np.asarray(Image.open(masks[frame])) == obj["id"]).sum() <= area  # overlaps go to one id


def test_segment_video_with_sam3_video_model_ids(tmp_path, tiny_model):
    from medsam3.infer.tracking import SMALL_TRACKER, Sam3VideoTracker, build_video_model

    model = build_video_model(tiny_model, untrained_tracker=SMALL_TRACKER, score_threshold_detection=0.2,
                              new_det_thresh=0.2, hotstart_delay=0)  # fmt: skip
    images, _ = _clip(3)
    result = segment_video(_frame_folder(tmp_path / "clip", images), ["disk"], None, tmp_path / "out",
                           video_tracker=Sam3VideoTracker(model, tiny_model.seam))  # fmt: skip
    tracks = json.loads((tmp_path / "out" / "tracks.json").read_text())
    assert tracks["tracker"] == "sam3-video" and result.frames == 3
    masks = [np.asarray(Image.open(tmp_path / "out" / "masks" / f"frame_{i:05d}.png")) for i in range(3)]
    for obj in tracks["objects"]:  # SAM 3's ids shifted by one (0 is background), areas as painted
        assert obj["id"] >= 1 and obj["area"] == [int((masks[f] == obj["id"]).sum()) for f in obj["frames"]]
