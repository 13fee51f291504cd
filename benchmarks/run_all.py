"""Every benchmark in one command, one Markdown table, with machine information.

    python benchmarks/run_all.py                    # nano and the full SAM 3 architecture (random weights)
    python benchmarks/run_all.py --model nano-init  # quick

Each line compares medsam3's path with the plain reference path measured in the same run:
- predictor: K prompts through ``Sam3Predictor`` (one encode) vs K plain transformers forwards;
- training: an epoch after the first with the frozen-feature cache vs without it;
- volume: a whole volume through the streamed volume path vs the 2D path called per slice; peak
  memory of volumes of growing length (it must stay flat: at most two slices' features alive).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_predictor  # noqa: E402
import bench_training  # noqa: E402
import bench_volume  # noqa: E402
from common import machine, markdown_table  # noqa: E402

HEADERS = ["benchmark", "model", "what", "medsam3 s", "plain s", "speed-up", "peak RSS GiB"]


def predictor_rows(spec: str, k: int, size: int) -> list[list[str]]:
    r = bench_predictor.bench(spec, k, size, repeats=1)
    return [
        ["predictor", spec, f"encode one {size}px image", f"{r['encode']:.3f}", "", "", f"{r['rss']:.2f}"],
        ["predictor", spec, "one more prompt (features kept)", f"{r['one_prompt']:.3f}", "", "", ""],
        [
            "predictor",
            spec,
            f"{k} prompts on one image (vs {k} plain forwards)",
            f"{r['k_prompts']:.3f}",
            f"{r['plain']:.3f}",
            f"{r['plain'] / r['k_prompts']:.2f}x",
            f"{r['rss']:.2f}",
        ],
        ["predictor", spec, f"{k} prompts / (encode + {k} x one prompt)", f"{r['budget_ratio']:.2f}", "", "", ""],
    ]


def _ratio(plain: float, ours: float) -> str:
    return f"{plain / ours:.1f}x" if ours > 0 else "-"


def training_rows(spec: str, samples: int, size: int) -> list[list[str]]:
    plain = bench_training.run(spec, samples, size, 1, cache=False)
    cached = bench_training.run(spec, samples, size, 1, cache=True)
    return [
        [
            "training",
            spec,
            f"epoch 1 of {samples} samples (cache filled)",
            f"{cached['first']:.1f}",
            f"{plain['first']:.1f}",
            _ratio(plain["first"], cached["first"]),
            f"{cached['rss']:.2f}",
        ],
        [
            "training",
            spec,
            f"epoch 2 of {samples} samples (cache read)",
            f"{cached['second']:.1f}",
            f"{plain['second']:.1f}",
            _ratio(plain["second"], cached["second"]),
            f"{cached['rss']:.2f}",
        ],
    ]


def volume_rows(spec: str, depths: list[int], size: int = 256) -> list[list[str]]:
    """The streamed volume path vs segment_image per slice; each run in its own process (clean peak RSS)."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for depth in depths:
            path = bench_volume.phantom_volume(Path(scratch) / f"ct_{depth}.npz", depth, size)
            command = [sys.executable, bench_volume.__file__, "--one", "--model", spec, "--volume", str(path),
                       "--method", "slices", "--threads", str(torch.get_num_threads()), "--device", "cpu",
                       "--prompts", "1", "--batch", "1", "--plain"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(["volume", spec, f"{depth} slices of {size}px, 1 prompt (features alive: "
                         f"{r['features_alive']})", f"{r['seconds']:.2f}", f"{r['plain_seconds']:.2f}",
                         f"{r['plain_seconds'] / r['seconds']:.2f}x", f"{r['peak_gib']:.2f}"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="specs (default: nano and sam3-random)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="samples per training epoch (default: 2 for sam3-random, 64 otherwise)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[list[str]] = []
    for spec in args.model or ["nano", "sam3-random"]:
        rows += predictor_rows(spec, args.k, args.size)
        samples = args.train_samples or (2 if spec == "sam3-random" else 64)
        rows += training_rows("nano-init" if spec == "nano" else spec, samples, 256)
        rows += volume_rows(spec, [2] if spec == "sam3-random" else [16, 64, 256])
    print(f"Machine: {machine()}\n")
    print(markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
