"""Where the frozen image tower runs: PyTorch eager, or OpenVINO on CPUs.

The frozen image tower is most of the compute for every image, and PyTorch eager leaves much of a
CPU unused on it. Measured on a 2-core AMD EPYC (avx512_bf16, no AMX), LiteMedSAM's TinyViT per
256 px image: eager fp32 1.7 s, channels-last 1.35 s, torch.compile 0.86 s, ONNX Runtime 0.81 s,
OpenVINO fp32 0.56-0.70 s, OpenVINO bf16 0.31-0.40 s (``benchmarks/bench_cpu.py`` prints the
table). So ``auto`` runs a backbone's exportable tower with OpenVINO on CPU when it is installed.

The tower is traced once (a few seconds) and the converted model is kept on disk, keyed by the
tower's weights, its input shape and the library versions, so later processes only compile it
(under a second). OpenVINO only runs calls without gradients, and only the weights it was converted from: once a
tower trains (LoRA, full fine-tuning), PyTorch runs it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsam3.errors import ModelSpecError
from medsam3.model.tower_memo import weights_signature
from medsam3.utils.choices import ProcessDefault

CHOICES = ("auto", "torch", "openvino")
ENGINE = ProcessDefault("--runtime", CHOICES, "torch")  # the library's default; the CLI's --runtime is auto


@dataclass(frozen=True)
class RuntimeChoice:
    name: str  # "torch" or "openvino"
    reason: str


def set_default_runtime(choice: str) -> None:
    """Make ``choice`` (auto, torch, openvino) what :func:`load_model` uses when not told otherwise."""
    ENGINE.set(choice)


def default_runtime() -> str:
    return ENGINE.get()


def openvino_version() -> str | None:
    """The installed OpenVINO's version (read from its metadata: importing it costs a second)."""
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def choose_runtime(requested: str, device: torch.device, exportable: bool) -> RuntimeChoice:
    """The image tower's runtime for ``requested`` on ``device`` (``exportable``: the backbone has one)."""
    ENGINE.check(requested)
    if requested == "torch":
        return RuntimeChoice("torch", "asked for")
    problem = None
    if device.type != "cpu":
        problem = f"the model runs on {device.type}"
    elif not exportable:
        problem = "this backbone's image tower is not exported"
    elif openvino_version() is None:
        problem = "openvino is not installed"
    if problem is None:
        return RuntimeChoice(
            "openvino", ("asked for" if requested == "openvino" else "CPU") + f", OpenVINO {openvino_version()}"
        )
    if requested == "openvino":
        raise ModelSpecError(f"--runtime openvino: {problem}")
    return RuntimeChoice("torch", problem)


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDSAM3_CACHE", Path.home() / ".cache" / "medsam3")) / "openvino"


def tower_key(module: nn.Module, shape: tuple[int, ...]) -> str:
    """What a converted tower depends on: its class, fp32 weights, input shape and the libraries."""
    digest = hashlib.sha256()
    digest.update(f"{type(module).__qualname__}|{shape}|{torch.__version__}|{openvino_version()}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def _converted(module: nn.Module, shape: tuple[int, ...]):
    """The tower as an OpenVINO model for inputs of ``shape``: from the disk cache, else traced now."""
    import openvino as ov

    core = ov.Core()
    fp32 = module if next(module.parameters()).dtype == torch.float32 else copy.deepcopy(module).float()
    folder = _cache_dir() / tower_key(fp32, shape)
    if (folder / "tower.xml").is_file():
        try:
            return core.read_model(str(folder / "tower.xml"))
        except RuntimeError:
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache entry: convert again
    example = torch.zeros(shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's warnings about shape arithmetic
        traced = torch.jit.trace(fp32.eval(), example, check_trace=False)
        converted = ov.convert_model(traced, example_input=example, input=[shape])
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tower-", dir=folder.parent))
    except OSError:
        return converted  # an unwritable cache only costs a conversion next time
    try:
        ov.save_model(converted, str(staging / "tower.xml"), compress_to_fp16=False)
        os.replace(staging, folder)  # all or nothing; another process may have won the race
    except (OSError, RuntimeError):
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return converted


class OpenVinoTower:
    """A frozen image tower run by OpenVINO: ``tower(pixels)`` equals ``module(pixels)`` within dtype tolerance.

    The converted model takes one image at a time (measured within 7% of batch 8 per image), so any
    batch size works without a conversion per size. ``dtype`` is the compute precision (fp32 or bf16).
    """

    def __init__(self, module: nn.Module, dtype: str):
        self.module = module
        self.dtype = dtype
        self._compiled: dict[tuple[int, ...], object] = {}
        self._signature = self._weights_signature()

    def _weights_signature(self) -> tuple:
        # In-place weight changes (load_state_dict, an adapter) bump a tensor's version counter.
        return weights_signature(self.module.parameters())

    def usable(self) -> bool:
        """False once the tower's weights changed since conversion (training it): PyTorch runs it then."""
        if self._signature is not None and self._weights_signature() != self._signature:
            self._signature = None  # stale for good: reconverting every validation pass would cost more
            self._compiled.clear()
        return self._signature is not None

    def _model_for(self, shape: tuple[int, ...]):
        if shape not in self._compiled:
            import openvino as ov

            config = {
                "INFERENCE_PRECISION_HINT": "bf16" if self.dtype == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
                "PERFORMANCE_HINT": "LATENCY",
            }
            self._compiled[shape] = ov.Core().compile_model(_converted(self.module, shape), "CPU", config)
        return self._compiled[shape]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        one = (1, *pixels.shape[1:])
        request = self._model_for(one).create_infer_request()  # one request per call: thread-safe
        images = pixels.detach().to("cpu", torch.float32).numpy()
        outputs = [np.array(request.infer({0: images[k : k + 1]})[0]) for k in range(len(images))]
        out_dtype = next(self.module.parameters()).dtype
        return torch.from_numpy(np.concatenate(outputs)).to(pixels.device, out_dtype)
