"""Frozen-encoder feature cache.

Under the paper's policy the frozen image tower never changes, so its output (the seam's
``embed_images``: SAM 3's FPN levels, lite's TinyViT embedding) for an image is a constant: compute
it once, store it, and let every later epoch run only what trains (lite's neck, the detector).
Entries are safetensors keyed by a hash of the exact pixels the encoder saw, stored in fp16 (or in
bf16 when the encoder runs in bf16); the folder is bound to one encoder by a fingerprint of its
weights, dtype and preprocessing, and a cache made by another encoder is refused rather than
silently reused.

What stays valid with a cache: anything that does not change the encoder's input pixels (prompt
box jitter, prompt-mode choice, the concept phrase). Flips make a finite set of exact pixel views,
so each flipped view is cached once like any image (``--augment-flips``); other augmentation
changes pixels every time and is refused. Training that updates the image tower (policies lora-all
and full) cannot use a cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from medsam3.errors import MedSAM3Error
from medsam3.model.seam import ModelSeam
from medsam3.model.tower_memo import image_key
from medsam3.utils.files import atomic_path, save_tensors, write_json_atomic

MANIFEST = "manifest.json"


def storage_dtype(compute: torch.dtype) -> torch.dtype:
    """What the cache keeps: the encoder's own bf16, else fp16 (half the disk of fp32)."""
    return torch.bfloat16 if compute == torch.bfloat16 else torch.float16


class FeatureCache:
    """The frozen image tower's embeddings on disk for one encoder; ``encode(rgbs)`` returns a batch."""

    def __init__(self, root: str | Path, seam: ModelSeam, *, rebuild: bool = False):
        self.root = Path(root)
        self.seam = seam
        self.fingerprint = seam.tower_fingerprint()
        self.stored_dtype = storage_dtype(seam.tower_dtype)
        self.hits = 0
        self.misses = 0
        manifest = self.root / MANIFEST
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text()).get("encoder_fingerprint")
            except (json.JSONDecodeError, AttributeError):
                stored = "unreadable"
            if stored != self.fingerprint:
                if not rebuild:
                    raise MedSAM3Error(
                        f"{self.root}: feature cache was made by another encoder ({stored}, this model's is "
                        f"{self.fingerprint}): use another --cache-dir or --rebuild-cache"
                    )
                for entry in self.root.glob("*.safetensors"):
                    entry.unlink()
        self._manifest_written = False  # written with the first entry: a run that fails early leaves nothing

    def _write_manifest(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.root / MANIFEST,
            {"encoder_fingerprint": self.fingerprint, "dtype": str(self.stored_dtype).split(".")[-1]},
        )
        self._manifest_written = True

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def encode(self, rgbs: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """Embeddings for a batch of images: cached ones loaded, the rest computed and stored."""
        keys = [image_key(rgb) for rgb in rgbs]
        missing = [i for i, key in enumerate(keys) if not self._path(key).is_file()]
        if missing:
            if not self._manifest_written:
                self._write_manifest()
            fresh = self.seam.embed_images([rgbs[i] for i in missing])
            for row, index in enumerate(missing):
                parts = {
                    f"part{j}": t[row].detach().to("cpu", self.stored_dtype).contiguous() for j, t in enumerate(fresh)
                }
                with atomic_path(self._path(keys[index])) as tmp:
                    save_tensors(tmp, parts)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        stored = [load_file(str(self._path(key))) for key in keys]
        count = len(stored[0])
        return tuple(
            torch.stack([s[f"part{j}"] for s in stored]).to(self.seam.device, self.seam.dtype) for j in range(count)
        )
