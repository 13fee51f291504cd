"""The frozen image tower's outputs, identified and kept in memory.

The image tower is most of the compute per image (lite's TinyViT: 75 GFLOP per 256 px image, 1.7 s on
an AVX2-only 2-core CPU with OpenVINO). A base model and every adapter trained on it under the paper's
policy share that tower, so the tower's output for an image is one constant for all of them: scoring
a test set before and after fine-tuning, by text and by text + box, needs one encoding per image, not
four. :func:`tower_fingerprint` names a tower (its weights, dtype, runtime and preprocessing; what a
feature cache on disk is bound to as well), :func:`image_key` names the exact pixels, and a
:class:`TowerMemo` shared by several seams keeps outputs under both, so a seam whose tower differs
never sees another's embeddings.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np
import torch


def tower_fingerprint(backbone, model, dtype: torch.dtype, runtime: str) -> str:
    """Hash of the frozen towers' weights, their dtype and runtime, plus the preprocessing that feeds them."""
    digest = hashlib.sha256()
    for prefix, module in sorted(backbone.frozen_modules(model).items()):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{prefix}.{name}".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    facts = {**backbone.preprocessing(), "dtype": str(dtype), "runtime": runtime}
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def weights_signature(parameters) -> tuple:
    """A cheap identity of some weights: replacing a tensor or changing it in place (its version
    counter moves) changes it. What decides when a hash or a conversion of them must be redone."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in parameters)


def image_key(rgb: np.ndarray) -> str:
    """Hash of an image's exact pixels and shape."""
    digest = hashlib.sha256(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()[:32]


class TowerMemo:
    """Tower outputs by (tower fingerprint, image key), least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, ...]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tower: str, key: str) -> tuple[torch.Tensor, ...] | None:
        entry = self._entries.get((tower, key))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end((tower, key))
        self.hits += 1
        return entry

    def put(self, tower: str, key: str, embedding: tuple[torch.Tensor, ...]) -> None:
        """Keep one image's output (a batch of one per tensor), detached."""
        size = sum(t.numel() * t.element_size() for t in embedding)
        if size > self.max_bytes or (tower, key) in self._entries:
            return
        self._entries[(tower, key)] = tuple(t.detach() for t in embedding)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in dropped)
