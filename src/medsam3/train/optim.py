"""AdamW with SAM 3's parameter groups: one learning rate per component, layer decay on the ViT, and
no weight decay on biases and norm layers.

SAM 3's fine-tuning recipe (``roboflow_v100_full_ft_100_images.yaml``) trains the detector at 8e-5,
the vision backbone at 2.5e-5 with layer-wise decay 0.9, and the language backbone at 5e-6; weight
decay 0.1, but 0 for biases and LayerNorms. Here the rates are relative to the detector's ``lr``
(vision x 0.3125, text x 0.0625), so one ``--lr`` keeps SAM 3's ratios. Under the ``paper`` policy
only the detector trains and this is one group (two with the no-decay one); the other groups matter
for ``full`` and ``lora-*``, where one rate for all would move the pretrained towers 4x (top ViT
block) to >10x (bottom) and 16x (text) faster than SAM 3 does.

Layer decay follows SAM 3's ViT (``get_layer_id``): with L blocks, block i learns at
``decay ** (L - i)`` of the tower's rate, the patch embedding at ``decay ** (L + 1)``, everything
after the blocks (final norm, FPN neck) at 1; the position embedding is exempt (1), as SAM 3's config
overrides it. A block is the ``layers.N`` (or ``blocks.N``) index inside the vision encoder:
transformers' Sam3 ViT has 32 such layers; lite's TinyViT has 4 stages ``layers.0-3``, the unit used
for it.

Which component a parameter belongs to comes from `medsam3.model.components.component_of`. Modules
a backbone adds between its frozen towers and the detector (``model.extra_trained``, e.g. lite's
vision neck and text projection, new and trained from scratch) learn with the detector, as does lite's
semantic head where it trains (``full``; otherwise its own stage, ``train.semantic_head``); LiteMedSAM's
pretrained box decoder (lite, trained only under ``full``) learns at the vision rate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medsam3.errors import MedSAM3Error
from medsam3.model.components import DETECTOR_COMPONENTS, component_of

# SAM 3's rates relative to its detector's 8e-5.
VISION_LR_SCALE = 2.5e-5 / 8e-5  # 0.3125
TEXT_LR_SCALE = 5e-6 / 8e-5  # 0.0625
LAYER_DECAY = 0.9

VISION_COMPONENTS = ("vision_encoder", "vision_adapter")
TEXT_COMPONENTS = ("text_encoder", "text_projection")
_NORM_CLASS = re.compile(r"(Layer|RMS|Group|Batch|Instance)Norm")
_BLOCK = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ParamGroupInfo:
    """One optimizer parameter group, for logging: name, tensor and element counts, lr, weight decay."""

    name: str
    tensors: int
    numel: int
    lr: float
    weight_decay: float


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, BatchNorm/InstanceNorm, and look-alikes by class name (transformers'
    ``*LayerNorm``/``*RMSNorm``, LiteMedSAM's ``LayerNorm2d``)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)):
        return True
    return bool(_NORM_CLASS.search(type(module).__name__))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay must not touch: those of norm modules, and every
    parameter with at most one dimension (biases, norm gains, layer scales)."""
    names = {name for name, param in model.named_parameters() if param.ndim <= 1}
    for module_name, module in model.named_modules():
        if is_norm_module(module):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, _ in module.named_parameters(recurse=False))
    return names


def vision_block(name: str) -> int | None:
    """The ViT block index in a vision-encoder parameter name (``...layers.7.attn...`` -> 7), else None."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def vision_layer_scale(name: str, depth: int, decay: float) -> tuple[str, float]:
    """(label, lr multiplier) of a vision-tower parameter under SAM 3's layer decay over `depth` blocks."""
    if "pos_embed" in name or "position_embedding" in name:
        return "pos_embed", 1.0
    block = vision_block(name)
    if block is not None:
        return f"block{block}", decay ** (depth - block)
    if "patch_embed" in name:
        return "patch_embed", decay ** (depth + 1)
    return "top", 1.0


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    vision_lr_scale: float = VISION_LR_SCALE,
    text_lr_scale: float = TEXT_LR_SCALE,
    layer_decay: float = LAYER_DECAY,
    extra_trained: Sequence[str] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[torch.optim.AdamW, list[ParamGroupInfo]]:
    """AdamW over the trainable (requires_grad) parameters of `model`, grouped as the module doc says.

    `lr` is the detector's rate; `extra_trained` defaults to ``model.extra_trained``. Returns the
    optimizer (each param group carries a ``name``) and one `ParamGroupInfo` per group.
    """
    if not (lr > 0 and weight_decay >= 0 and 0 < layer_decay <= 1 and vision_lr_scale >= 0 and text_lr_scale >= 0):
        raise MedSAM3Error(
            f"optimizer settings out of range: lr {lr} (> 0), weight decay {weight_decay} (>= 0), "
            f"layer decay {layer_decay} (0 < d <= 1), lr scales {vision_lr_scale}, {text_lr_scale} (>= 0)"
        )
    extra = set(getattr(model, "extra_trained", ()) if extra_trained is None else extra_trained)
    all_names = [name for name, _ in model.named_parameters()]
    vision_blocks = [
        vision_block(n) for n in all_names if component_of(n) == "vision_encoder" and vision_block(n) is not None
    ]
    depth = max(vision_blocks) + 1 if vision_blocks else 0
    no_decay = no_decay_names(model)

    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of(name)
        if component in extra or component in DETECTOR_COMPONENTS or component in ("other", "semantic_head"):
            label, scale = "detector", 1.0
        elif component in VISION_COMPONENTS:
            layer, layer_scale = vision_layer_scale(name, depth, layer_decay)
            label, scale = f"vision.{layer}", vision_lr_scale * layer_scale
        elif component in TEXT_COMPONENTS:
            label, scale = "text", text_lr_scale
        else:  # a pretrained part outside the towers and the detector (lite's LiteMedSAM box decoder)
            label, scale = component, vision_lr_scale
        decay = 0.0 if name in no_decay else weight_decay
        if decay == 0.0:
            label += ".no_decay"
        groups.setdefault((label, lr * scale, decay), []).append(param)
    if not groups:
        raise MedSAM3Error("no trainable parameters: the parameter policy froze the whole model")

    param_groups = [
        {"params": params, "lr": group_lr, "weight_decay": decay, "name": label}
        for (label, group_lr, decay), params in groups.items()
    ]
    info = [
        ParamGroupInfo(g["name"], len(g["params"]), sum(p.numel() for p in g["params"]), g["lr"], g["weight_decay"])
        for g in param_groups
    ]
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=betas), info
