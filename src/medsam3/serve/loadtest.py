"""A bounded load on a running server: N clients segmenting phantoms for T seconds.

Each client uploads its own phantom, then segments it again and again (a concept of the phantom,
half the time with its ground-truth box), uploads a fresh copy now and then (which exercises the
session and feature LRUs), and sends a bad request every so often (an empty concept, a corrupt
PNG, a box outside the image, an unknown session) that must come back 4xx. Reported: requests/s,
p50/p95 latency of the segment calls, status counts, and (from the caller) the server's peak RSS.
Needs ``httpx`` (the ``test`` extra).
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Payload:
    """One phantom to upload: PNG bytes, its concepts and a ground-truth box for each."""

    name: str
    png: bytes
    boxes: dict[str, list[float]]


def phantom_payloads(seed: int = 0) -> list[Payload]:
    """Ultrasound, CT, endoscopy and dermoscopy phantoms (128 px) as PNG uploads."""
    from PIL import Image

    from medsam3.data.phantoms import KINDS, generate
    from medsam3.data.windowing import apply_window, to_uint8

    out = []
    for kind in ("ultrasound", "ct", "endoscopy", "dermoscopy"):
        case = generate(kind, n=1, seed=seed)[0]
        image, label = case.image, case.label
        if image.ndim == 3 and image.shape[0] == 1:  # a CT slice stored as a 1-slice volume, in HU
            image, label = to_uint8(apply_window(image[0].astype(np.float32), 40, 400)), label[0]
        boxes = {}
        for concept, value in KINDS[kind].concepts.items():
            ys, xs = np.nonzero(label == value)
            if len(xs):
                boxes[concept] = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
        out.append(Payload(f"{kind}.png", buffer.getvalue(), boxes))
    return out


@dataclass
class LoadReport:
    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, segment calls that succeeded
    bad_statuses: Counter = field(default_factory=Counter)  # statuses of the deliberate bad requests
    failures: list[str] = field(default_factory=list)  # transport errors and unexpected statuses
    peak_rss_bytes: int | None = None

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.bad_statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in (self.statuses + self.bad_statuses).items() if s >= 500)

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None

    def table(self) -> str:
        """A Markdown table of the run."""
        p50, p95 = self.percentile(50), self.percentile(95)
        rss = "" if self.peak_rss_bytes is None else f"{self.peak_rss_bytes / 2**20:.0f}"
        rows = [
            ["clients", "seconds", "requests", "requests/s", "segment p50 ms", "segment p95 ms", "5xx",
             "4xx (bad input)", "peak RSS MiB"],
            [str(self.clients), f"{self.seconds:.1f}", str(self.requests), f"{self.requests / self.seconds:.1f}",
             "" if p50 is None else f"{p50 * 1000:.1f}", "" if p95 is None else f"{p95 * 1000:.1f}",
             str(self.server_errors), str(sum(n for s, n in self.bad_statuses.items() if 400 <= s < 500)), rss],
        ]  # fmt: skip
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        return "\n".join(lines)


def _bad_request(client, session_id: str, rng: random.Random):
    """One request that must be refused with a 4xx."""
    kind = rng.randrange(4)
    if kind == 0:
        return client.post(f"/api/sessions/{session_id}/segment", json={"concepts": ["  "]})
    if kind == 1:
        return client.post("/api/sessions", files={"file": ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")})
    if kind == 2:
        return client.post(
            f"/api/sessions/{session_id}/segment", json={"concepts": ["liver"], "boxes": [[500, 500, 600, 600]]}
        )
    return client.post("/api/sessions/nosuchsession/segment", json={"concepts": ["liver"]})


def run_load(
    base_url: str,
    *,
    clients: int = 4,
    seconds: float = 20.0,
    payloads: list[Payload] | None = None,
    token: str | None = None,
    max_requests: int = 100_000,
    reupload_every: int = 40,
    bad_every: int = 15,
    seed: int = 0,
    timeout: float = 60.0,
) -> LoadReport:
    """Drive ``clients`` threads against ``base_url`` for ``seconds`` (and at most ``max_requests``)."""
    import httpx

    payloads = payloads or phantom_payloads()
    report = LoadReport(clients=clients, seconds=seconds)
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stop_at = time.monotonic() + seconds
    sent = [0]

    def record(bucket: Counter, status: int, expect_ok: bool, what: str) -> None:
        with lock:
            bucket[status] += 1
            if (expect_ok and status >= 300) or (not expect_ok and not 400 <= status < 500):
                report.failures.append(f"{what}: HTTP {status}")

    def worker(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        payload = payloads[number % len(payloads)]
        concepts = list(payload.boxes)
        with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as client:
            session_id = None
            count = 0
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                count += 1
                try:
                    if session_id is None or count % reupload_every == 0:
                        response = client.post(
                            "/api/sessions", files={"file": (payload.name, payload.png, "image/png")}
                        )
                        record(report.statuses, response.status_code, True, "upload")
                        if response.status_code == 201:
                            session_id = response.json()["id"]
                        continue
                    if count % bad_every == 0:
                        response = _bad_request(client, session_id, rng)
                        record(report.bad_statuses, response.status_code, False, "bad request")
                        continue
                    concept = rng.choice(concepts)
                    body = {"concepts": [concept]}
                    if rng.random() < 0.5:
                        body["boxes"] = [payload.boxes[concept]]
                    started = time.perf_counter()
                    response = client.post(f"/api/sessions/{session_id}/segment", json=body)
                    elapsed = time.perf_counter() - started
                    if response.status_code == 404:  # evicted by other clients' uploads: upload again
                        record(report.statuses, 404, False, "segment after eviction")
                        session_id = None
                        continue
                    record(report.statuses, response.status_code, True, "segment")
                    if response.status_code == 200:
                        with lock:
                            report.latencies.append(elapsed)
                except httpx.HTTPError as error:
                    with lock:
                        report.failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout + 30)
    report.seconds = time.monotonic() - started
    return report
