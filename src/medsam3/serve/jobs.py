"""Volume segmentations as background jobs: a bounded queue, one worker, progress and cancel.

A whole-volume run can take minutes with a large model, longer than any request should. So it is
a job: queued (at most ``max_queued_jobs`` waiting; more is a 429), run by one worker thread
through :func:`medsam3.infer.volume.segment_volume` on a :class:`~medsam3.serve.engine.ModelView`
(which takes the model lock per slice, so 2D requests keep being answered meanwhile), polled for
progress, cancelled between two slices, and bounded by ``job_timeout_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsam3.data.volume_io import write_dicom_seg, write_mask
from medsam3.errors import MedSAM3Error
from medsam3.infer.types import Prompt
from medsam3.infer.volume import VolumeSegmentation, segment_volume
from medsam3.serve.engine import SharedModel, Stopped
from medsam3.serve.http_errors import ApiError, not_found, one_line
from medsam3.serve.results import finite, png_bytes, read_back
from medsam3.serve.sessions import Session, SessionStore, new_id, valid_id
from medsam3.serve.settings import ServeSettings

log = logging.getLogger("medsam3.serve")

#: ``format`` query value -> file ending of the label map download.
MASK_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
FINAL = ("done", "failed", "cancelled")


@dataclass
class Job:
    """One volume segmentation request and what became of it."""

    id: str
    session: Session
    prompts: list[Prompt]
    options: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # normalisation records, notes
    status: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: VolumeSegmentation | None = None
    legend: dict | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return 0 if self.result is None else int(self.result.label_map.nbytes)

    def info(self) -> dict:
        base = f"/api/jobs/{self.id}"
        out = {
            "id": self.id,
            "session": self.session.id,
            "status": self.status,
            "progress": {"done": self.done, "total": self.total},
            "error": self.error,
            "created": self.created,
            "seconds": None if self.started is None else round((self.finished or time.time()) - self.started, 3),
            "prompts": [p.text for p in self.prompts],
            **self.extra,
        }
        if self.status == "done":
            out["result"] = self.legend
            out["downloads"] = {
                "nifti": f"{base}/mask?format=nifti",
                "nrrd": f"{base}/mask?format=nrrd",
                "mha": f"{base}/mask?format=mha",
                "dicom_seg": f"{base}/seg.dcm" if self.session.volume.source_files else None,
                "labels": f"{base}/labels/{{index}}.png",
            }
        return finite(out)


class JobManager:
    """Queue, worker and registry of volume jobs."""

    def __init__(self, shared: SharedModel, sessions: SessionStore, settings: ServeSettings):
        self.shared = shared
        self.sessions = sessions
        self.settings = settings
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=settings.max_queued_jobs)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="medsam3-serve-jobs", daemon=True)
        self._stopping = False
        self.completed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job and wait for the worker to finish the slice it is on."""
        self._stopping = True
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        while True:  # empty the queue so the sentinel fits
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- requests ----------------------------------------------------------------------------
    def submit(self, session: Session, prompts: list[Prompt], options: dict, extra: dict) -> Job:
        if self._stopping:
            raise ApiError(503, "the server is shutting down")
        job = Job(id=new_id(), session=session, prompts=prompts, options=options, extra=extra)
        job.total = session.volume.shape[options.get("axis", 0)]
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise ApiError(
                    429,
                    f"{self.settings.max_queued_jobs} volume jobs are already waiting; try again when one is done",
                    headers={"Retry-After": "10"},
                ) from None
            self._jobs[job.id] = job
        with session.lock:
            session.jobs[job.id] = job
        return job

    def get(self, ident: str) -> Job:
        job = self._jobs.get(ident) if valid_id(ident) else None
        if job is None:
            raise not_found("job", ident)
        return job

    def cancel(self, ident: str) -> Job:
        job = self.get(ident)
        job.cancel.set()
        if job.status == "queued":
            self._finish(job, "cancelled", None)
        return job

    def drop_session(self, session: Session) -> None:
        """An evicted or deleted session takes its jobs with it."""
        with session.lock:
            jobs = list(session.jobs.values())
            session.jobs.clear()
        with self._lock:
            for job in jobs:
                job.cancel.set()
                self._jobs.pop(job.id, None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            statuses = [j.status for j in self._jobs.values()]
        return {s: statuses.count(s) for s in ("queued", "running", "done", "failed", "cancelled")}

    # -- the worker --------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set() or job.session.closed:
                if job.status == "queued":
                    self._finish(job, "cancelled", None)
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        session, volume = job.session, job.session.volume
        job.status, job.started = "running", time.time()
        deadline = time.monotonic() + self.settings.job_timeout_s

        def stop() -> str | None:
            if job.cancel.is_set() or session.closed:
                return "cancelled"
            if time.monotonic() > deadline:
                return f"ran past the server's job time limit of {self.settings.job_timeout_s:g} s"
            return None

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        view = self.shared.view(session.id, stop=stop)
        try:
            seg = segment_volume(volume, job.prompts, view, progress=progress, **job.options)
        except Stopped as stopped:
            self._finish(job, "cancelled" if stopped.reason == "cancelled" else "failed",
                         None if stopped.reason == "cancelled" else stopped.reason)  # fmt: skip
            return
        except MedSAM3Error as error:
            self._finish(job, "failed", one_line(error))
            return
        except Exception as error:  # a bug: keep the traceback in the log, tell the client one line
            log.exception("volume job %s failed", job.id)
            self._finish(job, "failed", f"internal error ({type(error).__name__})")
            return
        job.result = seg
        job.legend = seg.to_json(volume)
        job.done = job.total
        self._finish(job, "done", None)
        try:
            self.sessions.grew(session)
        except MedSAM3Error:
            pass

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        self.completed += 1
        with self._lock:
            finished = [j for j in self._jobs.values() if j.status in FINAL]
            for old in finished[: max(0, len(finished) - self.settings.max_finished_jobs)]:
                self._jobs.pop(old.id, None)
                with old.session.lock:
                    old.session.jobs.pop(old.id, None)

    # -- downloads ---------------------------------------------------------------------------
    def finished_result(self, ident: str) -> Job:
        job = self.get(ident)
        if job.status != "done":
            raise ApiError(409, f"job {job.id} is {job.status}: its mask is ready when the status is 'done'")
        job.session.check_open()
        return job

    def mask_file(self, ident: str, fmt: str) -> tuple[bytes, str]:
        """The label map in the input's geometry, as NIfTI, NRRD or MHA bytes, with a file name."""
        if fmt not in MASK_FORMATS:
            raise ApiError(400, f"unknown mask format '{one_line(fmt, 40)}': use " + ", ".join(MASK_FORMATS))
        job = self.finished_result(ident)
        ending = MASK_FORMATS[fmt]
        return self._written(job, fmt, ending, lambda p: write_mask(p, job.result.label_map, job.session.volume))

    def dicom_seg(self, ident: str) -> tuple[bytes, str]:
        job = self.finished_result(ident)
        volume = job.session.volume
        if not volume.source_files:
            raise ApiError(400, "DICOM-SEG is written for DICOM input only; download the NIfTI mask instead")
        if not job.result.label_map.any():
            raise ApiError(409, "nothing was found, and a DICOM-SEG cannot hold an empty segmentation")
        legend = dict(job.result.legend)
        return self._written(job, "seg", ".dcm", lambda p: write_dicom_seg(p, job.result.label_map, volume, legend))

    def _written(self, job: Job, key: str, ending: str, write) -> tuple[bytes, str]:
        session = job.session
        with session.lock:
            session.check_open()
            path = job.files.get(key)
            if path is None or not path.exists():
                path = session.directory / f"job-{len(job.files)}-{key}{ending}"
                write(path)
                job.files[key] = path
            data = read_back(path)
        return data, f"medsam3_{job.id}{ending}"

    def label_slice(self, ident: str, index: int) -> bytes:
        job = self.finished_result(ident)
        labels = job.result.label_map
        if not 0 <= index < labels.shape[0]:
            raise ApiError(404, f"no slice {index}: valid slices are 0..{labels.shape[0] - 1}")
        return png_bytes(labels[index])
