"""What a loaded model is: the model, its processor and seam, and what produced it.

Its own module so that :mod:`medsam3.model.loading` (which applies adapters) and
:mod:`medsam3.model.adapter` (which needs the loaded model) both import it and not each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from transformers import Sam3Config, Sam3Model, Sam3Processor

from medsam3.model.backbones import backbone_for
from medsam3.model.precision import Precision
from medsam3.model.seam import ModelSeam

_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "id2label",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


@dataclass
class LoadedModel:
    """A model ready for inference or training, with what produced it and its seam."""

    model: Sam3Model
    processor: Sam3Processor | None  # SAM 3's processor (None for backbones with their own preprocessing)
    spec: str
    device: torch.device
    adapter: dict | None = None  # the adapter's metadata, when one is applied
    concepts: list[str] = field(default_factory=list)  # vocabulary the weights were tuned on
    mask_sources: dict[str, str] = field(default_factory=dict)  # concept -> measured best text mask source
    box_modes: dict[str, str] = field(default_factory=dict)  # concept -> measured best box mode (BOX_MODES)
    precision: Precision = field(default_factory=lambda: Precision("fp32", "fp32", "default"))
    seam: ModelSeam = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.seam = ModelSeam(self.model, backbone_for(self.model, self.processor), self.device)

    @property
    def backbone(self):
        return self.seam.backbone

    @property
    def image_size(self) -> int:
        return int(self.seam.input_size)

    @property
    def fingerprint(self) -> str:
        return config_fingerprint(self.model.config)


def config_fingerprint(config: Sam3Config) -> str:
    """A hash of the architecture (not the weights): adapters refuse a base that differs."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in sorted(value.items()) if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    canonical = json.dumps(strip(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def mask_source_map(recorded: dict | None) -> dict[str, str]:
    """concept -> source from what training recorded (``{"source": ..., "dice": ...}`` or a bare name)."""
    return {str(k): str(v["source"] if isinstance(v, dict) else v) for k, v in (recorded or {}).items()}


def box_mode_map(recorded: dict | None) -> dict[str, str]:
    """concept -> box mode from the same record (``{"source": ..., "box": "exemplar", ...}``), where measured."""
    return {str(k): str(v["box"]) for k, v in (recorded or {}).items() if isinstance(v, dict) and "box" in v}
