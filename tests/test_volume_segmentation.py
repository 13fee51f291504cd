"""Volume segmentation: 3D consistency, tracking from an anchor, streaming memory, files and geometry."""

from __future__ import annotations

import gzip
import json
import math
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from medsam3.data.masks import mask_box
from medsam3.data.volume_io import read_volume, slice_rgb, take_slice
from medsam3.errors import InputFileError, MedSAM3Error, PromptError
from medsam3.infer.tracking import box_iou
from medsam3.infer.types import PromptResult
from medsam3.infer.volume import _fused_score, legend_path, segment_volume, segment_volume_file

OBLIQUE = (
    math.cos(0.3), -math.sin(0.3), 0.0,
    math.sin(0.3) * math.cos(0.2), math.cos(0.3) * math.cos(0.2), -math.sin(0.2),
    math.sin(0.3) * math.sin(0.2), math.cos(0.3) * math.sin(0.2), math.cos(0.2),
)  # fmt: skip


class _Features:
    """Stands for one slice's vision features; counts how many are alive at once."""

    def __init__(self, owner: ScriptedPredictor):
        self.data = np.ones(50_000)
        owner.live += 1
        owner.max_live = max(owner.max_live, owner.live)
        weakref.finalize(self, owner.release)


class ScriptedPredictor:
    """A stand-in for Sam3Predictor that 'detects' scripted objects on the slice it is shown.

    ``found[text]`` is (label volume, score(label, slice) -> float): every 2D component of a
    label on the current slice is an instance with that score. A box prompt only finds instances
    overlapping the box. The slice is recognised from its pixels (test slices are all distinct).
    """

    def __init__(self, volume, found: dict, axis: int = 0, score_threshold: float = 0.5):
        self.slices = {slice_rgb(volume, i, axis).tobytes(): i for i in range(volume.shape[axis])}
        assert len(self.slices) == volume.shape[axis], "test slices must differ"
        self.found, self.axis, self.score_threshold = found, axis, score_threshold
        self.encode_count, self.live, self.max_live, self.seen = 0, 0, 0, []

    def release(self) -> None:
        self.live -= 1

    def set_image(self, rgb: np.ndarray) -> None:
        self.index = self.slices[np.asarray(rgb).tobytes()]
        self.features = _Features(self)
        self.encode_count += 1
        self.seen.append(self.index)

    def predict(self, prompts, score_threshold=None, nms_iou=None):
        threshold = self.score_threshold if score_threshold is None else score_threshold
        return [self._one(p, threshold) for p in prompts]

    def _one(self, prompt, threshold: float) -> PromptResult:
        labels, score = self.found[prompt.text]
        plane = take_slice(labels, self.index, self.axis)
        instances = []
        for value in (int(v) for v in np.unique(plane) if v):
            parts, n = ndimage.label(plane == value)
            for k in range(1, n + 1):
                mask = parts == k
                box = mask_box(mask)
                if prompt.boxes and max(box_iou(box, b) for b in prompt.boxes) <= 0:
                    continue
                s = score(value, self.index)
                if s > threshold:
                    instances.append((s, box, mask))
        instances.sort(key=lambda item: -item[0])
        height, width = plane.shape
        return PromptResult(
            prompt=prompt,
            presence=max((s for s, _, _ in instances), default=0.0),
            scores=np.array([s for s, _, _ in instances], np.float32),
            boxes=np.array([b for _, b, _ in instances], np.float32).reshape(-1, 4),
            masks=np.array([m for _, _, m in instances], bool).reshape(-1, height, width),
        )


def _volume_file(path: Path, array: np.ndarray, direction=OBLIQUE) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-12.5, 30.25, 100.0))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), path.name.endswith(".gz"))
    return path


def _ball(shape, center, radii) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + (
        (x - center[2]) / radii[2]
    ) ** 2 <= 1.0


def _scene(depth: int = 12, shape=(20, 24), seed: int = 0):
    """A noisy MR-like volume (every slice distinct) with scripted findings for 'liver' and 'kidney'.

    liver labels: 1 = the real organ (slices 3..9; confident 5..7, weak at its ends), 2 = an
    isolated confident false positive on one slice, 3 = a weak false positive over three slices.
    kidney: 1 = a small real object on slices 5..6.
    """
    rng = np.random.default_rng(seed)
    array = rng.uniform(0, 100, (depth, *shape)).astype(np.float32)
    liver = np.zeros(array.shape, np.uint8)
    liver[_ball(array.shape, (6, 8, 8), (3.4, 5, 5))] = 1
    liver[depth - 2, 14:17, 18:21] = 2
    liver[1:4, 15:18, 2:5] = 3
    kidney = np.zeros(array.shape, np.uint8)
    kidney[5:7, 2:6, 16:22] = 1
    array[liver == 1] += 200
    array[kidney == 1] += 300

    def liver_score(value: int, index: int) -> float:
        if value == 1:
            return 0.9 if 5 <= index <= 7 else 0.3
        return 0.9 if value == 2 else 0.3

    found = {"liver": (liver, liver_score), "kidney": (kidney, lambda value, index: 0.8)}
    return array, found, liver == 1, kidney == 1


# ----------------------------------------------------------------------------- slices + 3D consistency


def test_slices_keeps_weak_ends_of_confident_objects_and_drops_isolated_or_weak_ones(tmp_path):
    array, found, liver, kidney = _scene()
    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    predictor = ScriptedPredictor(volume, found)
    seg = segment_volume(volume, ["liver", "kidney"], predictor)
    expected = np.where(liver, 1, 0) + np.where(kidney, 2, 0)
    np.testing.assert_array_equal(seg.label_map, expected)
    assert seg.label_map.dtype == np.uint8 and seg.legend == {1: "liver", 2: "kidney"}
    assert seg.encoded_slices == predictor.encode_count == 12  # each slice encoded exactly once
    assert sorted(predictor.seen) == list(range(12))
    assert seg.components["liver"]["kept"] == 1 and seg.components["liver"]["dropped"] == 2
    assert seg.slice_scores[0, 6] == pytest.approx(0.9) and seg.slice_scores[0, 3] == pytest.approx(0.3)
    assert seg.slice_scores[1, 5] == pytest.approx(0.8) and seg.slice_scores[1, 0] == 0
    # without hysteresis (candidates only at the score threshold) the weak ends are lost
    strict = segment_volume(volume, ["liver"], ScriptedPredictor(volume, found), candidate_threshold=0.5)
    np.testing.assert_array_equal(np.flatnonzero(strict.label_map.any(axis=(1, 2))), [5, 6, 7])


def test_fused_score_and_min_slices():
    assert _fused_score({4: 0.9}, 3) == pytest.approx(0.3)  # a one-slice blip is diluted
    assert _fused_score({4: 0.9, 5: 0.9}, 3) == pytest.approx(0.6)
    assert _fused_score({1: 0.3, 2: 0.9, 3: 0.9, 4: 0.9, 5: 0.3}, 3) == pytest.approx(0.9)
    assert _fused_score({1: 0.9, 3: 0.9}, 3) == pytest.approx(0.6)  # a missing slice counts as 0
    assert _fused_score({0: 0.8}, 1) == pytest.approx(0.8)  # a one-slice volume: no dilution


def test_a_single_slice_volume_keeps_its_detections(tmp_path):
    array, found, liver, _ = _scene()
    volume = read_volume(_volume_file(tmp_path / "one.nii.gz", array[6:7]))
    found = {"liver": (found["liver"][0][6:7], lambda value, index: 0.9)}
    seg = segment_volume(volume, ["liver"], ScriptedPredictor(volume, found))
    np.testing.assert_array_equal(seg.label_map[0] > 0, found["liver"][0][0] > 0)


def test_other_slice_axes(tmp_path):
    array, found, liver, kidney = _scene(depth=16, shape=(18, 20))
    volume = read_volume(_volume_file(tmp_path / "v.nrrd", array))
    for axis in (1, 2):
        found_axis = {"kidney": (found["kidney"][0], lambda value, index: 0.8)}
        seg = segment_volume(volume, ["kidney"], ScriptedPredictor(volume, found_axis, axis=axis), axis=axis)
        np.testing.assert_array_equal(seg.label_map > 0, kidney)
        assert seg.slice_scores.shape == (1, volume.shape[axis])


def test_box_on_a_slice_keeps_what_it_finds_there(tmp_path):
    array, found, liver, _ = _scene()
    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    labels, _ = found["liver"]
    # the weak false positive (label 3, slices 1..3) is boxed on slice 2: the user says it is liver
    seg = segment_volume(volume, ["liver"], ScriptedPredictor(volume, found), box_slice=2, box=(1.0, 14.0, 6.0, 19.0))
    assert seg.label_map[labels == 3].all() and seg.label_map[labels == 2].sum() == 0
    assert seg.label_map[liver].all()


# ----------------------------------------------------------------------------- track


def test_track_from_a_box_visits_each_slice_once_and_stops_after_the_object(tmp_path):
    array, found, liver, _ = _scene(depth=16)
    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    predictor = ScriptedPredictor(volume, found)
    seg = segment_volume(volume, ["liver"], predictor, method="track", box_slice=6, box=(3, 3, 14, 14))
    np.testing.assert_array_equal(seg.label_map > 0, liver)  # no false positive: they are not connected
    # anchor 6, forward 7..9 then two misses (10, 11), backward 5..3 then two misses (2, 1)
    assert predictor.seen == [6, 7, 8, 9, 10, 11, 5, 4, 3, 2, 1]
    assert seg.encoded_slices == 11 and seg.anchors == {"liver": 6}


def test_track_without_a_box_starts_from_the_most_confident_slice(tmp_path):
    array, found, liver, _ = _scene(depth=16)
    labels, _ = found["liver"]

    def score(value: int, index: int) -> float:
        return {1: 0.95 if index == 7 else 0.7, 2: 0.8, 3: 0.3}[value]

    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    predictor = ScriptedPredictor(volume, {"liver": (labels, score)})
    seg = segment_volume(volume, ["liver"], predictor, method="track")
    assert seg.anchors == {"liver": 7}
    np.testing.assert_array_equal(seg.label_map > 0, liver)
    assert predictor.seen[:16] == list(range(16))  # the anchor pass
    assert predictor.seen[16:] == [7, 8, 9, 10, 11, 6, 5, 4, 3, 2, 1] and seg.encoded_slices == 16 + 11
    nothing = segment_volume(volume, ["liver"], ScriptedPredictor(volume, {"liver": (labels, lambda v, i: 0.1)}),
                             method="track")  # fmt: skip
    assert not nothing.label_map.any() and "nothing to track" in nothing.notes[0]


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("depth", [6, 40])
def test_features_are_dropped_slice_by_slice(tmp_path, depth):
    """At most two slices' features exist at once (the new one is made before the old is let go)."""
    array, found, _, _ = _scene(depth=depth, shape=(12, 12))
    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    for method in ("slices", "track"):
        predictor = ScriptedPredictor(volume, found)
        segment_volume(volume, ["liver", "kidney"], predictor, method=method)
        assert predictor.max_live == 2 and predictor.encode_count >= depth


def test_real_predictor_encodes_each_slice_once_and_batches_give_the_same_answer(tmp_path, tiny_model):
    import torch

    from medsam3.infer.predictor import Sam3Predictor

    array, _, _, _ = _scene(depth=7, shape=(30, 36))
    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    predictor = Sam3Predictor(tiny_model, score_threshold=0.2)
    live, peak = [0], [0]
    encode = tiny_model.model.get_vision_features

    def counted(**kwargs):
        out = encode(**kwargs)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out.last_hidden_state, lambda: live.__setitem__(0, live[0] - 1))
        return out

    tiny_model.model.get_vision_features = counted
    try:
        one = segment_volume(volume, ["liver"], predictor, candidate_threshold=0.1)
        peak_one, peak[0] = peak[0], 0
        three = segment_volume(volume, ["liver"], predictor, candidate_threshold=0.1, batch_slices=3)
    finally:
        del tiny_model.model.get_vision_features
    assert one.encoded_slices == three.encoded_slices == 7
    assert peak_one <= 2 and peak[0] <= 2  # one or two slices (batches) of features alive, never all
    np.testing.assert_allclose(one.slice_scores, three.slice_scores, atol=1e-4)
    assert (one.label_map == three.label_map).mean() > 0.99
    assert torch.get_num_threads() == 1


# ----------------------------------------------------------------------------- files and geometry


def test_file_output_keeps_the_input_geometry_and_writes_a_legend(tmp_path):
    array, found, liver, kidney = _scene()
    source = _volume_file(tmp_path / "ct.nii.gz", array)
    predictor = ScriptedPredictor(read_volume(source), found)
    out = tmp_path / "out" / "mask.nii.gz"
    seg = segment_volume_file(source, ["liver", "kidney"], predictor, out, notes=["a note"])
    back, original = nib.load(str(out)), nib.load(str(source))
    np.testing.assert_array_equal(back.affine, original.affine)
    for key in ("qform_code", "sform_code", "pixdim", "srow_x", "srow_y", "srow_z", "quatern_b"):
        np.testing.assert_array_equal(back.header[key], original.header[key])
    np.testing.assert_array_equal(read_volume(out).array, seg.label_map)
    image, mask = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-7)
    legend = json.loads(legend_path(out).read_text())
    assert legend_path(out).name == "mask.json" and legend["labels"] == {"1": "liver", "2": "kidney"}
    liver_entry = legend["prompts"][0]
    assert liver_entry["voxels"] == int(liver.sum()) and liver_entry["slices"] == [3, 9]
    assert liver_entry["volume_ml"] == pytest.approx(liver.sum() * 0.7 * 0.8 * 2.5 / 1000, rel=1e-3)
    assert legend["notes"] == ["a note"] and legend["encoded_slices"] == 12 and legend["method"] == "slices"
    assert len(legend["slice_scores"]["kidney"]) == 12
    assert sorted(p.name for p in out.parent.iterdir()) == ["mask.json", "mask.nii.gz"]
    nrrd = segment_volume_file(_volume_file(tmp_path / "ct.nrrd", array), ["liver"], ScriptedPredictor(
        read_volume(tmp_path / "ct.nrrd"), found), tmp_path / "m.nrrd")  # fmt: skip
    a, b = sitk.ReadImage(str(tmp_path / "ct.nrrd")), sitk.ReadImage(str(tmp_path / "m.nrrd"))
    for got, want in ((b.GetSpacing(), a.GetSpacing()), (b.GetOrigin(), a.GetOrigin()),
                      (b.GetDirection(), a.GetDirection())):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)  # NRRD stores spacing x direction
    assert nrrd.voxels(1) == int(liver.sum())


def test_empty_and_constant_volumes_give_an_empty_mask_without_running_the_model(tmp_path):
    source = _volume_file(tmp_path / "flat.nii.gz", np.full((5, 8, 9), -1024.0))
    predictor = ScriptedPredictor.__new__(ScriptedPredictor)
    predictor.encode_count, predictor.score_threshold = 0, 0.5
    seg = segment_volume_file(source, ["liver"], predictor, tmp_path / "m.nii.gz")
    assert not seg.label_map.any() and predictor.encode_count == 0 and seg.skipped_slices == [0, 1, 2, 3, 4]
    assert "empty or constant" in seg.notes[0]
    assert not read_volume(tmp_path / "m.nii.gz").array.any()
    assert json.loads((tmp_path / "m.json").read_text())["prompts"][0]["voxels"] == 0


def test_blank_slices_are_skipped(tmp_path):
    array, found, liver, _ = _scene()
    array[0] = 0.0
    array[11] = 0.0
    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    predictor = ScriptedPredictor.__new__(ScriptedPredictor)
    ScriptedPredictor.__init__(predictor, read_volume(_volume_file(tmp_path / "w.nii.gz", _scene()[0])), found)
    predictor.slices = {slice_rgb(volume, i).tobytes(): i for i in range(1, 11)}
    seg = segment_volume(volume, ["liver"], predictor)
    assert seg.skipped_slices == [0, 11] and sorted(predictor.seen) == list(range(1, 11))
    np.testing.assert_array_equal(seg.label_map > 0, liver)


def _series(folder: Path, array: np.ndarray, skip: tuple[int, ...] = ()) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(array):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "phantom", "Phantom^CT", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-10.0, -20.0, 2.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.6], 2.0
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (plane + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{series[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return series


def test_dicom_series_in_dicom_seg_out(tmp_path):
    import highdicom as hd
    import pydicom

    array, found, liver, kidney = _scene(depth=10, shape=(16, 18))
    _series(tmp_path / "series", np.rint(array * 2 - 100))
    volume = read_volume(tmp_path / "series")
    predictor = ScriptedPredictor(volume, found)
    seg = segment_volume_file(tmp_path / "series", ["liver", "kidney"], predictor, tmp_path / "m.nii.gz",
                              dicom_seg=tmp_path / "seg.dcm")  # fmt: skip
    dataset = hd.seg.segread(tmp_path / "seg.dcm")
    assert [dataset.get_segment_description(n).segment_label for n in (1, 2)] == ["liver", "kidney"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.source_files]
    back = dataset.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], combine_segments=True)
    np.testing.assert_array_equal(back, seg.label_map)
    assert json.loads((tmp_path / "m.json").read_text())["dicom_seg"] == str(tmp_path / "seg.dcm")
    # nothing found: the NIfTI, legend and an empty DICOM-SEG (one empty segment per prompt), with a note
    none = segment_volume_file(tmp_path / "series", ["liver"], ScriptedPredictor(volume, {"liver": (
        found["liver"][0], lambda v, i: 0.0)}), tmp_path / "e.nii.gz", dicom_seg=tmp_path / "e.dcm")  # fmt: skip
    empty = hd.seg.segread(tmp_path / "e.dcm")
    assert empty.number_of_segments == 1 and empty.get_segment_description(1).segment_label == "liver"
    assert not empty.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=True).any()
    assert "holds only empty segments" in none.notes[-1]


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_with_nothing_written(tmp_path):
    array, found, _, _ = _scene(depth=4, shape=(8, 8))
    good = _volume_file(tmp_path / "good.nii.gz", array)
    predictor = ScriptedPredictor(read_volume(good), found)
    out = tmp_path / "out" / "mask.nii.gz"

    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(InputFileError, match="4D image"):
        segment_volume_file(tmp_path / "4d.nii.gz", ["liver"], predictor, out)
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) - 40])
    with pytest.raises(InputFileError, match="truncated"):
        segment_volume_file(tmp_path / "cut.nii.gz", ["liver"], predictor, out)
    raw = gzip.decompress(data)
    (tmp_path / "short.nii").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputFileError, match="truncated"):
        segment_volume_file(tmp_path / "short.nii", ["liver"], predictor, out)
    _series(tmp_path / "gap", np.zeros((6, 4, 5)), skip=(3,))
    with pytest.raises(InputFileError, match="missing slices"):
        segment_volume_file(tmp_path / "gap", ["liver"], predictor, out)
    _series(tmp_path / "two", np.zeros((3, 4, 5)))
    _series(tmp_path / "two", np.zeros((4, 4, 5)))
    with pytest.raises(MedSAM3Error, match="2 DICOM series, choose one"):
        segment_volume_file(tmp_path / "two", ["liver"], predictor, out)
    with pytest.raises(MedSAM3Error, match="masks? (is|are) written as"):
        segment_volume_file(good, ["liver"], predictor, tmp_path / "mask.png")
    with pytest.raises(MedSAM3Error, match="DICOM-SEG needs a DICOM series"):
        segment_volume_file(good, ["liver"], predictor, out, dicom_seg=tmp_path / "s.dcm")
    with pytest.raises(InputFileError, match="valid slices are 0..3"):
        segment_volume_file(good, ["liver"], predictor, out, box_slice=4, box=(1, 1, 3, 3))
    with pytest.raises(PromptError, match="--box-slice and --box together"):
        segment_volume_file(good, ["liver"], predictor, out, box=(1, 1, 3, 3))
    with pytest.raises(PromptError, match="outside"):
        segment_volume_file(good, ["liver"], predictor, out, box_slice=1, box=(50, 50, 60, 60))
    with pytest.raises(MedSAM3Error, match="unknown method 'video'"):
        segment_volume_file(good, ["liver"], predictor, out, method="video")
    with pytest.raises(PromptError, match="no prompt"):
        segment_volume_file(good, [], predictor, out)
    assert predictor.encode_count == 0
    assert not out.parent.exists() and not (tmp_path / "s.dcm").exists()


def test_track_with_sam3_video_model_streams_from_the_anchor_both_ways(tmp_path, tiny_model):
    from medsam3.infer.predictor import Sam3Predictor
    from medsam3.infer.tracking import SMALL_TRACKER, Sam3VideoTracker, build_video_model

    array, _, _, _ = _scene(depth=5, shape=(30, 36))
    volume = read_volume(_volume_file(tmp_path / "v.nii.gz", array))
    model = build_video_model(tiny_model, untrained_tracker=SMALL_TRACKER, score_threshold_detection=0.2,
                              new_det_thresh=0.2, hotstart_delay=0)  # fmt: skip
    tracker = Sam3VideoTracker(model, tiny_model.seam)
    streamed = []
    original = tracker.track

    def recording(frames, texts):
        frames = list(frames)
        streamed.append(len(frames))
        yield from original(iter(frames), texts)

    tracker.track = recording
    predictor = Sam3Predictor(tiny_model, score_threshold=0.2)
    seg = segment_volume(volume, ["liver"], predictor, method="track", video_tracker=tracker,
                         box_slice=3, box=(2, 2, 20, 20))  # fmt: skip
    assert seg.anchors == {"liver": 3} and streamed == [2, 4]  # slices 3..4, then 3..0
    assert seg.label_map.shape == volume.shape and "SAM 3 video model" in seg.notes[0]
    assert seg.encoded_slices == 0  # the video model encodes inside itself; the predictor did nothing
    assert set(np.unique(seg.label_map)) <= {0, 1}
