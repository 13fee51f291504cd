"""One box on one slice -> the whole 3D object (``method="propagate"``) with lite's pretrained box decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsam3.data.masks import mask_box
from medsam3.data.volume_io import Volume
from medsam3.errors import PromptError
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.volume import pair_box_slices, segment_volume

DEPTH, SIZE = 14, 64


def _blob(center: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.ogrid[:DEPTH, :SIZE, :SIZE]
    return sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), center, radii, strict=True)) <= 1.0


def _volume(*lesions: np.ndarray, blank: tuple[int, ...] = ()) -> Volume:
    array = np.random.default_rng(0).normal(60.0, 12.0, (DEPTH, SIZE, SIZE)).astype(np.float32)
    for lesion in lesions:
        array[lesion] = 220.0
    for i in blank:
        array[i] = 0.0
    return Volume(array=array, spacing=(3.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                  direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), path=Path("phantom.nii.gz"),
                  modality="MR")  # fmt: skip


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _extent(mask: np.ndarray, axis: int = 0) -> tuple[int, int]:
    along = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    return int(along[0]), int(along[-1])


@pytest.fixture(scope="module")
def predictor(lite_init):
    return Sam3Predictor(lite_init)


LESION_A = _blob((6, 22, 24), (3.2, 9, 8))  # slices 3..9
LESION_B = _blob((9, 44, 46), (2.2, 7, 7))  # slices 7..11


def test_one_box_reaches_both_ends_and_stops_there(predictor):
    volume = _volume(LESION_A)
    seg = segment_volume(volume, ["lesion"], predictor, box_slice=6, box=mask_box(LESION_A[6]))
    found = seg.label_map == 1
    assert seg.method == "propagate"  # auto: a box and a box decoder
    low, high = _extent(found)
    assert abs(low - 3) <= 1 and abs(high - 9) <= 1  # both directions, no slices far beyond
    assert _dice(found, LESION_A) > 0.75
    assert seg.encoded_slices <= 7 + 2  # the lesion's slices plus one stopping slice each way
    (walk,) = seg.components["lesion"]["objects"]
    assert set(walk["stops"]) == {"up", "down"} and walk["key_slice"] == 6


def test_several_boxes_several_lesions(predictor):
    volume = _volume(LESION_A, LESION_B)
    seeds = [(6, mask_box(LESION_A[6])), (9, mask_box(LESION_B[9]))]
    seg = segment_volume(volume, ["lesion"], predictor, method="propagate", seeds=seeds)
    found = seg.label_map == 1
    assert _dice(found & LESION_A.any(axis=0)[None] & (np.arange(SIZE) < 34)[None, :, None], LESION_A) > 0.7
    assert _dice(found & (np.arange(SIZE) >= 34)[None, :, None], LESION_B) > 0.7
    assert seg.encoded_slices <= 2 * 9  # each sweep encodes a slice once, whatever the number of objects


def test_key_slices_at_both_ends_hand_over(predictor):
    long = _blob((6.5, 30, 30), (7.9, 10, 9))  # slices 0..13 (touches both ends of the volume)
    volume = _volume(long)
    seg = segment_volume(volume, ["vessel"], predictor, seeds=[(1, mask_box(long[1])), (12, mask_box(long[12]))])
    found = seg.label_map == 1
    assert _extent(found) == (0, 13) and _dice(found, long) > 0.75
    first, last = seg.components["vessel"]["objects"]
    assert first["stops"]["down"]["reason"] == "volume edge" and last["stops"]["up"]["reason"] == "volume edge"
    assert "key slice" in first["stops"]["up"]["reason"]  # the first walk reached the second key slice
    assert "down" not in last["stops"]  # ...which did not walk back over it
    assert seg.encoded_slices <= DEPTH + 1


def test_axis_is_respected(predictor):
    volume = _volume(LESION_A)
    moved = Volume(np.ascontiguousarray(np.moveaxis(volume.array, 0, 2)), (1.0, 1.0, 3.0), volume.origin,
                   volume.direction, volume.path, modality="MR")  # fmt: skip
    truth = np.moveaxis(LESION_A, 0, 2)
    seg = segment_volume(moved, ["lesion"], predictor, axis=2, box_slice=6, box=mask_box(truth[:, :, 6]))
    found = seg.label_map == 1
    assert found.shape == moved.shape
    low, high = _extent(found, axis=2)
    assert abs(low - 3) <= 1 and abs(high - 9) <= 1 and _dice(found, truth) > 0.75


def test_bad_key_boxes_are_one_line_errors(predictor):
    volume = _volume(LESION_A, blank=(12,))
    with pytest.raises(PromptError, match="blank"):
        segment_volume(volume, ["lesion"], predictor, box_slice=12, box=(10, 10, 30, 30))
    with pytest.raises(Exception, match="14|range|outside"):
        segment_volume(volume, ["lesion"], predictor, box_slice=14, box=(10, 10, 30, 30))
    with pytest.raises(PromptError):
        segment_volume(volume, ["lesion"], predictor, box_slice=6, box=(70, 70, 90, 90))  # outside the slice
    with pytest.raises(PromptError, match="one prompt"):
        segment_volume(volume, ["a", "b"], predictor, box_slice=6, box=(10, 10, 30, 30))
    with pytest.raises(PromptError, match="propagate"):
        segment_volume(volume, ["a"], predictor, method="slices", seeds=[(6, (10, 10, 30, 30)), (7, (1, 1, 9, 9))])
    with pytest.raises(PromptError, match="one per box"):
        pair_box_slices([1, 2], [(0, 0, 1, 1)] * 3)
    assert pair_box_slices([4], [(0, 0, 1, 1)] * 2) == [(4, (0, 0, 1, 1)), (4, (0, 0, 1, 1))]


def test_box_on_an_empty_slice_is_a_note_not_a_mask(predictor):
    volume = _volume(LESION_A)
    seg = segment_volume(volume, ["lesion"], predictor, box_slice=13, box=(2, 2, 6, 6))  # noise only
    found = seg.label_map == 1
    assert found.sum() < 200 and not found[3:10].any()  # nothing joined to the lesion far away


def test_cli_box_slice_count_mismatch_is_rc2_one_line(tmp_path, capsys):
    from medsam3.cli import main

    code = main(["segment-volume", str(tmp_path / "v.nii.gz"), "-p", "lesion", "-o", str(tmp_path / "m.nii.gz"),
                 "--box-slice", "1", "--box-slice", "2", "--box", "1,1,5,5", "--box", "2,2,6,6",
                 "--box", "3,3,7,7"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "one per box" in err


def test_rest_volume_job_with_a_drawn_box(lite_init, tmp_path):
    """The server's volume job (what the viewer's "Segment volume" sends): NIfTI in, box, NIfTI out."""
    pytest.importorskip("httpx")
    import SimpleITK as sitk
    from fastapi.testclient import TestClient

    from medsam3.serve import ServeSettings, create_app

    image = sitk.GetImageFromArray(_volume(LESION_A).array)
    image.SetSpacing((1.0, 1.0, 3.0))
    path = tmp_path / "lesion.nii.gz"
    sitk.WriteImage(image, str(path), True)
    with TestClient(create_app(ServeSettings(model="lite-init", device="cpu"), loaded=lite_init)) as client:
        sid = client.post("/api/sessions", files={"file": ("lesion.nii.gz", path.read_bytes())}).json()["id"]
        body = {"concepts": ["lesion"], "key_boxes": [{"slice": 6, "box": list(mask_box(LESION_A[6]))}]}
        job = client.post(f"/api/sessions/{sid}/jobs", json=body).json()
        for _ in range(1200):
            job = client.get(f"/api/jobs/{job['id']}").json()
            if job["status"] in ("done", "failed", "cancelled"):
                break
            import time

            time.sleep(0.05)
        assert job["status"] == "done", job
        assert job["result"]["method"] == "propagate"
        (tmp_path / "mask.nii.gz").write_bytes(client.get(job["downloads"]["nifti"]).content)
        bad = client.post(f"/api/sessions/{sid}/jobs", json={**body, "key_boxes": [{"slice": 40, "box": [1, 1, 5, 5]}]})
        assert bad.status_code == 400 and "out of range" in bad.json()["error"]
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    assert mask.GetSpacing() == image.GetSpacing()
    assert _dice(sitk.GetArrayFromImage(mask) == 1, LESION_A) > 0.75


class _RecordingDecoder:
    """Outlines a fixed 6x6 square at the box's centre on every slice, and records each box asked."""

    def __init__(self):
        self.asked: list[tuple[int, tuple[float, ...]]] = []
        self.slice = -1

    def set_slice(self, index: int) -> None:
        self.slice = index

    def draw_boxes(self, boxes, mask_logits=None):
        from types import SimpleNamespace

        probs = np.zeros((len(boxes), 40, 40), np.float32)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            self.asked.append((self.slice, tuple(round(float(v), 3) for v in (x0, y0, x1, y1))))
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            probs[k, cy - 3 : cy + 3, cx - 3 : cx + 3] = 1.0
        return SimpleNamespace(probs=probs, iou=np.full(len(boxes), 0.9), logits=np.zeros((len(boxes), 1)))


def test_first_step_off_the_key_slice_is_prompted_with_the_users_box():
    from medsam3.infer.propagation import Seed, StopRule, propagate_seeds

    fake = _RecordingDecoder()
    seed = Seed(5, (10.0, 10.0, 30.0, 30.0))  # the outline (6x6) is much smaller than the user's box
    propagate_seeds(fake, fake.set_slice, 8, [seed], size=(40, 40), rule=StopRule(min_area_ratio=0.0),
                    margin=0.1, margin_pixels=0.0)  # fmt: skip
    asked = dict(fake.asked[1:])  # the key slice's own box first, then each slice once
    assert asked[6] == asked[4] == (8.0, 8.0, 32.0, 32.0)  # the first steps: the user's box, +10%
    for later in (7, 3):  # the second steps: the outline's box (6 px) +10%, not the user's
        assert asked[later][2] - asked[later][0] < 8.0


class _BrightnessDetector:
    """The real predictor (encoder, box decoder) with a scripted text detector: the concept is the
    bright region of the current slice, scored by its area, so the most confident slice is the
    lesion's largest cut. Text-only propagation must start there and walk both ways with the box decoder."""

    def __init__(self, predictor):
        self._inner = predictor
        self.detected_on: list[int] = []
        self._image = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def set_image(self, image):
        self._image = np.asarray(image)
        self._inner.set_image(image)

    def predict(self, prompts, **_):
        from medsam3.infer.types import Prompt, PromptResult

        gray = self._image[..., 0].astype(np.float32)
        bright = gray > gray.mean() + 3 * gray.std()  # a few noise pixels, or the lesion
        results = []
        for prompt in prompts:
            prompt = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
            if bright.sum() < 20:
                empty = np.zeros((0, *bright.shape), dtype=bool)
                results.append(PromptResult(prompt, 0.0, np.zeros(0, np.float32), np.zeros((0, 4), np.float32), empty))
                continue
            score = np.float32(min(1.0, bright.sum() / 400.0))
            box = np.asarray([mask_box(bright)], dtype=np.float32)
            results.append(PromptResult(prompt, float(score), np.asarray([score]), box, bright[None]))
        return results


def test_text_only_propagation_starts_from_the_most_confident_slice(predictor):
    volume = _volume(LESION_A)
    scripted = _BrightnessDetector(predictor)
    seg = segment_volume(volume, ["lesion"], scripted, method="propagate", score_threshold=0.1)
    assert seg.anchors["lesion"] == 6  # the lesion's largest cut scored highest
    (walk,) = seg.components["lesion"]["objects"]
    assert walk["key_slice"] == 6 and set(walk["stops"]) == {"up", "down"}
    found = seg.label_map == 1
    low, high = _extent(found)
    assert abs(low - 3) <= 1 and abs(high - 9) <= 1
    assert _dice(found, LESION_A) > 0.7
    assert seg.encoded_slices == DEPTH  # the scan encodes every slice once; the walks reuse them
