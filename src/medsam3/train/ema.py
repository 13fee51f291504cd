"""An exponential moving average of the trained weights, kept beside them during a run.

Why: a few-shot run validates on 1-2 held-out slices, too few to choose one checkpoint by; the
weights of single late steps still move with each batch. An average over the last ~1/(1 - decay)
steps is a smoother end point (``TrainConfig.keep = "ema"``). On the four few-shot tasks
(``benchmarks/bench_checkpoint_choice.py``) it beat the final weights on average on both views and
every other choice on the trained view, but not validation's pick on the unseen view, so
``keep="auto"`` keeps the mean of the two on a thin validation split ("average-ema"). Only the
parameters that train are averaged: the frozen towers never move.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightEMA:
    """``shadow <- decay_t * shadow + (1 - decay_t) * weights`` after every optimizer step.

    ``decay_t = min(decay, (1 + t) / (10 + t))`` after ``t`` updates: early on the average follows the
    weights closely, so the random or pretrained start does not linger in a run of a few hundred steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.updates = 0
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self._params.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for name, param in self._params.items():
            self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name (what ``Trainer._holding`` takes)."""
        return dict(self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved average (a resumed run); its parameter names must be this model's."""
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise KeyError("the saved weight average holds other parameters than this model trains")
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.updates = int(state["updates"])
