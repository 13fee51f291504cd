"""Helpers every benchmark shares: machine description, wall timers, peak memory, Markdown tables."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import psutil
import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the maximum seen (GiB)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def use_command_defaults() -> None:
    """Run the frozen towers as the ``medsam3`` command does (``--runtime auto --dtype auto``).

    The library keeps PyTorch and fp32 unless told; a benchmark that calls the library to measure what
    ``medsam3 train`` does must ask for the command's defaults, or it times the slower eager tower
    (lite on an AVX2 CPU: 2.2 s an image in batches of 8 against 0.65 s on OpenVINO).
    """
    from medsam3.model.precision import set_default_towers
    from medsam3.model.runtime import set_default_runtime

    set_default_runtime("auto")
    set_default_towers("auto")


@contextmanager
def timer(store: dict, key: str):
    start = time.perf_counter()
    yield
    store[key] = time.perf_counter() - start


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls (seconds): the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out, rows: list[dict], table: str) -> None:
    """A benchmark's rows (results.json) and its table (results.md, also printed)."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(table + "\n")
    print(table)
