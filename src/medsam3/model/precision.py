"""Which dtype the frozen encoder towers run in: detected and measured on this machine, not assumed.

bf16 is a large win on CPUs with AMX or AVX-512-BF16 (measured 2-6x on matmul) and a large loss on
CPUs without them (an older machine ran it ~250x slower). ``auto`` therefore checks the CPU's flags
and then times a bf16 against an fp32 matmul once per (CPU, torch, threads), caching the verdict.
Only the frozen towers change dtype; everything that trains keeps fp32 weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from medsam3.utils.choices import ProcessDefault

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHOICES = ("auto", *DTYPES)
MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much on the measured matmul to be chosen


@dataclass(frozen=True)
class Precision:
    """The towers' dtype and why: recorded in result.json and shown by ``medsam3 info``."""

    dtype: str  # "fp32" or "bf16"
    requested: str
    reason: str
    runtime: str = "torch"  # what runs the image tower: "torch" or "openvino" (medsam3.model.runtime)
    runtime_reason: str = "the library default"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> dict:
        return asdict(self)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support(flags: set[str] | None = None) -> str:
    """'amx', 'avx512_bf16' or 'none': the best bf16 matrix instructions this CPU has."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "none"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 6) -> float:
    """Throughput of a square matmul in ``dtype`` on the CPU with the current thread count."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up (kernel selection)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def _cache_file() -> Path:
    return Path(os.environ.get("MEDSAM3_CACHE", Path.home() / ".cache" / "medsam3")) / "precision.json"


@lru_cache(maxsize=8)
def measured_bf16_speedup(threads: int) -> float:
    """bf16 / fp32 matmul throughput here, measured once per (CPU, torch, threads) and cached on disk."""
    key = hashlib.sha256(f"{_cpu_name()}|{torch.__version__}|{threads}".encode()).hexdigest()[:16]
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), dict) and "speedup" in cached[key]:
        return float(cached[key]["speedup"])
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    speedup = bf16 / fp32
    entry = {"cpu": _cpu_name(), "torch": torch.__version__, "threads": threads, "fp32_gflops": round(fp32, 1),
             "bf16_gflops": round(bf16, 1), "speedup": round(speedup, 3)}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**(cached if isinstance(cached, dict) else {}), key: entry}, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
    return speedup


TOWERS = ProcessDefault("--dtype", CHOICES, "fp32")  # the CLI sets it from --dtype; the library keeps fp32


def set_default_towers(choice: str) -> None:
    """Make ``choice`` (auto, fp32, bf16) what :func:`load_model` uses when not told otherwise."""
    TOWERS.set(choice)


def default_towers() -> str:
    return TOWERS.get()


def choose_precision(requested: str, device: torch.device, bf16_fidelity: str | None = None) -> Precision:
    """The towers' dtype for ``requested`` (auto, fp32, bf16) on ``device``.

    ``bf16_fidelity``: why this model's masks move too much with bf16 towers, when they do; ``auto``
    then keeps fp32 (the fast path must never silently change results).
    """
    TOWERS.check(requested)
    if requested != "auto":
        return Precision(requested, requested, "asked for")
    if bf16_fidelity:
        return Precision("fp32", "auto", bf16_fidelity)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto", "CUDA GPU with bf16 support")
        return Precision("fp32", "auto", "CUDA GPU without bf16 support")
    support = cpu_bf16_support()
    if support == "none":
        return Precision("fp32", "auto", "CPU without AMX or AVX-512-BF16")
    speedup = measured_bf16_speedup(torch.get_num_threads())
    if speedup >= MIN_SPEEDUP:
        return Precision("bf16", "auto", f"CPU has {support}; bf16 matmul measured {speedup:.1f}x fp32")
    return Precision("fp32", "auto", f"CPU has {support} but bf16 matmul measured only {speedup:.1f}x fp32")
