"""Tiny synthetic concept samples for trainer tests: bright disks ('blob') on noise."""

from __future__ import annotations

import numpy as np

from medsam3.data.masks import masks_to_boxes
from medsam3.data.sample import Sample


def disk_samples(
    n: int, size: int = 64, seed: int = 0, concept: str = "blob", negatives: int = 1
) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        masks = np.zeros((0, size, size), bool)
        if i >= negatives:
            cy, cx, r = rng.integers(16, size - 16), rng.integers(16, size - 16), rng.integers(6, 12)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            image[mask] = 200
            masks = mask[None]
        samples.append(
            Sample(image=image, concept=concept, masks=masks, boxes=masks_to_boxes(masks), case_id=f"case{i}")
        )
    return samples
