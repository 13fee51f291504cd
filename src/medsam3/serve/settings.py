"""What a ``medsam3 serve`` instance may use: the model, the limits, the token."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from medsam3.errors import MedSAM3Error
from medsam3.model.presets import DEFAULT_MODEL

MiB = 1024 * 1024


@dataclass
class ServeSettings:
    """Every limit of the server in one place (the defaults suit one workstation).

    Memory is bounded twice: decoded uploads and their results (``max_session_bytes``, at most
    ``max_sessions`` of them) and cached vision features (``max_feature_bytes``); both are evicted
    least recently used first, and an evicted session's temporary files are removed at once.
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    adapter: str | None = None
    token: str | None = field(default=None, repr=False)
    """Bearer token every /api call except /api/health must carry; ``None``: no token needed."""
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_upload_bytes: int = 256 * MiB
    max_unzipped_bytes: int = 1024 * MiB
    max_zip_members: int = 4096
    max_pixels: int = 40_000_000  # one 2D image
    max_voxels: int = 150_000_000  # one volume (float32: 600 MB)
    max_sessions: int = 32
    max_session_bytes: int = 2048 * MiB
    max_feature_bytes: int = 1024 * MiB
    results_per_session: int = 8
    request_timeout_s: float = 60.0
    job_timeout_s: float = 1800.0
    max_queued_jobs: int = 4
    max_finished_jobs: int = 64
    workers: int = 4
    """Threads serving requests (decoding, encoding PNGs); model calls are serialised by one lock."""
    max_concepts: int = 16
    max_concept_chars: int = 80
    max_boxes: int = 16
    warm_up: bool = True
    """Run the model once at start-up (the first real request would otherwise pay torch's warm-up)."""
    workdir: Path | None = None
    """Where uploads are stored while their session lives (default: a fresh temporary folder)."""

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_sessions", "max_session_bytes", "workers", "max_queued_jobs"):
            if int(getattr(self, name)) < 1:
                raise MedSAM3Error(f"serve: {name} must be at least 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.job_timeout_s <= 0:
            raise MedSAM3Error("serve: time limits must be positive")
        if self.token is not None and not self.token.strip():
            raise MedSAM3Error("serve: the bearer token is empty")


def token_from_env(variable: str | None) -> str | None:
    """The token held by environment variable ``variable`` (None: no token); unset or empty is an error."""
    if variable is None:
        return None
    value = os.environ.get(variable, "")
    if not value.strip():
        raise MedSAM3Error(f"--token-env {variable}: the environment variable is not set or empty")
    return value.strip()
