"""The full record of one agent run: every message, action, timing and image sent.

An agent's answer is only as trustworthy as what it was shown, so the trace keeps the exact PNG bytes
sent to the LLM (after downscaling) next to a JSON log that refers to them by file name. Images
never go into the JSON as base64; the API key never goes anywhere.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsam3.utils.files import atomic_dir, write_json_atomic

_LABEL = re.compile(r"[^a-z0-9_-]+")


class Trace:
    """An append-only event log plus the images it refers to."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._t0 = clock()
        self.events: list[dict[str, Any]] = []
        self.images: dict[str, bytes] = {}

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def add_image(self, label: str, png: bytes) -> str:
        """Keep ``png`` under a numbered file name; returns its path relative to the trace folder."""
        clean = _LABEL.sub("_", label.lower()).strip("_") or "image"
        name = f"images/{len(self.images) + 1:03d}_{clean}.png"
        self.images[name] = png
        return name

    def log(self, kind: str, **data: Any) -> dict[str, Any]:
        """Append an event (``kind`` plus JSON-able fields) stamped with seconds since the start."""
        event = {"step": len(self.events) + 1, "t": round(self.elapsed(), 4), "kind": kind, **data}
        self.events.append(event)
        return event

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "images": sorted(self.images)}

    def write(self, folder: str | Path) -> Path:
        """Write ``folder``/trace.json and ``folder``/images/*.png; the folder appears whole or not at all."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            for name, png in self.images.items():
                path = tmp / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(png)
            write_json_atomic(tmp / "trace.json", self.to_json())
        return folder
