"""Issue 11, reliability: outputs never destroy inputs, every failure is one line, nonsense is refused,
and no library noise reaches the terminal.

Each test runs the command line as a user would (``main([...])``), captures stdout/stderr at the file
descriptor level (C libraries write there directly), and hashes every input and earlier output before
and after: a refused command must leave them byte for byte as they were, with nothing added.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from medsam3.cli import main

# ----------------------------------------------------------------------------- helpers


def _run(args, capfd):
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    """The single line a failure prints (and nothing else: no traceback, no library noise)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def _hashes(*roots) -> dict[str, str]:
    """sha256 of every file under ``roots`` (hidden ones too: a leftover temporary is a change)."""
    found = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*"))
        for path in paths:
            key = str(path)
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return found


def _png(path, shape=(24, 32, 3)):
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8)).save(path)
    return path


def _nifti(path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), label=False):
    array = np.zeros((4, 12, 12), dtype=np.uint8 if label else np.int16)  # (z, y, x)
    array[1:3, 3:8, 3:8] = 1 if label else 200
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def png(tmp_path):
    return _png(tmp_path / "in" / "scan.png")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model: its output check must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("medsam3.model.load_model", refuse)


# ----------------------------------------------------------------------------- 1. outputs destroy inputs


def test_segment_volume_refuses_to_write_over_its_input(tmp_path, capfd, no_model):
    scan = _nifti(tmp_path / "scan.nii.gz")
    before = _hashes(tmp_path)
    code, _, err = _run(["segment-volume", scan, "-p", "liver", "--model", "tiny", "--out", scan], capfd)
    line = _one_line(err)
    assert code == 2 and "scan.nii.gz" in line and "input" in line
    assert _hashes(tmp_path) == before


def test_segment_refuses_a_mask_name_that_is_its_input(tmp_path, capfd, no_model):
    out = tmp_path / "out"
    image = _png(out / "breast_tumor.png")
    before = _hashes(tmp_path)
    code, _, err = _run(["segment", image, "-p", "breast tumor", "--model", "tiny", "--out", out], capfd)
    line = _one_line(err)
    assert code == 2 and "breast_tumor.png" in line and "overwrite the input" in line
    assert _hashes(tmp_path) == before


def test_prompt_names_never_collide_and_control_characters_are_not_echoed(tmp_path, png, capfd):
    prompts = ["overlay", "result", "x instances", "x", "liver tumor", "liver-tumor", "liv\x1b[2Jer"]
    out = tmp_path / "out"
    args = ["segment", png, "--model", "tiny", "--threshold", "0", "--out", out]
    for text in prompts:
        args += ["-p", text]
    code, stdout, err = _run(args, capfd)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert [entry["prompt"] for entry in result["prompts"]] == prompts
    names = [e["mask"] for e in result["prompts"]] + [e["instance_map"] for e in result["prompts"]]
    names += [result["overlay"], "result.json"]
    assert len(set(names)) == len(names) == len(list(out.iterdir()))  # every file its own, nothing else
    assert np.array(Image.open(out / "overlay.png")).shape == (24, 32, 3)  # the overlay is the overlay
    for entry in result["prompts"]:
        mask = np.array(Image.open(out / entry["mask"]))
        labels = np.array(Image.open(out / entry["instance_map"]))
        assert mask.shape == labels.shape == (24, 32) and set(np.unique(mask)) <= {0, 255}
        assert labels.max() <= len(entry["instances"]) and ((mask > 0) == (labels > 0)).all()
    # class 6: a prompt's escape sequence is shown, never sent to the terminal
    assert "\x1b" not in stdout and "\x1b" not in err and "liv\\x1b[2Jer: " in stdout


def test_compare_never_writes_into_an_evaluation(tmp_path, capfd):
    from medsam3.evaluate.report import CaseRecord, write_case_csv

    runs = []
    for name, dice in (("a", 0.5), ("b", 0.7)):
        run = tmp_path / name
        write_case_csv([CaseRecord("c1", "liver", "test", dice, dice, dice, 1.0, 0.9, True, 1, 1, 0.1)],
                       run / "per_case.csv")  # fmt: skip
        (run / "report.md").write_text(f"# report of {name}\n")
        (run / "summary.json").write_text('{"dataset": "x"}\n')
        runs.append(run)
    before = _hashes(tmp_path)
    for target in ("a/report", "a/summary.md", "b/cmp"):
        code, _, err = _run(["evaluate", "compare", *runs, "--out", tmp_path / target], capfd)
        line = _one_line(err)
        assert code == 2 and "inside the input folder" in line, line
    assert _hashes(tmp_path) == before
    code, _, err = _run(["evaluate", "compare", *runs, "--out", tmp_path / "cmp"], capfd)
    assert code == 0, err
    assert {k: v for k, v in _hashes(tmp_path).items() if "cmp." not in k} == before


def test_segment_video_never_replaces_a_folder_that_holds_its_input(tmp_path, capfd, no_model):
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    (out / "tracks.json").write_text("{}\n")  # an earlier segment-video output: replaceable, but not so
    for i in range(2):
        _png(out / "frames" / f"frame_{i:03d}.png")
    before = _hashes(tmp_path)
    code, _, err = _run(["segment-video", out / "frames", "-p", "polyp", "--model", "tiny", "--out", out], capfd)
    line = _one_line(err)
    assert code == 2 and "holds the input" in line
    assert _hashes(tmp_path) == before


# ----------------------------------------------------------------------------- 2. one line, rc 2, not a traceback


def _earlier_outputs(out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "liver.png").write_bytes(b"an earlier mask")
    (out / "notes.txt").write_text("the user's own file\n")


@pytest.mark.parametrize(
    "case", ["out_is_a_file", "under_a_file", "overlay_png_folder", "result_json_folder", "unwritable"]
)
def test_bad_out_is_one_line_before_any_work(tmp_path, png, capfd, no_model, case):
    if case == "out_is_a_file":
        out = tmp_path / "out.txt"
        out.write_text("not a folder\n")
        words = "is a file"
    elif case == "under_a_file":
        (tmp_path / "out.txt").write_text("not a folder\n")
        out = tmp_path / "out.txt" / "sub"
        words = "is a file, not a folder"
    elif case in ("overlay_png_folder", "result_json_folder"):
        out = tmp_path / "out"
        _earlier_outputs(out)
        (out / ("overlay.png" if case == "overlay_png_folder" else "result.json")).mkdir()
        words = "is a folder"
    else:
        if not sys.platform.startswith("linux"):
            pytest.skip("uses /proc, which no one can write in")
        out = Path("/proc/medsam3-reliability")
        words = "cannot be written"
    before = _hashes(tmp_path)
    code, _, err = _run(["segment", png, "-p", "liver", "--model", "tiny", "--out", out], capfd)
    line = _one_line(err)
    assert code == 2 and words in line and str(out).split("/")[-1] in line, line
    assert _hashes(tmp_path) == before


def test_full_disk_is_one_line_and_leaves_earlier_outputs_untouched(tmp_path, png, capfd, monkeypatch):
    out = tmp_path / "out"
    assert _run(["segment", png, "-p", "liver", "--model", "tiny", "--out", out], capfd)[0] == 0
    before = _hashes(tmp_path)
    real_save, calls = Image.Image.save, []

    def full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) >= 3:  # two files written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = _run(["segment", png, "-p", "liver", "-p", "kidney", "--model", "tiny", "--out", out], capfd)
    line = _one_line(err)
    assert code == 2 and line.endswith(f"{out / 'kidney.png'}: No space left on device") and len(calls) == 3
    assert _hashes(tmp_path) == before  # the earlier result, untouched; no temporary left behind


@pytest.mark.parametrize(
    "args, option",
    [
        (["train", "{dir}", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
        (["train", "{dir}", "--out", "{out}", "--grad-accum", "0"], "--grad-accum"),
        (["train", "{dir}", "--out", "{out}", "--lr", "-1"], "--lr"),
        (["train", "{dir}", "--out", "{out}", "--lr", "nan"], "--lr"),
        (["train", "{dir}", "--out", "{out}", "--weight-decay", "-5"], "--weight-decay"),
        (["segment-video", "{dir}", "-p", "polyp", "--out", "{out}", "--iou", "-1"], "--iou"),
        (["baseline", "unet", "{dir}", "--out", "{out}", "--size", "0"], "--size"),
        (["phantoms", "--out", "{out}", "--size", "100000"], "--size"),
        (["phantoms", "--out", "{out}", "--seed", "-1"], "--seed"),
        (["segment", "{img}", "-p", "liver", "--out", "{out}", "--threshold", "-1"], "--threshold"),
        (["segment", "{img}", "-p", "liver", "--out", "{out}", "--threshold", "2"], "--threshold"),
        (["segment", "{img}", "-p", "liver", "--out", "{out}", "--threshold", "nan"], "--threshold"),
        (["segment", "{img}", "-p", "liver", "--out", "{out}", "--mask-threshold", "5"], "--mask-threshold"),
        (["segment", "{img}", "-p", "liver", "--out", "{out}", "--nms", "7"], "--nms"),
    ],
)
def test_numbers_are_validated_in_one_line(tmp_path, capfd, no_model, args, option):
    image, out = _png(tmp_path / "data" / "x.png"), tmp_path / "out"
    before = _hashes(tmp_path)
    code, _, err = _run([a.format(dir=image.parent, img=image, out=out) for a in args], capfd)
    line = _one_line(err)
    assert code == 2 and option in line and "must be" in line, line
    assert not out.exists() and _hashes(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_baseline_unet_on_cuda_without_a_gpu(tmp_path, capfd):
    code, _, err = _run(["baseline", "unet", tmp_path / "data", "--out", tmp_path / "run", "--device", "cuda"], capfd)
    assert code == 2 and "no CUDA GPU" in _one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from medsam3.model import load_model
    from medsam3.model.adapter import save_adapter
    from medsam3.model.policy import apply_policy

    loaded = load_model("tiny", device="cpu")
    apply_policy(loaded.model, "paper")
    return save_adapter(loaded, tmp_path_factory.mktemp("adapters") / "good", "paper", ["liver"])


def _copy(folder, to):
    to.mkdir(parents=True)
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda meta: [meta], "expected a JSON object"),
        (lambda meta: {k: v for k, v in meta.items() if k != "policy"}, "'policy' is missing"),
        (lambda meta: {**meta, "lora": {"rank": 4, "bogus": 1}}, "unknown 'lora' key(s) bogus"),
        (lambda meta: {**meta, "concepts": 42}, "'concepts' must be a list"),
        (lambda meta: {**meta, "concepts": "liver"}, "'concepts' must be a list"),
    ],
)
def test_adapter_json_is_schema_checked(tmp_path, capfd, adapter_dir, edit, words):
    adapter = _copy(adapter_dir, tmp_path / "adapter")
    meta = json.loads((adapter / "adapter.json").read_text())
    (adapter / "adapter.json").write_text(json.dumps(edit(meta)))
    before = _hashes(tmp_path)
    code, _, err = _run(["info", "tiny", "--adapter", adapter], capfd)
    line = _one_line(err)
    assert code == 2 and "adapter.json" in line and words in line, line
    assert _hashes(tmp_path) == before


def test_corrupt_checkpoints_are_one_line(tmp_path, capfd):
    from medsam3.data.phantoms import write_phantom_dataset
    from medsam3.evaluate.baseline_unet import KIND
    from medsam3.model import load_model
    from medsam3.model.adapter import save_adapter
    from medsam3.model.policy import apply_policy

    data = write_phantom_dataset(tmp_path / "data", "nuclei", n=4, seed=0, size=32)
    # a U-Net baseline folder whose weights are garbage
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"kind": KIND, "concepts": ["cell nucleus"], "size": 32}))
    (unet / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    # a training run whose trainer_state.pt is not a checkpoint
    loaded = load_model("tiny", device="cpu")
    apply_policy(loaded.model, "paper")
    run = tmp_path / "run"
    truncated = b"PK\x03\x04 truncated"
    save_adapter(loaded, run / "last", "paper", ["cell nucleus"],
                 write_extra=lambda folder: (folder / "trainer_state.pt").write_bytes(truncated))  # fmt: skip
    before = _hashes(tmp_path)
    code, _, err = _run(["evaluate", data, "--model", unet, "--split", "all", "--out", tmp_path / "eval"], capfd)
    line = _one_line(err)
    assert code == 2 and "model.safetensors" in line and "corrupt" in line, line
    code, _, err = _run(["train", data, "--base", "tiny", "--out", run, "--resume", "--device", "cpu"], capfd)
    line = _one_line(err)
    assert code == 2 and "trainer_state.pt" in line and "cannot resume" in line, line
    assert _hashes(tmp_path) == before


class _Payload:
    """Unpickling this would create a folder: proof that the code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


def test_pickled_model_folder_is_refused_and_never_run(tmp_path, capfd, tiny_model):
    folder = tmp_path / "model"
    folder.mkdir()
    tiny_model.model.config.to_json_file(str(folder / "config.json"))
    torch.save({"weight": _Payload(str(tmp_path / "pwned"))}, folder / "pytorch_model.bin")
    before = _hashes(tmp_path)
    code, _, err = _run(["info", folder], capfd)
    line = _one_line(err)
    assert code == 2 and "pickled" in line and str(folder) in line
    assert not (tmp_path / "pwned").exists() and _hashes(tmp_path) == before


# ----------------------------------------------------------------------------- 3. nonsense refused


def test_infinite_box_is_refused(tmp_path, png, capfd, no_model):
    code, _, err = _run(["segment", png, "-p", "liver", "--box", "0,0,inf,inf", "--out", tmp_path / "o"], capfd)
    assert code == 2 and "finite" in _one_line(err) and not (tmp_path / "o").exists()


def test_adapter_with_nan_weights_is_refused(tmp_path, png, capfd, adapter_dir):
    from safetensors.torch import load_file, save_file

    adapter = _copy(adapter_dir, tmp_path / "adapter")
    tensors = load_file(str(adapter / "adapter.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], math.nan)
    save_file(tensors, str(adapter / "adapter.safetensors"))
    code, _, err = _run(["segment", png, "-p", "liver", "--model", "tiny", "--adapter", adapter,
                         "--out", tmp_path / "o"], capfd)  # fmt: skip
    line = _one_line(err)
    assert code == 2 and "NaN or infinite" in line and first in line
    assert not (tmp_path / "o").exists()


def test_dicom_whose_header_claims_more_pixels_than_it_holds(tmp_path, capfd):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CT", 5000, 5000, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(64 * 64, dtype=np.int16).tobytes()  # 64x64 pixels
    path = tmp_path / "lie.dcm"
    ds.save_as(path, enforce_file_format=True)
    code, _, err = _run(["segment", path, "-p", "liver", "--model", "tiny", "--out", tmp_path / "o"], capfd)
    line = _one_line(err)
    assert code == 2 and "lie.dcm" in line and "5000x5000" in line and not (tmp_path / "o").exists()


def _volume_dataset(root, **label_geometry):
    _nifti(root / "imagesTr" / "case_0000.nii.gz")
    _nifti(root / "labelsTr" / "case.nii.gz", label=True, **label_geometry)
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    ))  # fmt: skip
    return root


@pytest.mark.parametrize(
    "geometry, words", [({"spacing": (1.0, 1.0, 2.5)}, "spacing"), ({"origin": (0.0, 0.0, 9.0)}, "origin")]
)
def test_label_on_another_grid_is_not_scored(tmp_path, capfd, geometry, words):
    data = _volume_dataset(tmp_path / "data", **geometry)
    before = _hashes(tmp_path)
    code, _, err = _run(["data", "inspect", data], capfd)
    line = _one_line(err)
    assert code == 2 and "case.nii.gz" in line and words in line, line
    code, _, err = _run(["evaluate", data, "--volumes", "--split", "all", "--model", "tiny",
                         "--out", tmp_path / "eval"], capfd)  # fmt: skip
    line = _one_line(err)
    assert code == 2 and "case.nii.gz" in line and words in line, line
    assert _hashes(tmp_path) == before


def test_finite_float64_beyond_float32_is_called_what_it_is(tmp_path, capfd, no_model):
    import tifffile

    path = tmp_path / "huge.tif"
    values = np.full((16, 16), 3.0)
    values[4:8, 4:8] = 1e308  # finite, but beyond float32
    tifffile.imwrite(path, values)
    code, _, err = _run(["segment", path, "-p", "liver", "--out", tmp_path / "o"], capfd)
    line = _one_line(err)  # and no NumPy "overflow encountered in cast" line before it
    assert code == 2 and "beyond the float32 range" in line and "NaN" not in line


# ----------------------------------------------------------------------------- 6. noise


def test_native_library_noise_is_kept_off_the_terminal(tmp_path, capfd):
    header = bytearray(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)).to_bytes())
    header[40:42] = b"\x09\x00"  # dim[0] = 9: the NIfTI C library prints "** ERROR" itself
    bad = tmp_path / "bad.nii"
    bad.write_bytes(bytes(header))
    (tmp_path / "empty").mkdir()  # ITK prints "No Series were found" itself
    for source in (bad, tmp_path / "empty"):
        code, _, err = _run(["segment-volume", source, "-p", "liver", "--model", "tiny",
                             "--out", tmp_path / "m.nii.gz"], capfd)  # fmt: skip
        line = _one_line(err)
        assert code == 2 and line.startswith(f"medsam3: error: {source}"), line
    assert not (tmp_path / "m.nii.gz").exists()


def test_library_warnings_never_print_before_our_error(tmp_path, png, capfd, monkeypatch):
    import medsam3.data.image_io as image_io

    def noisy(*args, **kwargs):
        np.float32(1e30) * np.float32(1e30)  # NumPy: "RuntimeWarning: overflow encountered"
        warnings.warn("another package's advice", UserWarning, stacklevel=1)  # issued outside medsam3
        raise image_io.InputFileError(png, "unreadable for this test")

    monkeypatch.setattr(image_io, "read_image", noisy)
    code, _, err = _run(["segment", png, "-p", "liver", "--out", tmp_path / "o"], capfd)
    line = _one_line(err)
    assert code == 2 and line == f"medsam3: error: {png}: unreadable for this test"


def test_a_bug_is_one_line_with_a_hint_and_the_traceback_with_debug(tmp_path, png, capfd, monkeypatch):
    import medsam3.data.image_io as image_io

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(image_io, "read_image", broken)
    code, _, err = _run(["segment", png, "-p", "liver", "--out", tmp_path / "o"], capfd)
    line = _one_line(err)
    assert code == 1 and "ZeroDivisionError" in line and "--debug" in line
    with pytest.raises(ZeroDivisionError):
        main(["segment", str(png), "-p", "liver", "--out", str(tmp_path / "o"), "--debug"])


# ----------------------------------------------------------------------------- 7. issue 22: the last seven

_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
          "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")  # fmt: skip


def _dicom_series(folder, n=4, drop=()):
    """A CT series of ``n`` 4x5 slices, 2 mm apart (tests/test_volume_io.py's), without the ``drop`` attributes."""
    import pydicom

    from test_volume_io import _series

    _series(folder, n)
    files = sorted(folder.iterdir())
    for path in files if drop else ():
        ds = pydicom.dcmread(path)
        for keyword in drop:
            delattr(ds, keyword)
        ds.save_as(path)
    return files


def _segment_volume(series, out, capfd, *extra):
    return _run(["segment-volume", series, "-p", "liver", "--model", "tiny", "--out", out, *extra], capfd)


def test_dicom_slices_of_different_sizes_are_named(tmp_path, capfd):
    import pydicom

    files = _dicom_series(tmp_path / "series", 5)
    for odd in (files[1], files[3]):
        ds = pydicom.dcmread(odd)
        ds.Rows, ds.Columns = 6, 7
        ds.PixelData = np.zeros((6, 7), np.uint16).tobytes()
        ds.save_as(odd)
    before = _hashes(tmp_path)
    code, _, err = _segment_volume(tmp_path / "series", tmp_path / "m.nii.gz", capfd)
    line = _one_line(err)
    assert code == 2 and "slices of different sizes" in line and "3 slices are 4x5" in line, line
    assert f"{files[1].name} is 6x7" in line and f"{files[3].name} is 6x7" in line
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("which", [0, 2])  # the first slice (no gap betrays it) and a middle one
def test_a_truncated_file_in_a_dicom_series_is_named_not_dropped(tmp_path, capfd, which):
    files = _dicom_series(tmp_path / "series", 5)
    data = files[which].read_bytes()
    files[which].write_bytes(data[: len(data) - 20])  # half of its pixel data is gone
    before = _hashes(tmp_path)
    code, _, err = _segment_volume(tmp_path / "series", tmp_path / "m.nii.gz", capfd)
    line = _one_line(err)
    assert code == 2 and line.startswith(f"medsam3: error: {files[which]}: truncated or corrupt DICOM file"), line
    assert "gap" not in line and "missing slices" not in line
    assert _hashes(tmp_path) == before


def test_dicom_seg_of_a_series_without_type_2_attributes_writes_them_empty(tmp_path, capfd):
    import highdicom as hd
    import pydicom

    files = _dicom_series(tmp_path / "series", drop=_TYPE2)
    before = _hashes(tmp_path / "series")
    seg_path, mask_path = tmp_path / "out" / "seg.dcm", tmp_path / "out" / "m.nii.gz"
    code, out, err = _segment_volume(tmp_path / "series", mask_path, capfd, "--threshold", "0",
                                     "--dicom-seg", seg_path)  # fmt: skip
    assert code == 0 and "Traceback" not in err, err
    assert out.strip().endswith(f"and {seg_path}")
    seg = hd.seg.segread(seg_path)
    assert all(keyword in seg and seg[keyword].value in ("", None) for keyword in _TYPE2)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=True)
    mask = np.asarray(nib.load(str(mask_path)).dataobj).T  # (z, y, x), as the series
    np.testing.assert_array_equal(back, mask)
    assert _hashes(tmp_path / "series") == before  # the empty values were added in memory only


def test_dicom_seg_refuses_a_series_without_a_required_attribute_by_name(tmp_path, capfd):
    files = _dicom_series(tmp_path / "series", drop=("SliceThickness",))  # type 2 in CT, needed by the SEG
    before = _hashes(tmp_path)
    out = tmp_path / "out"
    code, _, err = _segment_volume(tmp_path / "series", out / "m.nii.gz", capfd, "--dicom-seg", out / "seg.dcm")
    line = _one_line(err)
    assert code == 2 and f"{files[0]}: has no SliceThickness (0018,0050)" in line, line
    assert "seg.dcm cannot be written" in line and "3 other files" in line
    assert _hashes(tmp_path) == before and not out.exists()


def test_dicom_seg_of_an_empty_result_is_a_valid_empty_seg_and_said(tmp_path, capfd):
    import highdicom as hd
    import pydicom

    files = _dicom_series(tmp_path / "series")
    seg_path, mask_path = tmp_path / "seg.dcm", tmp_path / "m.nii.gz"
    code, _, err = _segment_volume(tmp_path / "series", mask_path, capfd, "--threshold", "1",  # nothing passes
                                   "--dicom-seg", seg_path)  # fmt: skip
    assert code == 0 and _one_line(err) == f"note: nothing was found; {seg_path} is a DICOM-SEG with empty segments"
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_segments == 1 and seg.get_segment_description(1).segment_label == "liver"
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=True)
    assert back.shape == (4, 4, 5) and not back.any()
    assert json.loads((tmp_path / "m.json").read_text())["dicom_seg"] == str(seg_path)


def _runs_with_hd95(root):
    from medsam3.evaluate.report import CaseRecord, write_case_csv

    runs = []
    for name, distances in (("a", (2.0, 4.0, math.inf)), ("b", (1.0, 3.0, 5.0))):
        records = [CaseRecord(f"c{i}", "liver", "test", 0.5, 0.4, 0.6, hd, 1.0, True, 1, 1, 0.1)
                   for i, hd in enumerate(distances)]  # fmt: skip
        write_case_csv(records, root / name / "per_case.csv")
        runs.append(root / name)
    return runs


def test_compare_accepts_every_metric_its_help_lists_and_hd95_counts_inf_apart(tmp_path, capfd):
    import re

    import typer

    from medsam3.cli import app

    evaluate = typer.main.get_command(app).commands["evaluate"]
    listed = re.findall(r"[a-z0-9]+", next(p.help for p in evaluate.params if p.name == "metric").split(":")[1])
    listed = [word for word in listed if word != "or"]
    assert "hd95" in listed
    runs = _runs_with_hd95(tmp_path)
    for metric in listed:
        code, _, err = _run(["evaluate", "compare", *runs, "--metric", metric, "--out", tmp_path / metric], capfd)
        assert code == 0 and err == "", (metric, err)
    table = (tmp_path / "hd95.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| liver"))
    assert "3.0000 (1 inf)" in row and "-1.0000 (p: too few, n=2)" in row  # (1-2 + 3-4) / 2, inf pair left out
    assert "Lower hd95 is better" in table
    assert json.loads((tmp_path / "hd95.json").read_text())["rows"][0]["infinite"] == [1, 0]
    before = _hashes(tmp_path)
    code, _, err = _run(["evaluate", "compare", *runs, "--metric", "hausdorff", "--out", tmp_path / "x"], capfd)
    line = _one_line(err)
    assert code == 2 and "'hausdorff'" in line and "hd95" in line
    assert _hashes(tmp_path) == before


def test_an_instance_has_at_least_one_pixel(tmp_path, capfd):
    image = _png(tmp_path / "in" / "dot.png", shape=(1, 1, 3))
    found = []
    for mask_threshold in ("0.5", "0.99"):
        out = tmp_path / mask_threshold
        code, stdout, err = _run(["segment", image, "-p", "liver", "--model", "tiny", "--threshold", "0",
                                  "--mask-threshold", mask_threshold, "--out", out], capfd)  # fmt: skip
        assert code == 0 and "Traceback" not in err, err
        instances = json.loads((out / "result.json").read_text())["prompts"][0]["instances"]
        assert all(entry["area"] >= 1 for entry in instances), instances
        assert f"liver: {len(instances)} instance(s)" in stdout
        found.append(len(instances))
    assert found[1] <= found[0]


def test_queries_whose_mask_vanishes_are_no_instances():
    from medsam3.infer.postprocess import to_prompt_result
    from medsam3.infer.types import Prompt

    masks = torch.full((3, 8, 8), -10.0)
    masks[0, :4, :4] = 10.0  # the best query has a mask; the other two, high-scoring too, have none
    masks[2, 0, 0] = 10.0  # ... except one pixel, which at a 2x2 size is below threshold everywhere
    result = to_prompt_result(
        Prompt("liver"), torch.tensor([5.0, 4.0, 3.0]), torch.tensor([[0.1, 0.1, 0.6, 0.6]] * 3), masks,
        None, None, (2, 2), score_threshold=0.5, mask_threshold=0.5,
    )  # fmt: skip
    assert len(result) == len(result.boxes) == len(result.masks) == 1
    assert result.masks.reshape(len(result), -1).any(axis=1).all() and result.scores[0] == pytest.approx(0.9933, 1e-3)


# ----------------------------------------------------------------------------- 8. a full disk while training


class _Disk:
    """``free`` bytes left under ``root`` (None: no limit), for every writer training uses.

    Python's writes there fail as on a full disk (OSError ENOSPC, naming no file); ``torch.save`` and
    safetensors' ``save_file``, which write in C++ and Rust, fail with what they really raise there
    (measured on a full tmpfs). TensorBoard's event log is left out: its writer thread reports its own.
    """

    def __init__(self, root, monkeypatch):
        import builtins
        import io

        import safetensors.torch

        self.root, self.free = os.path.abspath(root), None
        real_open, real_save, real_save_file = builtins.open, torch.save, safetensors.torch.save_file
        disk = self

        class Metered:
            def __init__(self, handle):
                self._handle = handle

            def write(self, data):
                if disk.free is not None:
                    if len(data) > disk.free:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    disk.free -= len(data)
                return self._handle.write(data)

            def __getattr__(self, name):
                return getattr(self._handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._handle.close()

        def metered_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return Metered(handle) if set(mode) & set("wax+") and self._full_here(file) else handle

        def full_save(obj, f, *args, **kwargs):
            if self._full_here(f) and self.free is not None:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            return real_save(obj, f, *args, **kwargs)

        def full_save_file(tensors, filename, *args, **kwargs):
            if self._full_here(filename) and self.free is not None:
                raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device")
            return real_save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", metered_open)
        monkeypatch.setattr(io, "open", metered_open)
        monkeypatch.setattr(torch, "save", full_save)
        monkeypatch.setattr(safetensors.torch, "save_file", full_save_file)

    def _full_here(self, file) -> bool:
        if not isinstance(file, (str, bytes, os.PathLike)):
            return False
        path = os.path.abspath(os.fsdecode(file))
        return path.startswith(self.root + os.sep) and "tensorboard" not in path


def _disk_dataset(root, cases):
    """A 2D nnU-Net set of bright disks (one concept, 'blob'); case c01 is hashed to val, c00 c02 c03 to train."""
    from train_helpers import disk_samples

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "blob": 1}, "channel_names": {"0": "x"}, "file_ending": ".png"}
    ))  # fmt: skip
    for case, sample in zip(cases, disk_samples(len(cases), size=40, negatives=0)):
        Image.fromarray(sample.image).save(root / "imagesTr" / f"{case}_0000.png")
        Image.fromarray(sample.masks[0].astype(np.uint8)).save(root / "labelsTr" / f"{case}.png")
    return root


def _train(data, run, capfd, *extra):
    return _run(["train", data, "--base", "tiny", "--out", run, "--batch-size", "2", "--lr", "1e-3",
                 "--device", "cpu", *extra], capfd)  # fmt: skip


def _metrics(run):
    import csv

    with (run / "metrics.csv").open(newline="") as handle:
        return [(row["epoch"], row["step"]) for row in csv.DictReader(handle)]


def test_a_full_disk_while_training_is_one_line_and_resume_logs_each_epoch_once(tmp_path, capfd, monkeypatch):
    from medsam3.train.trainer import Trainer

    data, run = _disk_dataset(tmp_path / "data", ["c00", "c02"]), tmp_path / "run"
    disk, saved, snapshot = _Disk(run, monkeypatch), [], {}
    real_save_checkpoint = Trainer.save_checkpoint

    def then_full(trainer, name, extra=None):  # epoch 1 writes best/ and last/; then 4 KB are left
        folder = real_save_checkpoint(trainer, name, extra)
        saved.append(name)
        if len(saved) == 2:
            snapshot.update(_hashes(run / "best", run / "last"))
            disk.free = 4096  # enough for a metrics.csv row, not for a checkpoint
        return folder

    monkeypatch.setattr(Trainer, "save_checkpoint", then_full)
    # no feature cache: it lives in the run folder, and its files would meet the full disk first
    code, _, err = _train(data, run, capfd, "--epochs", "2", "--no-cache-features")
    line = _one_line(err)
    assert code == 2 and line == f"medsam3: error: {run / 'best' / 'adapter.safetensors'}: No space left on device"
    assert _hashes(run / "best", run / "last") == snapshot  # epoch 1's checkpoints, untouched
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert _metrics(run) == [("1", "1"), ("2", "2")]  # epoch 2 was logged before its checkpoint failed

    disk.free = None  # space freed: resume from epoch 1's last/
    code, stdout, err = _train(data, run, capfd, "--epochs", "2", "--resume", "--no-cache-features")
    assert code == 0 and err == "", err
    assert _metrics(run) == [("1", "1"), ("2", "2")]  # once each, not epoch 2 twice
    assert json.loads((run / "last" / "adapter.json").read_text())["position"]["step"] == 2


# ----------------------------------------------------------------------------- 9. training defaults, hostile data


def test_training_on_one_image_works_and_says_there_is_no_validation(tmp_path, capfd):
    data, run = _disk_dataset(tmp_path / "data", ["c00"]), tmp_path / "run"
    code, stdout, err = _train(data, run, capfd, "--epochs", "1", "--batch-size", "4")  # a batch larger than the set
    assert code == 0 and err == "", err
    assert "training 1 samples (blob), no validation samples (best/ = last/)" in stdout
    assert f"adapter: {run / 'best'}" in stdout and _metrics(run) == [("1", "1")]
    assert (run / "best" / "adapter.safetensors").read_bytes() == (run / "last" / "adapter.safetensors").read_bytes()


def test_training_on_one_image_that_the_split_puts_in_val_is_refused_before_the_model_loads(tmp_path, capfd, no_model):
    data = _disk_dataset(tmp_path / "data", ["c01"])
    before = _hashes(tmp_path)
    code, _, err = _train(data, tmp_path / "run", capfd, "--epochs", "1")
    line = _one_line(err)
    assert code == 2 and f"{data}: nothing to train on: no case is in the training split (1 in val)" in line, line
    assert _hashes(tmp_path) == before and not (tmp_path / "run").exists()


def test_training_on_one_concept_with_a_validation_case_validates_it(tmp_path, capfd):
    data, run = _disk_dataset(tmp_path / "data", ["c00", "c01", "c02"]), tmp_path / "run"
    code, stdout, err = _train(data, run, capfd, "--epochs", "1")
    assert code == 0 and err == "", err
    assert "training 2 samples (blob), validating on 1" in stdout and "adapter: " in stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validated"] and 0.0 <= summary["history"][0]["val_dice"] <= 1.0
