"""Learning-rate schedule: linear warmup, then cosine decay to a floor, over steps or a time budget."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    floor: float = 0.01,
    time_fraction: Callable[[], float] | None = None,
) -> LambdaLR:
    """Multiplier rises linearly over ``warmup_steps``, then follows a cosine down to ``floor``.

    ``time_fraction()`` (0 at the start, 1 when a wall-clock budget is spent): the cosine follows
    whichever of step progress and time progress is further along, so a run cut by its time budget
    still ends at a low learning rate instead of stopping at the peak.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction())
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
