"""Training benchmark: seconds per step and per epoch, with and without the frozen-feature cache.

    python benchmarks/bench_training.py --model nano-init --model sam3-random --samples 4

Under the paper's policy the vision encoder is frozen: without a cache it still runs (without
gradients) every epoch; with the cache it runs once, in the first epoch, and later epochs run only
the detector. The plain reference path is the uncached trainer in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRSS, machine, markdown_table  # noqa: E402

from medsam3.data.masks import masks_to_boxes  # noqa: E402
from medsam3.data.sample import Sample  # noqa: E402
from medsam3.model import load_model  # noqa: E402
from medsam3.train.trainer import TrainConfig, Trainer  # noqa: E402


def samples(n: int, size: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(n):
        image = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
        mask = (yy - size // 2) ** 2 + (xx - size // 3) ** 2 < (size // 6) ** 2
        image[mask] = 200
        masks = mask[None]
        out.append(Sample(image=image, concept="lesion", masks=masks, boxes=masks_to_boxes(masks), case_id=f"c{i}"))
    return out


def run(spec: str, n: int, size: int, batch: int, cache: bool, runtime: str = "torch", autocast: bool = False) -> dict:
    loaded = load_model(spec, device="cpu", runtime=runtime)
    config = TrainConfig(
        policy="paper",
        prompt_mode="text",
        epochs=2,
        max_minutes=None,
        batch_size=batch,
        progress=False,
        cache_features=cache,
        lr=1e-4,
        cpu_autocast=autocast,
    )
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as memory:
        trainer = Trainer(loaded, samples(n, size), tmp, config)
        trainer.save_checkpoint = lambda *a, **k: None  # measure training, not checkpoint writing
        start = time.perf_counter()
        history = trainer.fit()["history"]
        total = time.perf_counter() - start
    first = history[0]["seconds"]
    second = history[1]["seconds"] - first
    steps = trainer.steps_per_epoch
    return {
        "first": first,
        "second": second,
        "step": second / steps,
        "total": total,
        "rss": memory.gib,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="specs (default: nano-init and sam3-random)")
    parser.add_argument("--samples", type=int, default=4, help="samples per epoch")
    parser.add_argument("--size", type=int, default=256, help="image side")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for spec in args.model or ["nano-init", "sam3-random"]:
        plain = run(spec, args.samples, args.size, args.batch_size, cache=False)
        cached = run(spec, args.samples, args.size, args.batch_size, cache=True)
        for label, r in (("no cache", plain), ("feature cache", cached)):
            rows.append(
                [
                    spec,
                    label,
                    f"{r['step']:.3f}",
                    f"{r['first']:.1f}",
                    f"{r['second']:.1f}",
                    f"{args.samples / r['second']:.2f}",
                    f"{plain['second'] / r['second']:.1f}x",
                    f"{r['rss']:.2f}",
                ]
            )
    print(f"Machine: {machine()}\n")
    print(f"{args.samples} samples per epoch, {args.size} px images, batch {args.batch_size}, policy paper.\n")
    print(
        markdown_table(
            [
                "model",
                "path",
                "s / step (epoch 2)",
                "epoch 1 s",
                "epoch 2 s",
                "samples/s (epoch 2)",
                "epoch-2 speed-up vs no cache",
                "peak RSS GiB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
