"""Which parameters learn during fine-tuning.

``paper``: MedSAM-3's method: vision encoder, text encoder and text projection frozen; geometry
encoder, DETR encoder/decoder (with the presence token and head), mask decoder and dot-product
scoring trained. A backbone whose towers are not SAM 3's (``lite``) adds the new modules between its
frozen towers and the detector (``model.extra_trained``: its vision neck and text projection; its
semantic head has a stage of its own, ``train.semantic_head``).
``lora-detector``: LoRA adapters on the detector's linear layers only, everything else frozen.
``lora-all``: the authors' released v1: LoRA (rank 16, alpha 32, dropout 0.1) on every linear
layer, both encoders included. ``full``: everything trains.

LoRA is injected in place with peft (``inject_adapter_in_model``), so the model stays a plain
``Sam3Model`` and every caller keeps the same forward signature.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from medsam3.errors import MedSAM3Error
from medsam3.model.components import DETECTOR_COMPONENTS, component_of

POLICIES = ("paper", "lora-detector", "lora-all", "full")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.1


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise MedSAM3Error(f"unknown parameter policy '{policy}': choose one of {', '.join(POLICIES)}")
    return policy


def _linear_names(model: nn.Module, components: tuple[str, ...] | None) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (components is None or component_of(name) in components)
    ]


def apply_policy(model: nn.Module, policy: str, lora: LoraSettings | None = None) -> nn.Module:
    """Set ``requires_grad`` (and inject LoRA layers) for ``policy``; returns the same model."""
    check_policy(policy)
    if policy == "full":
        model.requires_grad_(True)
        return model
    trained = DETECTOR_COMPONENTS + tuple(getattr(model, "extra_trained", ()))
    if policy == "paper":
        for name, param in model.named_parameters():
            param.requires_grad_(component_of(name) in trained)
        return model
    lora = lora or LoraSettings()
    components = trained if policy == "lora-detector" else None
    targets = _linear_names(model, components)
    pattern = "^(" + "|".join(re.escape(n) for n in targets) + ")$"
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)  # marks only the new lora_ parameters trainable
    model.medsam3_lora = asdict(lora)  # remembered for adapter metadata
    return model


def trainable_state_dict(model: nn.Module) -> dict:
    """Exactly the tensors the policy trains: what an adapter checkpoint stores."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
