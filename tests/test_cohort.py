"""Cohorts: a folder (list file, nnU-Net dataset) in, a folder out; resumable, fault tolerant, parallel.

The tiny random-weight model at a low score threshold finds something on every slice, so the masks
are non-trivial and any difference between runs (1 vs 2 workers, Ray) would show.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsam3.cli import main
from medsam3.data.volume_io import read_volume
from medsam3.infer.cohort import (
    FAILED_CASES_EXIT,
    LOCK_FILE,
    CohortSettings,
    find_cases,
    segment_cohort,
    split_threads,
)

TINY = ["-m", "tiny", "--threshold", "0.01", "--device", "cpu"]
SETTINGS = CohortSettings(kind="volume", prompts=("liver", "spleen"), model="tiny", device="cpu", score_threshold=0.01)


def _volume(seed: int, shape=(4, 40, 40)) -> np.ndarray:
    """A CT-like block (HU) with a bright ellipsoid whose place depends on ``seed``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    cy, cx = 14 + seed % 10, 16 + (3 * seed) % 10
    array = rng.normal(-100, 20, shape).astype(np.float32)
    array[((y - cy) / 9) ** 2 + ((x - cx) / 7) ** 2 + ((z - 1.5) / 3) ** 2 < 1] = 120
    return array


def _nifti(path: Path, seed: int, spacing=(0.8, 0.7, 2.5)) -> Path:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0 * seed, 5.0, 20.0)
    nib.save(nib.Nifti1Image(_volume(seed).transpose(2, 1, 0), affine), path)  # nibabel is (X, Y, Z)
    return path


def _nrrd(path: Path, seed: int) -> Path:
    image = sitk.GetImageFromArray(_volume(seed))
    image.SetSpacing((0.9, 0.9, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Three NIfTI, one NRRD and one corrupt NIfTI."""
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        _nifti(folder / f"case{k}.nii.gz", k)
    _nrrd(folder / "case3.nrrd", 3)
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file at all" * 10)
    return folder


def _rows(out: Path) -> list[dict]:
    import csv

    with open(out / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _leftovers(out: Path) -> list[str]:
    """Temporary files a half-written output would leave."""
    return sorted(p.name for p in out.rglob("*") if p.name.startswith(".") and p.name != LOCK_FILE and p.is_file()
                  and p.parent.name != ".medsam3-cohort")  # fmt: skip


def _masks(out: Path, names) -> dict[str, np.ndarray]:
    found = {}
    for name in names:
        (path,) = [p for p in out.iterdir() if p.name.startswith(name + ".") and not p.name.endswith(".json")]
        found[name] = read_volume(path).array
    return found


def test_folder_in_folder_out_with_a_corrupt_case_resume_and_changed_settings(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment-volume", str(cohort), "-p", "liver", "-p", "spleen", "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == FAILED_CASES_EXIT == 3
    # the bad case: one line naming the file, in the summary and on stderr; nothing written for it
    (line,) = [ln for ln in err.splitlines() if "case broken failed" in ln]
    assert str(cohort / "broken.nii.gz") in line and "\n" not in line
    rows = _rows(out)
    bad = [r for r in rows if r["case"] == "broken"]
    assert len(bad) == 1 and bad[0]["status"] == "failed" and str(cohort / "broken.nii.gz") in bad[0]["reason"]
    assert not [p for p in out.iterdir() if p.name.startswith("broken")]
    # the good cases: a label map per case in the input's format and geometry, a row per concept
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["case0.nii.gz", "case0.json", "case1.nii.gz", "case1.json", "case2.nii.gz", "case2.json",
         "case3.nrrd", "case3.json", "summary.csv", "summary.json"]
    )  # fmt: skip
    for name, source in [("case1.nii.gz", "case1.nii.gz"), ("case3.nrrd", "case3.nrrd")]:
        mask, image = read_volume(out / name), read_volume(cohort / source)
        assert mask.shape == image.shape and np.allclose(mask.spacing, image.spacing)
        assert np.allclose(mask.origin, image.origin) and np.allclose(mask.direction, image.direction)
    good = [r for r in rows if r["status"] == "ok"]
    assert [(r["case"], r["concept"]) for r in good] == [(f"case{k}", c) for k in range(4) for c in ("liver", "spleen")]
    for row in good:
        mask = _masks(out, [row["case"]])[row["case"]]
        label = 1 if row["concept"] == "liver" else 2
        voxels = int((mask == label).sum())
        assert int(row["voxels"]) == voxels and voxels > 0
        spacing = read_volume(next(cohort.glob(row["case"] + ".*"))).spacing
        assert float(row["volume_ml"]) == pytest.approx(voxels * np.prod(spacing) / 1000, rel=1e-3)
        assert int(row["instances"]) >= 1 and 0 < float(row["presence"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 4 and summary["failed"] == 1 and "broken" in summary["failed_cases"]
    assert _leftovers(out) == []

    # rerun: the finished cases are not redone (files untouched), the bad one is tried again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".gz", ".nrrd")}
    statuses: list[tuple[str, str]] = []
    run = segment_cohort(cohort, out, SETTINGS, on_result=lambda r: statuses.append((r.case, r.status)))
    assert sorted(statuses) == [("broken", "failed")] + [(f"case{k}", "reused") for k in range(4)]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".gz", ".nrrd")} == stamps
    assert len(run.failed) == 1

    # the bad case repaired: only it is done; a changed input (case0) is redone too
    _nifti(cohort / "broken.nii.gz", 7)
    _nifti(cohort / "case0.nii.gz", 9)
    run = segment_cohort(cohort, out, SETTINGS)
    assert {r.case: r.status for r in run.results} == {
        "broken": "ok", "case0": "ok", "case1": "reused", "case2": "reused", "case3": "reused"
    }  # fmt: skip
    # changed settings redo everything
    changed = CohortSettings(**{**SETTINGS.__dict__, "score_threshold": 0.02})
    run = segment_cohort(cohort, out, changed)
    assert {r.status for r in run.results} == {"ok"} and not run.failed


def test_an_interrupted_run_reruns_only_the_rest(cohort, tmp_path):
    (cohort / "broken.nii.gz").unlink()
    out, seen = tmp_path / "out", []

    def interrupt_after_two(result):
        seen.append(result.case)
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C between cases

    with pytest.raises(KeyboardInterrupt):
        segment_cohort(cohort, out, SETTINGS, on_result=interrupt_after_two)
    assert [r["case"] for r in _rows(out)] == ["case0", "case0", "case1", "case1"]  # the summary so far
    run = segment_cohort(cohort, out, SETTINGS)
    assert {r.case: r.status for r in run.results} == {"case0": "reused", "case1": "reused", "case2": "ok",
                                                      "case3": "ok"}  # fmt: skip
    assert _leftovers(out) == []


def test_two_runs_on_one_output_folder_the_second_is_refused(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # another run holding the folder: the lock as output_lock takes it (flock + its pid), without the imports
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
         "f.truncate(0); f.write(f'pid {os.getpid()}'); f.flush(); print('held', flush=True); time.sleep(60)",
         str(out / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["segment-volume", str(cohort), "-p", "liver", "--out", str(out), *TINY])
        err = capsys.readouterr().err
        assert code == 2
        assert f"another medsam3 run (pid {holder.pid}) is writing to this folder" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock went with it, so the folder is usable again at once
    run = segment_cohort(cohort, out, SETTINGS)
    assert len(run.results) == 5 and len(run.failed) == 1


def test_disk_full_mid_cohort_fails_that_case_with_nothing_half_written(cohort, tmp_path, monkeypatch, capsys):
    import medsam3.data.volume_io as volume_io

    real_write = volume_io.write_mask

    def full_disk_on_case2(path, mask, like):
        if like.path.name.startswith("case2"):
            Path(path).write_bytes(b"\x1f\x8b half a file")  # the temporary gets half-written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, mask, like)

    monkeypatch.setattr(volume_io, "write_mask", full_disk_on_case2)
    (cohort / "broken.nii.gz").unlink()
    out = tmp_path / "out"
    code = main(["segment-volume", str(cohort), "-p", "liver", "--out", str(out), *TINY])
    assert code == 3
    err = capsys.readouterr().err
    assert "case case2 failed:" in err and "No space left on device" in err
    rows = {r["case"]: r for r in _rows(out)}
    assert rows["case2"]["status"] == "failed" and "No space left on device" in rows["case2"]["reason"]
    assert rows["case2"]["reason"] == f"{out / 'case2.nii.gz'}: No space left on device"  # not the temporary's name
    assert {rows[c]["status"] for c in ("case0", "case1", "case3")} == {"ok"}
    assert not [p for p in out.iterdir() if p.name.startswith("case2")]
    assert _leftovers(out) == []
    # disk freed: the rerun does case2 only
    monkeypatch.setattr(volume_io, "write_mask", real_write)
    run = segment_cohort(cohort, out, CohortSettings(**{**SETTINGS.__dict__, "prompts": ("liver",)}))
    assert {r.case: r.status for r in run.results} == {"case0": "reused", "case1": "reused", "case2": "ok",
                                                      "case3": "reused"}  # fmt: skip


def _kill_one(children, marker: str) -> int:
    """SIGKILL the first process whose command line holds ``marker`` (a pool worker, a Ray actor)."""
    import psutil

    for proc in children():
        try:
            if marker not in " ".join(proc.cmdline()):
                continue
            proc.kill()
            return proc.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no worker process to kill")


def test_two_workers_give_the_same_masks_as_one_and_a_killed_worker_is_replaced(cohort, tmp_path):
    import psutil

    (cohort / "broken.nii.gz").unlink()
    names = [f"case{k}" for k in range(4)]
    one = segment_cohort(cohort, tmp_path / "one", SETTINGS)
    assert one.backend == "inline" and not one.failed
    killed = []

    def kill_after_first(result):
        if not killed and result.status == "ok":
            killed.append(_kill_one(lambda: psutil.Process().children(recursive=True), "spawn_main"))

    two = segment_cohort(cohort, tmp_path / "two", SETTINGS, workers=2, on_result=kill_after_first)
    assert killed and two.backend == "processes" and two.threads == split_threads(2)
    assert not two.failed and {r.status for r in two.results} == {"ok"}
    first, second = _masks(tmp_path / "one", names), _masks(tmp_path / "two", names)
    for name in names:
        assert np.array_equal(first[name], second[name]), name
    strip = ("seconds",)
    rows = lambda out: [{k: v for k, v in r.items() if k not in strip} for r in _rows(out)]  # noqa: E731
    assert rows(tmp_path / "one") == rows(tmp_path / "two")


def test_ray_local_same_masks_and_summary_and_a_killed_actor_is_redone(cohort, tmp_path):
    ray = pytest.importorskip("ray", reason="the optional extra medsam3[ray] is not installed")
    import psutil

    (cohort / "broken.nii.gz").unlink()
    names = [f"case{k}" for k in range(4)]
    assert not segment_cohort(cohort, tmp_path / "one", SETTINGS).failed
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        killed = []

        def kill_after_first(result):
            if not killed and result.status == "ok":
                killed.append(_kill_one(psutil.process_iter, "_CohortActor"))

        run = segment_cohort(cohort, tmp_path / "ray", SETTINGS, workers=2, ray_address="auto",
                             on_result=kill_after_first)  # fmt: skip
    finally:
        ray.shutdown()
    assert killed and run.backend == "ray"
    assert not list((tmp_path / "ray" / ".medsam3-cohort").glob("*.ray-attempts"))
    assert not run.failed and sorted(r.case for r in run.results) == names
    first, second = _masks(tmp_path / "one", names), _masks(tmp_path / "ray", names)
    for name in names:
        assert np.array_equal(first[name], second[name]), name
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(_rows(tmp_path / "one")) == drop(_rows(tmp_path / "ray"))
    # and the resume is the same: a local rerun on the Ray output reuses every case
    again = segment_cohort(cohort, tmp_path / "ray", SETTINGS)
    assert {r.status for r in again.results} == {"reused"}


# ----------------------------------------------------------------------------- what counts as a case


def test_nnunet_msd_list_file_and_dicom_series_cases(tmp_path):
    # nnU-Net v2: channel 0 of imagesTr and imagesTs, named without the channel suffix
    root = tmp_path / "Dataset001"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    described = {"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    (root / "dataset.json").write_text(json.dumps(described))
    for name in ("a_0000", "a_0001"):
        _nifti(root / "imagesTr" / f"{name}.nii.gz", 1)
    _nifti(root / "labelsTr" / "a.nii.gz", 1)
    _nifti(root / "imagesTs" / "b_0000.nii.gz", 2)
    assert [(c.name, Path(c.path).parent.name) for c in find_cases(root, "volume")] == [("a", "imagesTr"),
                                                                                       ("b", "imagesTs")]  # fmt: skip
    # MSD: images named like their labels
    msd = tmp_path / "Task03_Liver"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    _nifti(msd / "imagesTr" / "liver_7.nii.gz", 1)
    assert [c.name for c in find_cases(msd, "volume")] == ["liver_7"]
    # a list file: relative to its folder, comments and blanks skipped; equal stems made unique
    (tmp_path / "x").mkdir()
    _nifti(tmp_path / "x" / "scan.nii.gz", 1)
    _nrrd(tmp_path / "scan.nrrd", 2)
    listing = tmp_path / "cases.txt"
    listing.write_text("# my cohort\nx/scan.nii.gz\n\nscan.nrrd\n")
    cases = find_cases(listing, "volume")
    assert [c.name for c in cases] == ["scan", "scan_2"] and [Path(c.path).name for c in cases] == [
        "scan.nii.gz", "scan.nrrd"]  # fmt: skip
    listing.write_text("missing.nii.gz\n")
    code = main(["segment-volume", str(listing), "-p", "liver", "--out", str(tmp_path / "o"), *TINY])
    assert code == 2
    # a case called 'summary' cannot take the summary's name
    (tmp_path / "s").mkdir()
    _nifti(tmp_path / "s" / "summary.nii.gz", 1)
    assert [c.name for c in find_cases(tmp_path / "s", "volume")] == ["summary_2"]


def _dicom_series(folder: Path, array: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(array):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "CT", study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "phantom", "Phantom^CT", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-10.0, -20.0, 2.5 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (plane + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_folders_give_dicom_seg_and_outputs_never_go_over_inputs(tmp_path, capsys):
    import pydicom

    folder = tmp_path / "study"
    _dicom_series(folder / "patient1", _volume(1))
    _nifti(folder / "other.nii.gz", 2)
    out = tmp_path / "out"
    run = segment_cohort(folder, out, SETTINGS)
    assert not run.failed and [r.case for r in run.results] == ["other", "patient1"]
    seg = pydicom.dcmread(out / "patient1_seg.dcm")
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen"]
    mask = read_volume(out / "patient1.nii.gz")
    assert mask.shape == read_volume(folder / "patient1").shape and mask.array.any()
    # a series where nothing is found: a valid DICOM-SEG with empty segments, and a rerun still reuses it
    _dicom_series(folder / "blank", np.full((3, 40, 40), -1000.0, np.float32))
    run = segment_cohort(folder, out, SETTINGS)
    assert {r.case: r.status for r in run.results} == {"blank": "ok", "other": "reused", "patient1": "reused"}
    blank = pydicom.dcmread(out / "blank_seg.dcm")
    assert blank.Modality == "SEG" and not read_volume(out / "blank.nii.gz").array.any()
    assert {r.status for r in segment_cohort(folder, out, SETTINGS).results} == {"reused"}
    # --out the input folder itself, or inside a DICOM series read whole: refused before any work
    for bad in (folder, folder / "patient1" / "out"):
        code = main(["segment-volume", str(folder), "-p", "liver", "--out", str(bad), *TINY])
        assert code == 2
        assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in (folder / "patient1").iterdir()) == [f"{k:03d}.dcm" for k in range(4)]
    code = main(["segment-volume", str(folder), "-p", "liver", "--out", str(tmp_path / "mask.nii.gz"), *TINY])
    assert code == 2 and "--out must be a folder" in capsys.readouterr().err
    # per-case options make no sense for a folder
    code = main(["segment-volume", str(folder), "-p", "liver", "--out", str(out), "--box", "1,1,5,5",
                 "--box-slice", "0", *TINY])  # fmt: skip
    assert code == 2 and "--box applies to one input" in capsys.readouterr().err


def test_segment_a_folder_of_2d_images(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(_volume(k)[2].clip(0, 255).astype(np.uint8)).save(folder / f"img{k}.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code = main(["segment", str(folder), "-p", "nucleus", "--out", str(out), *TINY, "--no-normalize"])
    assert code == 3
    assert "case bad failed:" in capsys.readouterr().err
    rows = _rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("bad", "failed"), ("img0", "ok"), ("img1", "ok")]
    for k in range(2):
        result = json.loads((out / f"img{k}" / "result.json").read_text())
        (prompt,) = result["prompts"]
        assert prompt["prompt"] == "nucleus" and int(rows[k + 1]["instances"]) == len(prompt["instances"])
        from medsam3.data.image_io import read_image

        mask = read_image(out / f"img{k}" / "nucleus.png").rgb[..., 0] > 0
        assert int(rows[k + 1]["voxels"]) == int(mask.sum())
    assert not (out / "bad").exists() and _leftovers(out) == []


def test_a_model_that_cannot_load_stops_the_run_once_with_workers(cohort, tmp_path, capsys):
    """Not one failure per case: the workers' setup error is the run's, one line, exit 2."""
    from medsam3.infer.cohort import _init_worker, _work

    bad = CohortSettings(**{**SETTINGS.__dict__, "model": str(tmp_path / "no_such_model")})
    _init_worker(bad, str(tmp_path / "out"), 1)  # what each spawned worker runs first
    result = _work(find_cases(cohort, "volume")[0])
    assert result.status == "setup-failed" and "no_such_model" in result.reason
    code = main(["segment-volume", str(cohort), "-p", "liver", "--out", str(tmp_path / "out"), "-m",
                 str(tmp_path / "no_such_model")])  # fmt: skip
    assert code == 2 and "no_such_model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.csv").exists() or "ok" not in (tmp_path / "out" / "summary.csv").read_text()


def test_the_summary_names_a_replaced_phrase_as_typed_and_as_answered(tmp_path):
    """nano was never taught 'spleen': the normaliser runs it as 'liver', and the summary says both."""
    folder = tmp_path / "in"
    folder.mkdir()
    _nifti(folder / "a.nii.gz", 1)
    settings = CohortSettings(kind="volume", prompts=("liver", "spleen"), model="nano", device="cpu")
    run = segment_cohort(folder, tmp_path / "out", settings)
    assert [r["concept"] for r in _rows(tmp_path / "out")] == ["liver", "spleen (as liver)"]
    assert not run.failed


def test_threads_are_split_between_workers():
    assert split_threads(1, cores=8) == 8 and split_threads(2, cores=8) == 4 and split_threads(3, cores=8) == 2
    assert split_threads(16, cores=2) == 1


def test_settings_digest_changes_with_what_changes_the_output(tmp_path):
    base = SETTINGS.digest()
    assert CohortSettings(**{**SETTINGS.__dict__, "device": "cuda"}).digest() == base  # where, not what
    for change in ({"score_threshold": 0.3}, {"prompts": ("liver",)}, {"model": "nano"}, {"axis": 1},
                   {"method": "track"}, {"window": "abdomen"}, {"towers": "fp32"}):  # fmt: skip
        assert CohortSettings(**{**SETTINGS.__dict__, **change}).digest() != base, change


def test_an_in_process_cohort_leaves_the_process_defaults_as_they_were(tmp_path):
    """A cohort loads its model with its own towers and runtime; the caller's defaults come back
    (they leaked into every later load_model of the process, e.g. a pytest worker)."""
    from medsam3.infer.cohort import CaseSegmenter
    from medsam3.model.precision import default_towers
    from medsam3.model.runtime import default_runtime

    before = default_towers(), default_runtime()
    settings = CohortSettings(**{**SETTINGS.__dict__, "towers": "bf16", "runtime": "torch"})
    segmenter = CaseSegmenter(settings, tmp_path)
    assert segmenter.setup.predictor is not None
    assert (default_towers(), default_runtime()) == before
