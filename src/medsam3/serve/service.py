"""What the API does, without HTTP: upload, segment an image or a slice, start a volume job, suggest.

Every method here is synchronous and runs on the server's bounded thread pool; ``deadline`` is the
request's time limit (time.monotonic) and bounds how long it may wait for the model.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, BinaryIO

from medsam3 import __version__
from medsam3.data.windowing import WINDOW_PRESETS, apply_window, gray_to_rgb, parse_window, to_uint8
from medsam3.errors import PromptError
from medsam3.infer.segment import build_prompts, normalize_prompts
from medsam3.infer.types import Prompt
from medsam3.model.loading import LoadedModel
from medsam3.serve.engine import SharedModel
from medsam3.serve.http_errors import ApiError, one_line
from medsam3.serve.jobs import JobManager
from medsam3.serve.results import finite, prompt_entry
from medsam3.serve.sessions import ImageResult, Session, SessionStore
from medsam3.serve.settings import ServeSettings
from medsam3.serve.uploads import FORMATS, decode_upload, remove_tree, store_upload

log = logging.getLogger("medsam3.serve")


class Service:
    """The model, the sessions and the jobs of one server."""

    def __init__(self, settings: ServeSettings, loaded: LoadedModel):
        self.settings = settings
        self.model = SharedModel(loaded, settings)
        self.sessions = SessionStore(settings, on_drop=self._session_dropped)
        self.jobs = JobManager(self.model, self.sessions, settings)
        self.jobs.start()
        self.started = time.time()
        self._closed = False
        self._close_lock = threading.Lock()

    def warm_up(self) -> None:
        """One encode and one prompt on a blank picture, so the first user request is not the slow one."""
        import numpy as np

        view = self.model.view("warm-up")
        view.set_image(np.full((64, 64, 3), 128, dtype=np.uint8))
        view.predict([(self.model.concepts or ["object"])[0]])
        self.model.forget("warm-up")

    def _session_dropped(self, session: Session) -> None:
        self.jobs.drop_session(session)
        self.model.forget(session.id)

    def close(self) -> None:
        """Stop the jobs and remove every temporary file (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.jobs.stop()
        self.sessions.close()
        self.model.features.clear()

    # -- about -------------------------------------------------------------------------------
    def health(self) -> dict:
        loaded = self.model.loaded
        return {
            "status": "ok",
            "version": __version__,
            "model": loaded.spec,
            "device": str(loaded.device),
            "auth_required": self.settings.token is not None,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def info(self) -> dict:
        loaded, s = self.model.loaded, self.settings
        return {
            **self.health(),
            "image_size": loaded.image_size,
            "concepts": self.model.concepts,
            "windows": {k: list(v) for k, v in WINDOW_PRESETS.items()},
            "formats": sorted(FORMATS),
            "limits": {
                "max_upload_bytes": s.max_upload_bytes,
                "max_pixels": s.max_pixels,
                "max_voxels": s.max_voxels,
                "max_concepts": s.max_concepts,
                "max_concept_chars": s.max_concept_chars,
                "max_boxes": s.max_boxes,
                "request_timeout_s": s.request_timeout_s,
                "job_timeout_s": s.job_timeout_s,
                "max_queued_jobs": s.max_queued_jobs,
                "max_sessions": s.max_sessions,
            },
            "thresholds": {"score": s.score_threshold, "mask": s.mask_threshold},
            "state": {
                "sessions": len(self.sessions),
                "session_bytes": self.sessions.nbytes,
                "session_evictions": self.sessions.evictions,
                "jobs": self.jobs.counts(),
                **self.model.stats(),
            },
        }

    def suggest(self, text: str, top_k: int = 5) -> dict:
        """The model's concepts and, for ``text``, the normaliser's nearest ones (best first)."""
        from medsam3.data.vocabulary import clean_phrase
        from medsam3.model.concepts import default_normalizer, normalizer_for

        concepts = self.model.concepts
        out: dict[str, Any] = {"vocabulary": concepts, "source": "model" if concepts else "bundled", "suggestions": []}
        text = " ".join((text or "").split())[: self.settings.max_concept_chars]
        if not text or not clean_phrase(text):
            return out
        normalizer = normalizer_for(concepts) if concepts else default_normalizer()
        candidates = normalizer.normalize(text, top_k=max(1, min(int(top_k), 10)))
        out["suggestions"] = [c.to_json() for c in candidates]
        out["known"] = text in normalizer
        return finite(out)

    # -- uploads -----------------------------------------------------------------------------
    def upload(self, stream: BinaryIO, filename: str | None, series_uid: str | None = None) -> dict:
        directory = self.sessions.new_directory()
        try:
            stored = store_upload(stream, filename, directory, self.settings)
            decoded = decode_upload(stored, filename, self.settings, series_uid=series_uid or None)
            session = self.sessions.add(decoded, directory)
        except BaseException:
            remove_tree(directory)
            raise
        return session.info()

    # -- 2D ----------------------------------------------------------------------------------
    def _concepts(self, concepts: list[str]) -> list[str]:
        s = self.settings
        if not concepts:
            raise PromptError("no concept given: name at least one, e.g. 'liver'")
        if len(concepts) > s.max_concepts:
            raise PromptError(f"{len(concepts)} concepts: at most {s.max_concepts} per request")
        out = []
        for number, text in enumerate(concepts, start=1):
            text = " ".join(str(text).split())
            if not text:
                raise PromptError(f"concept {number} is empty: give a phrase such as 'breast tumor'")
            if len(text) > s.max_concept_chars:
                raise PromptError(f"concept {number} is {len(text)} characters long: at most {s.max_concept_chars}")
            out.append(text)
        return out

    def _prompts(self, concepts, boxes=(), negative_boxes=(), normalize: bool = True):
        texts = self._concepts(concepts)
        if len(boxes) + len(negative_boxes) > self.settings.max_boxes:
            raise PromptError(f"{len(boxes) + len(negative_boxes)} boxes: at most {self.settings.max_boxes}")
        prompts, notes = build_prompts(texts, [tuple(b) for b in boxes], [tuple(b) for b in negative_boxes])
        records: list[dict] = []
        if normalize:
            prompts, records, renamed = normalize_prompts(prompts, self.model.concepts)
            notes = notes + renamed
        return prompts, notes, records

    def picture(self, session: Session, slice_index: int | None, axis: int, window: str | None):
        """(rgb the model sees, pixel spacing, slice) of an image session or one slice of a volume."""
        chosen = parse_window(window)
        if session.kind == "image":
            if slice_index is not None:
                raise PromptError("'slice' is for volumes; this session holds a 2D image")
            image = session.image
            rgb = image.rgb
            if chosen is not None and image.raw.ndim == 2:
                rgb = gray_to_rgb(to_uint8(apply_window(image.raw, *chosen)))
            return rgb, image.spacing, None
        from medsam3.data.volume_io import slice_rgb

        volume = session.volume
        if axis not in (0, 1, 2):
            raise PromptError(f"axis must be 0, 1 or 2, got {axis}")
        count = volume.shape[axis]
        if slice_index is None:
            slice_index = count // 2
        if not 0 <= slice_index < count:
            raise PromptError(f"slice {slice_index} is out of range: valid slices along axis {axis} are 0..{count - 1}")
        return slice_rgb(volume, slice_index, axis, chosen), volume.slice_spacing(axis), slice_index

    def segment(self, session_id: str, request, deadline: float) -> dict:
        session = self.sessions.get(session_id)
        session.check_open()
        if session.kind == "volume" and request.slice is None:
            raise PromptError("give 'slice' to segment one slice of a volume, or start a job for the whole volume")
        prompts, notes, records = self._prompts(
            request.concepts, request.boxes, request.negative_boxes, request.normalize
        )
        rgb, spacing, slice_index = self.picture(session, request.slice, request.axis, request.window)
        for prompt in prompts:
            prompt.check_inside(rgb.shape[0], rgb.shape[1])
        started = time.perf_counter()
        view = self.model.view(session.id, deadline=deadline)
        encoded = view.set_image(rgb)
        options = {}
        if request.threshold is not None:
            options["score_threshold"] = request.threshold
        if request.mask_threshold is not None:
            options["mask_threshold"] = request.mask_threshold
        results = view.predict(prompts, **options)
        seconds = time.perf_counter() - started
        rid = session.next_result_id()
        base = f"/api/sessions/{session.id}/results/{rid}"
        asked = [r.get("asked") for r in records] if records else [None] * len(results)
        body = finite(
            {
                "result": rid,
                "session": session.id,
                "slice": slice_index,
                "axis": request.axis if slice_index is not None else None,
                "image_size": [int(rgb.shape[0]), int(rgb.shape[1])],
                "model": self.model.loaded.spec,
                "encoded": encoded,
                "seconds": round(seconds, 4),
                "notes": notes,
                "normalization": records,
                "prompts": [
                    prompt_entry(k, r, base, spacing, a) for k, (r, a) in enumerate(zip(results, asked), start=1)
                ],
                "downloads": {
                    "labels": f"{base}/labels.png",
                    "overlay": f"{base}/overlay.png",
                    "dicom_seg": f"{base}/seg.dcm" if session.info().get("dicom_seg") else None,
                },
            }
        )
        with session.lock:
            session.check_open()
            session.add_result(
                ImageResult(rid, rgb, results, body, slice_index, request.axis), self.settings.results_per_session
            )
        self.sessions.grew(session)
        return body

    def dicom_seg_2d(self, session: Session, result: ImageResult) -> bytes:
        """A DICOM-SEG of a 2D result, referencing the uploaded DICOM image."""
        from medsam3.data.volume_io import Volume, write_dicom_seg
        from medsam3.serve.results import label_map_of, read_back

        if not session.info().get("dicom_seg"):
            raise ApiError(400, "DICOM-SEG is written for DICOM input only; download the PNG masks instead")
        labels = label_map_of(result.results)
        if not labels.any():
            raise ApiError(409, "nothing was found, and a DICOM-SEG cannot hold an empty segmentation")
        image = session.image
        like = Volume(
            array=image.raw[None],
            spacing=(1.0, *(image.spacing or (1.0, 1.0))),
            origin=(0.0, 0.0, 0.0),
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            path=image.path,
            source_files=(str(session.decoded.stored),),
        )
        names = {k: r.prompt.text for k, r in enumerate(result.results, start=1)}
        with session.lock:
            session.check_open()
            path = session.directory / f"seg-{result.id}.dcm"
            if not path.exists():
                write_dicom_seg(path, labels[None], like, names)
            return read_back(path)

    # -- volumes -----------------------------------------------------------------------------
    def submit_job(self, session_id: str, request) -> dict:
        session = self.sessions.get(session_id)
        session.check_open()
        if session.kind != "volume":
            raise PromptError("volume jobs are for volumes; segment a 2D image with POST .../segment")
        prompts, notes, records = self._prompts(request.concepts, normalize=request.normalize)
        volume = session.volume
        axis = request.axis
        parse_window(request.window)
        if (request.box is None) != (request.box_slice is None):
            raise PromptError("'box' and 'box_slice' go together: the box is drawn on that slice")
        keys = [(request.box_slice, request.box)] if request.box is not None else []
        keys += [(k.slice, k.box) for k in request.key_boxes]
        seeds = []
        count = volume.shape[axis]
        height, width = (n for a, n in enumerate(volume.shape) if a != axis)
        for index, drawn in keys:
            if not 0 <= index < count:
                raise PromptError(f"box slice {index} is out of range: valid slices are 0..{count - 1}")
            box = tuple(float(v) for v in drawn)
            Prompt(prompts[0].text, boxes=(box,)).check_inside(height, width)
            seeds.append((int(index), box))
        options = dict(axis=axis, method=request.method, seeds=seeds, window=request.window)
        if request.threshold is not None:
            options["score_threshold"] = request.threshold
        extra = {"method": request.method, "notes": notes, "normalization": records}
        job = self.jobs.submit(session, prompts, options, finite(extra))
        log.info("job %s queued: %s on %s", job.id, ", ".join(p.text for p in prompts), one_line(session.decoded.name))
        return job.info()
