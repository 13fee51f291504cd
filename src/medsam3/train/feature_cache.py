"""Frozen-encoder feature cache.

Under the paper's policy the vision encoder never changes, so its output for an (image,
preprocessing) pair is a constant: compute it once, store it, and let every later epoch run only the
detector. Entries are fp16 safetensors keyed by a hash of the exact pixels the encoder saw; the
folder is bound to one encoder by a fingerprint of its weights and preprocessing, and a cache made
by another encoder is refused rather than silently reused.

Position encodings depend only on the feature-map shape, so they are computed once and kept in
memory rather than stored per image.

What stays valid with a cache: anything that does not change the encoder's input pixels (prompt
box jitter, prompt-mode choice, the concept phrase). Image augmentation changes the pixels, so it is
cached per augmented *view*: each image gets a fixed set of deterministic views, each cached once.
Training that updates the vision encoder (policies lora-all and full) cannot use a cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.errors import MedSAM3Error
from medsam3.utils.files import atomic_path, write_json_atomic

MANIFEST = "manifest.json"


def encoder_fingerprint(model, image_processor) -> str:
    """Hash of the vision encoder's weights plus the preprocessing that feeds it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vision_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    prep = {
        "size": dict(image_processor.size),
        "mean": list(image_processor.image_mean),
        "std": list(image_processor.image_std),
    }
    digest.update(json.dumps(prep, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def image_key(rgb: np.ndarray) -> str:
    digest = hashlib.sha256(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()[:32]


class FeatureCache:
    """Vision features on disk for one frozen encoder; ``encode(rgbs)`` returns a batch."""

    def __init__(self, root: str | Path, model, processor, *, rebuild: bool = False):
        self.root = Path(root)
        self.model = model
        self.processor = processor
        self.fingerprint = encoder_fingerprint(model, processor.image_processor)
        self.hits = 0
        self.misses = 0
        self._positions: tuple[torch.Tensor, ...] | None = None
        manifest = self.root / MANIFEST
        if manifest.is_file():
            stored = json.loads(manifest.read_text()).get("encoder_fingerprint")
            if stored != self.fingerprint:
                if not rebuild:
                    raise MedSAM3Error(
                        f"{self.root}: feature cache was made by another encoder ({stored}, this model's is "
                        f"{self.fingerprint}): use another --cache-dir or --rebuild-cache"
                    )
                for entry in self.root.glob("*.safetensors"):
                    entry.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(manifest, {"encoder_fingerprint": self.fingerprint, "dtype": "float16"})

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    @torch.no_grad()
    def _compute(self, rgbs: list[np.ndarray], device: torch.device) -> Sam3VisionEncoderOutput:
        pixels = self.processor.image_processor(images=rgbs, return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        return self.model.get_vision_features(pixel_values=pixels.to(device, dtype))

    def encode(self, rgbs: list[np.ndarray], device: torch.device) -> Sam3VisionEncoderOutput:
        """Features for a batch of images: cached ones loaded, the rest computed and stored."""
        keys = [image_key(rgb) for rgb in rgbs]
        missing = [i for i, key in enumerate(keys) if not self._path(key).is_file()]
        if missing:
            fresh = self._compute([rgbs[i] for i in missing], device)
            if self._positions is None:
                self._positions = tuple(p[:1].detach().cpu() for p in fresh.fpn_position_encoding)
            for row, index in enumerate(missing):
                levels = {
                    f"level{j}": h[row].detach().to("cpu", torch.float16).contiguous()
                    for j, h in enumerate(fresh.fpn_hidden_states)
                }
                with atomic_path(self._path(keys[index])) as tmp:
                    save_file(levels, str(tmp))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if self._positions is None:  # every image was cached: one encode gives the (shape-only) positions
            self._positions = tuple(p[:1].cpu() for p in self._compute(rgbs[:1], device).fpn_position_encoding)
        stored = [load_file(str(self._path(key))) for key in keys]
        dtype = next(self.model.parameters()).dtype
        levels = tuple(
            torch.stack([s[f"level{j}"] for s in stored]).to(device, dtype) for j in range(len(self._positions))
        )
        positions = tuple(p.to(device, dtype).expand(len(keys), *p.shape[1:]) for p in self._positions)
        return Sam3VisionEncoderOutput(
            last_hidden_state=None, fpn_hidden_states=levels, fpn_position_encoding=positions
        )
