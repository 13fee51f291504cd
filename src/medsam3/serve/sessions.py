"""Uploaded images and volumes kept for later prompts: one session each, evicted least recently used.

A session owns a private temporary folder (the stored upload, unpacked DICOM files, masks written
for download); the folder is removed the moment the session is evicted, deleted, or the server
stops. Results of 2D prompts and volume jobs live in the session and count against its memory.
"""

from __future__ import annotations

import itertools
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.infer.types import PromptResult
from medsam3.serve.http_errors import ApiError, not_found
from medsam3.serve.lru import ByteLRU
from medsam3.serve.settings import ServeSettings
from medsam3.serve.uploads import Decoded

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_id() -> str:
    return secrets.token_urlsafe(12)


def valid_id(ident: str) -> bool:
    return bool(_ID.match(ident or ""))


@dataclass
class ImageResult:
    """The answer to one 2D segment request (an image, or one slice of a volume)."""

    id: str
    rgb: np.ndarray  # what the model saw
    results: list[PromptResult]
    body: dict[str, Any]  # the JSON response
    slice: int | None = None
    axis: int = 0

    @property
    def nbytes(self) -> int:
        own = 0 if self.slice is None else self.rgb.nbytes  # an image session shares its rgb
        return int(own + sum(r.masks.nbytes + r.boxes.nbytes + r.scores.nbytes for r in self.results))


@dataclass
class Session:
    """One upload: decoded pixels, where they came from, and what was asked of them."""

    id: str
    decoded: Decoded
    directory: Path
    created: float = field(default_factory=time.time)
    results: OrderedDict[str, ImageResult] = field(default_factory=OrderedDict)
    jobs: OrderedDict[str, Any] = field(default_factory=OrderedDict)  # job id -> jobs.Job
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    closed: bool = False
    _numbers: Any = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def kind(self) -> str:
        return self.decoded.kind

    @property
    def image(self):
        return self.decoded.image

    @property
    def volume(self):
        return self.decoded.volume

    @property
    def nbytes(self) -> int:
        with self.lock:
            return int(
                self.decoded.nbytes
                + sum(r.nbytes for r in self.results.values())
                + sum(j.nbytes for j in self.jobs.values())
            )

    def next_result_id(self) -> str:
        return f"r{next(self._numbers)}"

    def add_result(self, result: ImageResult, keep: int) -> None:
        with self.lock:
            self.results[result.id] = result
            while len(self.results) > keep:
                self.results.popitem(last=False)

    def result(self, ident: str) -> ImageResult:
        with self.lock:
            found = self.results.get(ident)
        if found is None:
            raise not_found("result", ident)
        return found

    def info(self) -> dict[str, Any]:
        d = self.decoded
        out: dict[str, Any] = {
            "id": self.id,
            "kind": d.kind,
            "name": d.name,
            "format": d.fmt,
            "notes": d.notes,
            "image_url": f"/api/sessions/{self.id}/image.png",
        }
        if d.image is not None:
            image = d.image
            out.update(
                width=image.width,
                height=image.height,
                channels=1 if image.raw.ndim == 2 else int(image.raw.shape[-1]),
                spacing=None if image.spacing is None else list(image.spacing),
                modality=image.modality,
                window=None if image.window is None else list(image.window),
                is_ct=(image.modality or "").upper() == "CT",
                dicom_seg=d.fmt == "dicom" and image.raw.ndim == 2,
            )
        else:
            volume = d.volume
            out.update(
                shape=list(volume.shape),
                slices=volume.shape[0],
                height=volume.shape[1],
                width=volume.shape[2],
                spacing=list(volume.spacing),
                modality=volume.modality,
                is_ct=bool(volume.is_ct),
                dicom_seg=bool(volume.source_files),
            )
        return out

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.results.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def check_open(self) -> None:
        if self.closed:
            raise not_found("session", self.id)


class SessionStore:
    """Sessions by id, least recently used evicted past ``max_sessions`` or ``max_session_bytes``."""

    def __init__(self, settings: ServeSettings, on_drop: Callable[[Session], None] | None = None):
        self.settings = settings
        base = settings.workdir
        if base is not None:
            Path(base).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="medsam3-serve-", dir=base))
        self._on_drop = on_drop
        self._lru = ByteLRU(settings.max_session_bytes, settings.max_sessions, on_evict=self._dropped)

    def new_directory(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="s-", dir=self.root))

    def add(self, decoded: Decoded, directory: Path) -> Session:
        session = Session(id=new_id(), decoded=decoded, directory=directory)
        if not self._lru.put(session.id, session, session.nbytes):
            session.close()
            raise ApiError(413, f"{decoded.name}: too large for the server's memory budget")
        return session

    def get(self, ident: str) -> Session:
        session = self._lru.get(ident) if valid_id(ident) else None
        if session is None:
            raise not_found("session", ident)
        return session

    def grew(self, session: Session) -> None:
        """Account for results added to ``session`` (may evict other sessions, never this one)."""
        self._lru.resize(session.id, session.nbytes)

    def delete(self, ident: str) -> None:
        if not valid_id(ident) or self._lru.pop(ident) is None:
            raise not_found("session", ident)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def close(self) -> None:
        self._lru.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _dropped(self, _key, session: Session) -> None:
        if self._on_drop is not None:
            self._on_drop(session)
        session.close()
