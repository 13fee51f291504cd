"""medsam3 serve through FastAPI's test client: every endpoint, and every class of bad input (4xx, never 5xx)."""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from medsam3.serve import ServeSettings, create_app  # noqa: E402

OBLIQUE = (
    math.cos(0.3), -math.sin(0.3), 0.0,
    math.sin(0.3), math.cos(0.3), 0.0,
    0.0, 0.0, 1.0,
)  # fmt: skip


# ----------------------------------------------------------------------------- inputs


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(height: int = 48, width: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    image = np.full((height, width), 40, np.uint8)
    image[(yy - height // 2) ** 2 + (xx - width // 2) ** 2 < (height // 4) ** 2] = 220
    return image


def tiff(array: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def nifti(path: Path, array: np.ndarray, spacing=(0.8, 0.7, 2.5), origin=(-10.0, 20.0, 30.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(OBLIQUE)
    sitk.WriteImage(image, str(path), True)
    return path


def ct_volume(slices: int = 6, size: int = 32) -> np.ndarray:
    zz, yy, xx = np.mgrid[:slices, :size, :size]
    volume = np.full((slices, size, size), -1000, np.int16)
    volume[(yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 3) ** 2] = 60
    volume[:, : size // 4] += (zz[:, : size // 4] * 7).astype(np.int16)
    return volume


def dicom_series_zip(slices: int = 4, evil_names: bool = False) -> bytes:
    """A small CT series as a zip (optionally with member names that try to leave the folder)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k in range(slices):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.PatientID, ds.PatientName, ds.StudyDate, ds.Modality = "P1", "Test^Phantom", "20260101", "CT"
            ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "1", 1, k + 1, "A1"
            ds.Manufacturer, ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "x", "", "", "O"
            ds.StudyTime = "120000"
            ds.ImagePositionPatient = [-10.0, -20.0, -50.0 + 2.0 * k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing, ds.SliceThickness = [0.5, 0.6], 2.0
            ds.Rows, ds.Columns = 16, 20
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            pixels = np.full((16, 20), 900, np.uint16)
            pixels[4:12, 5:15] = 1100 + 10 * k
            ds.PixelData = pixels.tobytes()
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            name = f"../../escape_{k}.dcm" if evil_names else f"series/IM{k:04d}"
            archive.writestr(name, out.getvalue())
        archive.writestr("README.txt", "not a DICOM file")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- fixtures


def make_client(tiny_model, **settings) -> TestClient:
    settings.setdefault("model", "tiny")
    settings.setdefault("device", "cpu")
    return TestClient(create_app(ServeSettings(**settings), loaded=tiny_model))


@pytest.fixture(scope="module")
def client(tiny_model):
    with make_client(tiny_model, score_threshold=0.0, mask_threshold=0.0) as c:
        yield c


@pytest.fixture
def no_tracebacks(caplog):
    caplog.set_level(logging.INFO)
    yield caplog
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def upload(client, name: str, data: bytes, **extra):
    return client.post("/api/sessions", files={"file": (name, data, "application/octet-stream")}, **extra)


def assert_error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert message and "\n" not in message and "medsam3-serve-" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def wait_for_job(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# ----------------------------------------------------------------------------- server, page, docs


def test_health_info_page_and_offline_docs(client, no_tracebacks):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["auth_required"] is False
    info = client.get("/api/info").json()
    assert info["image_size"] == 112 and "abdomen" in info["windows"] and ".nii.gz" in info["formats"]
    assert info["limits"]["max_upload_bytes"] > 0 and info["state"]["sessions"] >= 0
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.split("<body>")[0]
    for name in ("app.js", "app.css"):
        assert client.get(f"/static/{name}").status_code == 200
    script = client.get("/static/app.js").text
    assert "https://" not in script and "cdn" not in script.lower()  # everything served locally
    assert_error(client.get("/static/..%2Fapp.py"), 404)
    assert_error(client.get("/static/settings.py"), 404)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text and "cdn." not in docs.text
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200
    assert_error(client.get("/docs/assets/../../app.py"), 404)
    schema = client.get("/openapi.json").json()
    for path in (
        "/api/sessions",
        "/api/sessions/{session_id}/segment",
        "/api/sessions/{session_id}/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/cancel",
        "/api/jobs/{job_id}/mask",
        "/api/jobs/{job_id}/seg.dcm",
        "/api/sessions/{session_id}/results/{result_id}/masks/{k}.png",
    ):
        assert path in schema["paths"], path
    assert_error(client.get("/api/no-such-endpoint"), 404)
    assert_error(client.delete("/api/health"), 405)


def test_concept_suggestions_come_from_the_normaliser(client, no_tracebacks):
    empty = client.get("/api/concepts").json()
    assert empty["suggestions"] == [] and empty["source"] == "bundled"  # tiny has no vocabulary of its own
    found = client.get("/api/concepts", params={"q": "hepatic lesion", "k": 3}).json()
    assert found["suggestions"][0]["concept"] == "liver tumor" and len(found["suggestions"]) == 3
    assert client.get("/api/concepts", params={"q": "!!!"}).json()["suggestions"] == []
    assert_error(client.get("/api/concepts", params={"q": "x", "k": 99}), 422)


# ----------------------------------------------------------------------------- 2D


def test_png_upload_segment_twice_encodes_once_and_masks_download(client, no_tracebacks):
    image = picture()
    session = upload(client, "disk.png", png(image))
    assert session.status_code == 201
    info = session.json()
    assert (info["kind"], info["format"], info["width"], info["height"], info["name"]) == (
        "image",
        "png",
        64,
        48,
        "disk.png",
    )
    sid = info["id"]
    assert client.get(f"/api/sessions/{sid}").json()["id"] == sid
    shown = read_png(client.get(f"/api/sessions/{sid}/image.png").content)
    assert shown.shape[:2] == (48, 64)
    encodes = client.get("/api/info").json()["state"]["encodes"]

    first = client.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"]})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["encoded"] is True and body["image_size"] == [48, 64] and body["model"] == "tiny"
    prompt = body["prompts"][0]
    assert prompt["prompt"] == "liver" and prompt["count"] == len(prompt["instances"]) > 0
    instance = prompt["instances"][0]
    assert set(instance) >= {"score", "box", "area"} and 0.0 <= instance["score"] <= 1.0 and len(instance["box"]) == 4

    second = client.post(f"/api/sessions/{sid}/segment", json={"concepts": ["kidney", "liver tumor"]}).json()
    assert second["encoded"] is False  # the vision features stayed cached
    assert client.get("/api/info").json()["state"]["encodes"] == encodes + 1
    assert [p["index"] for p in second["prompts"]] == [1, 2]

    mask = read_png(client.get(prompt["downloads"]["mask"]).content)
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255} and int((mask > 0).sum()) == prompt["area"]
    instances = read_png(client.get(prompt["downloads"]["instances"]).content)
    assert instances.shape == (48, 64) and 1 <= int(instances.max()) <= prompt["count"]
    labels = read_png(client.get(body["downloads"]["labels"]).content)
    assert labels.shape == (48, 64) and set(np.unique(labels)) <= {0, 1}
    overlay = client.get(body["downloads"]["overlay"])
    assert overlay.headers["content-type"] == "image/png" and read_png(overlay.content).shape == (48, 64, 3)
    again = client.get(f"/api/sessions/{sid}/results/{body['result']}").json()
    assert again["prompts"][0]["area"] == prompt["area"]
    assert body["downloads"]["dicom_seg"] is None
    assert_error(client.get(f"/api/sessions/{sid}/results/{body['result']}/seg.dcm"), 400, "DICOM input only")
    assert_error(client.get(f"/api/sessions/{sid}/results/{body['result']}/masks/3.png"), 404, "prompts are numbered")
    assert client.delete(f"/api/sessions/{sid}").status_code == 204
    assert_error(client.get(f"/api/sessions/{sid}"), 404)


def test_positive_and_negative_boxes_window_and_normalised_phrase(client, no_tracebacks):
    sid = upload(client, "disk.png", png(picture())).json()["id"]
    body = client.post(
        f"/api/sessions/{sid}/segment",
        json={
            "concepts": ["liver"],
            "boxes": [[10, 8, 40, 30]],
            "negative_boxes": [[45, 30, 60, 44]],
            "threshold": 0.0,
        },
    ).json()
    assert body["prompts"][0]["boxes_in"] == [[10.0, 8.0, 40.0, 30.0], [45.0, 30.0, 60.0, 44.0]]
    assert (
        client.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"], "window": "lung"}).status_code == 200
    )
    long = client.post(f"/api/sessions/{sid}/segment", json={"concepts": ["a very long concept phrase"]}).json()
    assert any("5 words" in note for note in long["notes"])


def test_jpeg_tiff_and_sniffed_uploads(client, no_tracebacks):
    rgb = np.stack([picture()] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    assert upload(client, "photo.jpg", buffer.getvalue()).json()["format"] == "jpeg"
    deep = (picture().astype(np.uint16) * 200).astype(np.uint16)
    assert upload(client, "deep.tif", tiff(deep)).json()["format"] == "tiff"
    sniffed = upload(client, "no_ending", png(picture()))  # no file ending: the bytes say PNG
    assert sniffed.status_code == 201 and sniffed.json()["format"] == "png"
    odd = upload(client, "../../etc/passwd.png", png(picture()))  # a path in the name is only text
    assert odd.status_code == 201 and odd.json()["name"] == "passwd.png"


def test_partly_nan_tiff_loads_with_a_note(client, no_tracebacks):
    values = picture().astype(np.float32)
    values[:4, :4] = np.nan
    response = upload(client, "holes.tif", tiff(values))
    assert response.status_code == 201
    notes = response.json()["notes"]
    assert any("NaN" in n for n in notes) and not any("medsam3-serve-" in n for n in notes)


def test_dicom_image_segment_and_dicom_seg(client, no_tracebacks):
    import pydicom
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    info = upload(client, "ct.dcm", data).json()
    assert (info["kind"], info["format"], info["modality"], info["dicom_seg"]) == ("image", "dicom", "CT", True)
    body = client.post(f"/api/sessions/{info['id']}/segment", json={"concepts": ["liver"], "window": "abdomen"}).json()
    assert body["prompts"][0]["area_mm2"] is not None  # the file records its pixel spacing
    seg = client.get(body["downloads"]["dicom_seg"])
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(seg.content))
    assert ds.Modality == "SEG" and ds.SegmentSequence[0].SegmentLabel == "liver"


# ----------------------------------------------------------------------------- volumes


def test_nifti_volume_slice_job_progress_and_mask_geometry(client, tmp_path, no_tracebacks):
    path = nifti(tmp_path / "ct.nii.gz", ct_volume())
    info = upload(client, "ct.nii.gz", path.read_bytes()).json()
    assert (info["kind"], info["format"], info["shape"], info["is_ct"]) == ("volume", "nifti", [6, 32, 32], True)
    sid = info["id"]
    assert read_png(client.get(f"/api/sessions/{sid}/image.png", params={"slice": 2, "window": "lung"}).content).shape[
        :2
    ] == (32, 32)
    one = client.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"], "slice": 3}).json()
    assert one["slice"] == 3 and one["image_size"] == [32, 32]

    job = client.post(f"/api/sessions/{sid}/jobs", json={"concepts": ["liver", "kidney"]})
    assert job.status_code == 202 and job.json()["status"] in ("queued", "running", "done")
    done = wait_for_job(client, job.json()["id"])
    assert done["status"] == "done", done
    assert done["progress"]["done"] == done["progress"]["total"] > 0
    legend = done["result"]
    assert [p["prompt"] for p in legend["prompts"]] == ["liver", "kidney"]
    assert all(p["volume_ml"] is not None for p in legend["prompts"])
    mask_bytes = client.get(done["downloads"]["nifti"])
    assert mask_bytes.status_code == 200 and "attachment" in mask_bytes.headers["content-disposition"]
    written = tmp_path / "mask.nii.gz"
    written.write_bytes(mask_bytes.content)
    mask, source = sitk.ReadImage(str(written)), sitk.ReadImage(str(path))
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(mask)
    voxels = {p["label"]: p["voxels"] for p in legend["prompts"]}
    assert int((labels == 1).sum()) == voxels[1] and int((labels == 2).sum()) == voxels[2]
    assert client.get(done["downloads"]["nrrd"]).status_code == 200
    assert client.get(done["downloads"]["mha"]).status_code == 200
    plane = read_png(client.get(f"/api/jobs/{done['id']}/labels/4.png").content)
    np.testing.assert_array_equal(plane, labels[4])
    assert done["downloads"]["dicom_seg"] is None
    assert_error(client.get(f"/api/jobs/{done['id']}/seg.dcm"), 400, "DICOM input only")
    assert_error(client.get(f"/api/jobs/{done['id']}/labels/99.png"), 404, "valid slices are 0..5")
    assert_error(client.get(f"/api/jobs/{done['id']}/mask", params={"format": "../x"}), 400, "unknown mask format")

    boxed = client.post(
        f"/api/sessions/{sid}/jobs",
        json={"concepts": ["liver"], "method": "track", "box_slice": 2, "box": [8, 8, 24, 24]},
    )
    assert wait_for_job(client, boxed.json()["id"])["status"] == "done"
    again = client.get("/api/info").json()["state"]
    assert again["cached_features"] >= 6  # the second job reused the first one's slice features


def test_zipped_dicom_series_gives_a_dicom_seg_and_member_names_are_ignored(client, tmp_path, no_tracebacks):
    import pydicom

    info = upload(client, "series.zip", dicom_series_zip()).json()
    assert (info["kind"], info["format"], info["shape"], info["dicom_seg"]) == (
        "volume",
        "dicom-series",
        [4, 16, 20],
        True,
    )
    done = wait_for_job(
        client, client.post(f"/api/sessions/{info['id']}/jobs", json={"concepts": ["liver"]}).json()["id"]
    )
    assert done["status"] == "done", done
    seg = client.get(done["downloads"]["dicom_seg"])
    assert seg.status_code == 200
    assert pydicom.dcmread(io.BytesIO(seg.content)).Modality == "SEG"

    root = client.app.state.service.sessions.root
    escaped = upload(client, "evil.zip", dicom_series_zip(evil_names=True))
    assert escaped.status_code == 201
    assert not list(root.parent.glob("escape_*")) and not list(root.parent.parent.glob("escape_*"))
    assert not list(Path.cwd().glob("escape_*"))


def test_cancel_a_running_job_and_the_queue_is_bounded(tiny_model, tmp_path, no_tracebacks):
    with make_client(tiny_model, max_queued_jobs=2) as c:
        sid = upload(c, "ct.nii.gz", nifti(tmp_path / "v.nii.gz", ct_volume()).read_bytes()).json()["id"]
        lock = c.app.state.service.model.lock
        lock.acquire()  # the model is busy: jobs wait on their first slice
        try:
            running = c.post(f"/api/sessions/{sid}/jobs", json={"concepts": ["liver"]}).json()
            deadline = time.monotonic() + 10
            while c.get(f"/api/jobs/{running['id']}").json()["status"] != "running" and time.monotonic() < deadline:
                time.sleep(0.01)
            queued = [c.post(f"/api/sessions/{sid}/jobs", json={"concepts": ["liver"]}) for _ in range(2)]
            assert [q.status_code for q in queued] == [202, 202]
            full = c.post(f"/api/sessions/{sid}/jobs", json={"concepts": ["liver"]})
            assert_error(full, 429, "already waiting")
            assert full.headers["retry-after"]
            assert_error(c.get(f"/api/jobs/{running['id']}/mask"), 409, "is running")
            assert c.post(f"/api/jobs/{queued[1].json()['id']}/cancel").json()["status"] == "cancelled"
            assert c.post(f"/api/jobs/{running['id']}/cancel").status_code == 200
        finally:
            lock.release()
        assert wait_for_job(c, running["id"])["status"] == "cancelled"
        assert wait_for_job(c, queued[0].json()["id"])["status"] == "done"
        assert c.get(f"/api/jobs/{queued[1].json()['id']}").json()["status"] == "cancelled"


def test_request_time_limit_answers_503_instead_of_hanging(tiny_model, no_tracebacks):
    with make_client(tiny_model, request_timeout_s=0.3) as c:
        sid = upload(c, "disk.png", png(picture())).json()["id"]
        lock = c.app.state.service.model.lock
        lock.acquire()
        try:
            started = time.monotonic()
            busy = c.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"]})
            assert time.monotonic() - started < 5
        finally:
            lock.release()
        assert_error(busy, 503, "busy")
        assert busy.headers["retry-after"] == "5"
        assert c.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"]}).status_code == 200


# ----------------------------------------------------------------------------- memory and files


def test_sessions_are_evicted_lru_with_their_files_and_features(tiny_model, no_tracebacks):
    with make_client(tiny_model, max_sessions=2) as c:
        service = c.app.state.service
        root = service.sessions.root
        ids = []
        for k in range(3):
            sid = upload(c, f"img{k}.png", png(picture() + k)).json()["id"]
            assert c.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"]}).status_code == 200
            ids.append(sid)
        assert_error(c.get(f"/api/sessions/{ids[0]}"), 404, "unknown, expired or evicted")
        assert c.get(f"/api/sessions/{ids[2]}").status_code == 200
        assert len([p for p in root.iterdir() if p.is_dir()]) == 2  # the evicted session's folder is gone
        assert len(service.model.features) == 2  # and so are its cached features
    assert not root.exists()  # the server removed every temporary file when it stopped


def test_feature_cache_is_bounded_in_bytes(tiny_model, no_tracebacks):
    with make_client(tiny_model, max_feature_bytes=1) as c:
        sid = upload(c, "disk.png", png(picture())).json()["id"]
        for _ in range(2):
            body = c.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"]}).json()
            assert body["encoded"] is True  # nothing fits the budget: encoded each time, never kept
        assert len(c.app.state.service.model.features) == 0


# ----------------------------------------------------------------------------- bad input: 4xx, one line, no traceback


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge grid (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    data = png(picture())
    return data[: len(data) // 2]


BAD_UPLOADS = [
    ("empty.png", b"", 422, "empty file"),
    ("truncated.png", truncated_png(), 422, "truncated.png"),
    ("text.png", b"hello, I am not a picture\n" * 10, 422, "not a readable image"),
    ("notes.txt", b"just some text", 415, "unsupported file type"),
    ("bomb.png", png_declaring(30000, 30000), 413, "pixels than the server's limit"),
    ("large.png", png_declaring(9000, 9000), 413, "81,000,000 pixels"),
    ("all_nan.tif", tiff(np.full((8, 8), np.nan, np.float32)), 422, "NaN"),
    ("broken.nii.gz", gzip.compress(b"\x00" * 100), 422, "broken.nii.gz"),
    ("garbage.nii.gz", b"\x1f\x8b not gzip at all", 422, "garbage.nii.gz"),
    ("broken.zip", b"PK\x03\x04 not a zip", 422, "zip"),
    ("nodicom.zip", b"", 422, "empty file"),
    ("plain.dcm", b"\x00" * 200, 422, "plain.dcm"),
    ("volume.mha", b"ObjectType = Image\nNDims = 3\n", 422, "volume.mha"),
]


def _zip_without_dicom() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "no images here")
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "data", "status", "fragment"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_are_4xx_with_one_line(client, no_tracebacks, name, data, status, fragment):
    if name == "nodicom.zip":
        data, status, fragment = _zip_without_dicom(), 422, "no DICOM files"
    before = set(client.app.state.service.sessions.root.iterdir())
    assert_error(upload(client, name, data), status, fragment)
    assert set(client.app.state.service.sessions.root.iterdir()) == before  # nothing left behind


def test_missing_file_field_and_oversized_uploads(tiny_model, no_tracebacks):
    with make_client(tiny_model, max_upload_bytes=64 * 1024, max_pixels=10_000) as c:
        assert_error(c.post("/api/sessions"), 422, "file")
        big = np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8)  # incompressible
        assert_error(upload(c, "big.png", png(big)), 413, "limit")
        boundary = "medsam3boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + png(big) * 10
            + f"\r\n--{boundary}--\r\n".encode()
        )

        def chunks():  # no Content-Length: the body is counted while it streams
            for start in range(0, len(body), 16384):
                yield body[start : start + 16384]

        streamed = c.post(
            "/api/sessions", content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert_error(streamed, 413, "limit")
        wide = upload(c, "wide.png", png(np.zeros((200, 200), np.uint8)))  # small file, too many pixels
        assert_error(wide, 413, "40,000 pixels")
        assert upload(c, "fine.png", png(picture())).status_code == 201


def test_bad_requests_are_4xx_with_one_line(client, no_tracebacks):
    sid = upload(client, "disk.png", png(picture())).json()["id"]
    segment = f"/api/sessions/{sid}/segment"
    cases = [
        ({"concepts": [""]}, 400, "concept 1 is empty"),
        ({"concepts": ["   "]}, 400, "empty"),
        ({"concepts": ["x" * 200]}, 400, "at most 80"),
        ({"concepts": []}, 400, "no concept"),
        ({"concepts": ["liver"] * 17}, 400, "at most 16"),
        ({"concepts": "liver"}, 422, "concepts"),
        ({"concepts": ["liver"], "boxes": [[1, 2, 3]]}, 422, "boxes"),
        ({"concepts": ["liver"], "boxes": [[30, 20, 10, 40]]}, 400, "x1 > x0"),
        ({"concepts": ["liver"], "boxes": [[500, 500, 600, 600]]}, 400, "outside"),
        ({"concepts": ["liver"], "boxes": [[0, 0, 5, 5]] * 17}, 400, "at most 16"),
        ({"concepts": ["liver"], "threshold": 2}, 422, "threshold"),
        ({"concepts": ["liver"], "window": "banana"}, 400, "banana"),
        ({"concepts": ["liver"], "slice": 2}, 400, "for volumes"),
        ({"concepts": ["liver"], "colour": "red"}, 422, "colour"),
    ]
    for body, status, fragment in cases:
        assert_error(client.post(segment, json=body), status, fragment)
    nan_box = '{"concepts": ["liver"], "boxes": [[NaN, 1, 5, 5]]}'
    assert_error(client.post(segment, content=nan_box, headers={"Content-Type": "application/json"}), 422, "finite")
    assert_error(client.post(segment, content="{not json", headers={"Content-Type": "application/json"}), 422)
    assert_error(client.post(f"/api/sessions/{sid}/jobs", json={"concepts": ["liver"]}), 400, "for volumes")
    huge = {"concepts": ["liver"], "boxes": [[1, 1, 2, 2]] * 300_000}  # a JSON body of megabytes
    assert_error(client.post(segment, json=huge), 413, "1 MB")
    for path in ("/api/sessions/nosuchsession", "/api/sessions/..%2F..%2Fetc", "/api/sessions/" + "a" * 300,
                 f"/api/sessions/{sid}/results/r999", "/api/jobs/nosuchjob", "/api/jobs/nosuchjob/mask"):  # fmt: skip
        assert_error(client.get(path), 404)
    assert_error(client.post("/api/sessions/nosuchsession/segment", json={"concepts": ["liver"]}), 404, "no session")
    assert_error(client.post("/api/jobs/nosuchjob/cancel"), 404, "no job")


def test_bad_volume_requests(client, tmp_path, no_tracebacks):
    sid = upload(client, "ct.nii.gz", nifti(tmp_path / "v.nii.gz", ct_volume()).read_bytes()).json()["id"]
    assert_error(client.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"]}), 400, "give 'slice'")
    assert_error(client.post(f"/api/sessions/{sid}/segment", json={"concepts": ["liver"], "slice": 6}), 400, "0..5")
    assert_error(client.get(f"/api/sessions/{sid}/image.png", params={"slice": -1}), 400, "out of range")
    jobs = f"/api/sessions/{sid}/jobs"
    assert_error(client.post(jobs, json={"concepts": ["liver"], "box": [1, 1, 5, 5]}), 400, "go together")
    assert_error(client.post(jobs, json={"concepts": ["liver"], "box": [1, 1, 5, 5], "box_slice": 9}), 400, "0..5")
    assert_error(
        client.post(jobs, json={"concepts": ["liver"], "box": [40, 40, 50, 50], "box_slice": 1}), 400, "outside"
    )
    assert_error(client.post(jobs, json={"concepts": ["liver"], "method": "magic"}), 422, "method")
    assert_error(client.post(jobs, json={"concepts": ["liver"], "axis": 3}), 422, "axis")


def test_bearer_token(tiny_model, no_tracebacks):
    with make_client(tiny_model, token="s3cret-token") as c:
        assert c.get("/api/health").json()["auth_required"] is True  # public: the page asks for a token
        assert c.get("/").status_code == 200
        missing = c.get("/api/info")
        assert_error(missing, 401, "bearer token")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(c.get("/api/info", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/api/info", headers={"Authorization": "Basic s3cret-token"}), 401)
        # refused before the body is read: an anonymous client cannot make the server parse an upload
        assert_error(upload(c, "disk.png", png(picture())), 401)
        good = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/api/info", headers=good).status_code == 200
        assert upload(c, "disk.png", png(picture()), headers=good).status_code == 201


def test_token_from_env_and_the_cli_command(monkeypatch):
    from medsam3 import cli
    from medsam3.errors import MedSAM3Error
    from medsam3.serve.settings import token_from_env

    monkeypatch.setenv("MEDSAM3_TEST_TOKEN", " abc ")
    assert token_from_env("MEDSAM3_TEST_TOKEN") == "abc" and token_from_env(None) is None
    monkeypatch.delenv("MEDSAM3_TEST_TOKEN")
    with pytest.raises(MedSAM3Error, match="MEDSAM3_TEST_TOKEN: the environment variable is not set"):
        token_from_env("MEDSAM3_TEST_TOKEN")
    seen = {}

    def fake_run_server(settings, **kwargs):
        seen.update(settings=settings, **kwargs)

    monkeypatch.setattr("medsam3.serve.run_server", fake_run_server)
    code = cli.main(["serve", "--model", "tiny", "--port", "8123", "--token-env", "X", "--max-upload-mb", "2"])
    assert code == 0
    assert seen["settings"].model == "tiny" and seen["settings"].max_upload_bytes == 2 * 1024 * 1024
    assert (seen["host"], seen["port"], seen["token_env"]) == ("127.0.0.1", 8123, "X")
    from medsam3.model.presets import DEFAULT_MODEL

    cli.main(["serve"])
    assert seen["settings"].model == DEFAULT_MODEL  # the default model is whatever the toolkit's default is


def test_json_responses_never_hold_nan(client):
    from medsam3.serve.results import finite

    assert finite({"a": [1.0, float("nan"), {"b": float("inf")}], "c": np.float32(0.5)}) == {
        "a": [1.0, None, {"b": None}],
        "c": 0.5,
    }
    json.dumps(finite({"x": float("nan")}), allow_nan=False)
