"""Seconds per Sam3DetectionLoss call (forward + backward of the loss alone) for lite-like shapes.

A batch of 4 images, 32 queries, 64 x 64 mask and semantic logits (lite's grid), 3 instances in
three images and one image without the concept, targets at the canvas size given on the command
line. Compares the mask and semantic terms at the full target size, at the target size capped at
lite's 256 px input side (the default: ``Sam3DetectionLoss(input_side=256)``), and at the 64 px
prediction grid (the earlier default).

    python benchmarks/bench_losses.py --sizes 256 512 1024 2048 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from medsam3.train.boxes import masks_to_normalized_boxes
from medsam3.train.losses import LossWeights, Sam3DetectionLoss


def _batch(side: int, batch: int = 4, queries: int = 32, grid: int = 64, instances: int = 3):
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    targets = []
    for b in range(batch):
        if b == batch - 1:
            targets.append({"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, side, side, dtype=torch.bool)})
            continue
        masks = []
        for _ in range(instances):
            cy, cx = (torch.rand(2, generator=generator) * 0.6 + 0.2) * side
            r = (torch.rand(1, generator=generator).item() * 0.1 + 0.03) * side
            masks.append((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
        masks = torch.stack(masks)
        targets.append({"boxes": masks_to_normalized_boxes(masks), "masks": masks})
    corners = torch.rand(batch, queries, 2, 2, generator=generator).sort(dim=2).values
    outputs = {
        "pred_logits": torch.randn(batch, queries, generator=generator),
        "pred_boxes": corners.permute(0, 1, 3, 2).reshape(batch, queries, 4)[..., [0, 2, 1, 3]],
        "pred_masks": torch.randn(batch, queries, grid, grid, generator=generator),
        "presence_logits": torch.randn(batch, 1, generator=generator),
        "semantic_seg": torch.randn(batch, 1, grid, grid, generator=generator),
    }
    return outputs, targets


def seconds_per_call(loss: Sam3DetectionLoss, side: int, repeats: int) -> float:
    outputs, targets = _batch(side)
    times = []
    for _ in range(repeats + 1):
        leaves = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
        start = time.perf_counter()
        total, _ = loss(leaves, targets)
        total.backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # median, first call (warm-up) dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| target side | full target (s) | capped at the 256 px input (s) | 64 px prediction grid (s) |")
    print("|---|---|---|---|")
    for side in args.sizes:
        full = seconds_per_call(Sam3DetectionLoss(LossWeights(max_mask_side=0)), side, args.repeats)
        capped = seconds_per_call(Sam3DetectionLoss(input_side=256), side, args.repeats)
        on_grid = LossWeights(mask_at_target=False, semantic_at_target=False)
        grid = seconds_per_call(Sam3DetectionLoss(on_grid), side, args.repeats)
        print(f"| {side} | {full:.4f} | {capped:.4f} | {grid:.4f} |", flush=True)


if __name__ == "__main__":
    main()
