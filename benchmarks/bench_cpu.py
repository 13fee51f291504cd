"""CPU fast path: OpenVINO, bf16 and channels-last against the plain fp32 PyTorch path, in one run.

    python benchmarks/bench_cpu.py [--skip-sam3] [--skip-compile] [--only GROUP] [--slices 200] [--threads 2]

Rows (each with its ratio against the plain fp32 PyTorch eager reference measured in the same run):
- lite's image encoder (LiteMedSAM TinyViT), per 256 px image, batch 8: fp32 eager (reference),
  channels-last, bf16, torch.compile (fp32, bf16), ONNX Runtime (when installed), OpenVINO (fp32,
  bf16) through medsam3's own runtime (medsam3.model.runtime), with each variant's relative error.
- A 200-slice 512 x 512 volume with lite, one concept: torch fp32 vs OpenVINO fp32 (what auto picks
  for lite) vs OpenVINO bf16, plus the label maps' Dice against the reference.
- One fine-tuning epoch of lite (paper policy): no cache on torch, no cache on OpenVINO, feature
  cache, feature cache with bf16 autocast for the trained parts' forward (fp32 master weights).
- SAM 3 architecture (840 M parameters, random weights: compute does not depend on values), one
  1008 px image, 5 concepts through the predictor: fp32 towers vs bf16 towers.
Prints the machine, its CPU's bf16 support and the measured matmul speed-up first.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import run as training_epochs  # noqa: E402
from common import PeakRSS, best_of, machine, markdown_table  # noqa: E402

from medsam3.infer.predictor import Sam3Predictor  # noqa: E402
from medsam3.model import load_model  # noqa: E402
from medsam3.model.precision import choose_precision, cpu_bf16_support, matmul_gflops  # noqa: E402
from medsam3.model.runtime import OpenVinoTower  # noqa: E402

CONCEPTS = ["liver", "kidney", "spleen", "liver tumor", "pancreas"]
HEADERS = ["benchmark", "variant", "time", "vs plain fp32", "peak RSS GiB / note"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def lite_encoder_rows(rows: list, compile_too: bool) -> None:
    trunk = load_model("lite-init", device="cpu").model.vision_encoder.trunk.eval()
    batch = torch.rand(8, 3, 256, 256)
    label = "lite encoder, 256 px, per image (batch 8)"
    with torch.no_grad():
        expected = trunk(batch)
    reference: list[float] = []

    def add(name: str, fn, x: torch.Tensor, note: str = "") -> None:
        with torch.no_grad():
            fn(x)  # warm-up (and conversion / compilation)
            seconds = best_of(lambda: fn(x), 2) / len(batch)
            error = _rel(fn(x), expected)
        reference.append(reference[0] if reference else seconds)
        rows.append([label, name, f"{seconds:.3f} s", f"{reference[0] / seconds:.2f}x",
                     f"rel. error {error:.1e}" + (f"; {note}" if note else "")])  # fmt: skip

    add("fp32 eager (reference)", trunk, batch)
    layout = copy.deepcopy(trunk).to(memory_format=torch.channels_last)
    add("fp32 channels-last", layout, batch.contiguous(memory_format=torch.channels_last))
    add("bf16 eager", copy.deepcopy(trunk).bfloat16(), batch.bfloat16())  # copies: trunk keeps fp32 weights
    if compile_too:
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            compiled = torch.compile(copy.deepcopy(trunk).to(dtype))
            started = time.perf_counter()
            with torch.no_grad():
                compiled(batch.to(dtype))
            add(f"torch.compile {name}", compiled, batch.to(dtype), f"compiling {time.perf_counter() - started:.0f} s")
            torch._dynamo.reset()
    try:
        import onnxruntime
    except ImportError:
        rows.append([label, "ONNX Runtime", "not installed", "", "pip install onnx onnxruntime to measure"])
    else:
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(trunk, (batch,), buffer, dynamo=False, input_names=["x"], opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        add("ONNX Runtime fp32", lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), batch)
    with tempfile.TemporaryDirectory() as cache:
        import os

        os.environ["MEDSAM3_CACHE"] = cache  # measure the conversion too, not an earlier run's
        for name in ("fp32", "bf16"):
            tower = OpenVinoTower(trunk, name)
            started = time.perf_counter()
            tower(batch[:1])
            first = time.perf_counter() - started
            note = f"first call {first:.1f} s (conversion, then cached on disk)"
            add(f"OpenVINO {name} (medsam3 runtime)", tower, batch, note)
        del os.environ["MEDSAM3_CACHE"]


def volume_rows(rows: list, slices: int) -> None:
    from medsam3.data.volume_io import Volume
    from medsam3.infer.volume import segment_volume

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    array = rng.normal(40, 10, (slices, 512, 512)).astype(np.float32)
    array[:, (yy - 256) ** 2 + (xx - 230) ** 2 < 90**2] = 160  # a bright organ-like column
    volume = Volume(array=array, spacing=(2.0, 0.8, 0.8), origin=(0.0, 0.0, 0.0),
                    direction=tuple(np.eye(3).ravel()), path=Path("synthetic.nii.gz"), modality="CT")  # fmt: skip
    label = f"lite, {slices} slices of 512 x 512, 1 concept"
    results, times = {}, {}
    for name, towers, runtime in (("torch fp32 (reference)", "fp32", "torch"),
                                  ("OpenVINO fp32 (auto for lite)", "fp32", "openvino"),
                                  ("OpenVINO bf16", "bf16", "openvino")):  # fmt: skip
        loaded = load_model("lite", device="cpu", towers=towers, runtime=runtime)
        predictor = Sam3Predictor(loaded)
        started = time.perf_counter()
        with PeakRSS() as rss:
            results[name] = segment_volume(volume, ["liver"], predictor, batch_slices=8).label_map > 0
        times[name] = time.perf_counter() - started
        first = next(iter(times.values()))
        dice = _dice(results[name], next(iter(results.values())))
        rows.append([label, name, f"{times[name]:.1f} s", f"{first / times[name]:.2f}x",
                     f"{rss.gib:.1f}; label-map Dice vs reference {dice:.4f}"])  # fmt: skip


def training_rows(rows: list, samples: int) -> None:
    label = f"lite fine-tuning epoch, {samples} images of 256 px, batch 4, paper policy"

    def epochs(cache: bool, runtime: str, autocast: bool = False) -> dict:
        return training_epochs("lite-init", samples, 256, 4, cache=cache, runtime=runtime, autocast=autocast)

    plain = epochs(False, "torch")
    for name, result in (("no cache, torch (reference)", plain), ("no cache, OpenVINO", epochs(False, "openvino")),
                         ("feature cache (epoch 2)", epochs(True, "torch")),
                         ("feature cache (epoch 2), bf16 autocast", epochs(True, "torch", autocast=True))):  # fmt: skip
        rows.append([label, name, f"{result['second']:.1f} s", f"{plain['second'] / result['second']:.2f}x",
                     f"{result['rss']:.1f}; epoch 1 {result['first']:.1f} s"])  # fmt: skip


def sam3_rows(rows: list) -> None:
    image = (np.random.default_rng(0).random((1008, 1008)) * 255).astype(np.uint8)
    times = {}
    for towers in ("fp32", "bf16"):
        loaded = load_model("sam3-random", device="cpu", towers=towers)
        predictor = Sam3Predictor(loaded, score_threshold=0.0)

        def run(predictor=predictor):
            predictor.set_image(image)
            predictor.predict(CONCEPTS)

        with PeakRSS() as rss:
            times[towers] = best_of(run, 1)
        rows.append(["SAM 3 (random), 1008 px, 5 concepts", f"towers {towers}", f"{times[towers]:.1f} s",
                     f"{times['fp32'] / times[towers]:.2f}x", f"{rss.gib:.1f}"])  # fmt: skip
        del loaded, predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--train-samples", type=int, default=16)
    parser.add_argument("--skip-sam3", action="store_true", help="leave out the 840 M-parameter rows (~3 min)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (~2 min compiling)")
    parser.add_argument("--only", action="append", choices=["encoder", "volume", "training", "sam3"],
                        help="run only these groups of rows (repeatable)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(machine())
    print(f"CPU bf16 support: {cpu_bf16_support()}; 1024^2 matmul fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s "
          f"({bf16 / fp32:.1f}x); auto chooses {choose_precision('auto', torch.device('cpu')).dtype} for SAM 3 towers, "
          "fp32 on OpenVINO for lite", flush=True)  # fmt: skip
    rows: list = []
    steps = {"encoder": lambda: lite_encoder_rows(rows, not args.skip_compile),
             "volume": lambda: volume_rows(rows, args.slices),
             "training": lambda: training_rows(rows, args.train_samples),
             "sam3": lambda: sam3_rows(rows)}  # fmt: skip
    if args.skip_sam3:
        del steps["sam3"]
    for name, step in steps.items():
        if args.only and name not in args.only:
            continue
        step()
        print(rows[-1], flush=True)  # progress: the table comes at the end
    print(markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
