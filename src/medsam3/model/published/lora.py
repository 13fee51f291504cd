"""The MedSAM3-v1 authors' LoRA (``best_lora_weights.pt``), merged into a ``Sam3Model``'s weights.

Facts of their format (``Joey-S-Liu/MedSAM3``: ``lora_layers.py``, ``configs/full_lora_config.yaml``):
their code wraps Linear layers of Meta's ``Sam3Image``, after replacing every
``nn.MultiheadAttention`` by one with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj``
Linears; a wrapped Linear named ``M`` adds ``dropout(x) @ A @ B * alpha / r`` with
``M.lora.lora_A`` of shape (in, r) and ``M.lora.lora_B`` of shape (r, out); the file is
``torch.save`` of exactly those tensors. The released config: rank 16, alpha 32 (their comment:
"2x rank"), dropout 0.1 (training only). alpha is not stored in the file.

So the merged weight of Linear ``M`` is ``W + (alpha / r) * (A @ B)^T``; a fused ViT ``qkv`` delta is
split in thirds onto transformers' ``q_proj``/``k_proj``/``v_proj``, and the authors' split MHA
``q_proj``/``k_proj``/``v_proj`` land on the matching third of Meta's ``in_proj_weight``, i.e. on
transformers' ``q_proj``/``k_proj``/``v_proj`` again.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Sam3Model

from medsam3.errors import ModelSpecError
from medsam3.model.published.checkpoint import skipped_group
from medsam3.model.published.files import read_tensor_file
from medsam3.model.published.meta_names import FUSED_PART, consumers, source_plan

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora\.lora_(?P<which>[AB])")
_SPLIT_MHA = re.compile(r"(?P<attn>.+)\.(?P<qkv>[qkv])_proj")


@dataclass
class LoraReport:
    """What a LoRA file held and where it went; ``medsam3 info`` prints it."""

    path: str
    rank: int
    alpha: float
    modules: int
    merged_parameters: int
    targets: dict[str, int] = field(default_factory=dict)  # Linear kind (qkv, fc1, q_proj...) -> count
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.targets.items()))
        out = [
            f"adapter: {self.path}",
            "adapter format: MedSAM3-v1 LoRA (authors' lora_layers.py, Meta module names), merged into the weights",
            f"LoRA rank {self.rank}, alpha {self.alpha:g} (scaling {self.scaling:g}; alpha is not in the file: "
            "the authors' released config)",
            f"LoRA modules: {self.modules} -> {self.merged_parameters} Sam3Model weights; targets: {kinds}",
        ]
        out += [f"  skipped by design: {count} x {group}" for group, count in self.skipped.items()]
        return out

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "rank": self.rank,
            "alpha": self.alpha,
            "modules": self.modules,
            "merged_parameters": self.merged_parameters,
            "targets": self.targets,
            "skipped": self.skipped,
        }


def read_lora_pairs(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Meta module name -> (A, B), checking the file holds exactly complete LoRA pairs of one rank."""
    tensors = read_tensor_file(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.fullmatch(str(key))
        if match is None:
            raise ModelSpecError(
                f"{path}: key '{key}' is not a LoRA tensor of the MedSAM3-v1 layout (MODULE.lora.lora_A / lora_B)"
            )
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ModelSpecError(f"{path}: '{key}' must be a 2-D tensor, got {getattr(value, 'shape', type(value))}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelSpecError(f"{path}: '{key}' holds NaN or infinite values")
        pairs.setdefault(match["module"], {})[match["which"]] = value.detach()
    if not pairs:
        raise ModelSpecError(f"{path}: no LoRA tensors in the file")
    ranks = set()
    for module, pair in sorted(pairs.items()):
        for which in "AB":
            if which not in pair:
                raise ModelSpecError(f"{path}: '{module}.lora.lora_{which}' is missing (its partner is there)")
        a, b = pair["A"], pair["B"]
        if a.shape[1] != b.shape[0]:
            raise ModelSpecError(
                f"{path}: '{module}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank"
            )
        ranks.add(int(a.shape[1]))
    if len(ranks) > 1:
        raise ModelSpecError(f"{path}: LoRA pairs of different ranks {sorted(ranks)}")
    return {module: (pair["A"], pair["B"]) for module, pair in pairs.items()}


def merge_medsam3_lora(model: Sam3Model, path: str | Path, alpha: float | None = None) -> LoraReport:
    """Merge the authors' LoRA into ``model`` in place; nothing changes unless every pair fits.

    ``alpha`` defaults to twice the rank, the authors' released setting (rank 16, alpha 32).
    """
    path = Path(path)
    pairs = read_lora_pairs(path)
    rank = int(next(iter(pairs.values()))[0].shape[1])
    alpha = float(2 * rank if alpha is None else alpha)
    scaling = alpha / rank
    params = dict(model.named_parameters())
    plan, _ = source_plan(list(params), list(model.config.vision_config.scale_factors))
    by_key = consumers(plan)
    updates: list[tuple[str, torch.Tensor]] = []
    targets: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for module, (a, b) in sorted(pairs.items()):
        split = _SPLIT_MHA.fullmatch(module)
        split_key = f"{split['attn']}.in_proj_weight" if split else None
        if split and split_key in by_key:
            part = FUSED_PART[split["qkv"]]
            receivers = [(n, s) for n, s in by_key[split_key] if s.part == part]
        elif f"{module}.weight" in by_key:
            receivers = by_key[f"{module}.weight"]
        elif skipped_group(f"{module}.weight"):
            skipped[skipped_group(f"{module}.weight")] += 1
            continue
        else:
            raise ModelSpecError(
                f"{path}: '{module}.lora.lora_A' wraps '{module}', which is not a Linear of SAM 3's image model "
                "(Meta's module names)"
            )
        delta = scaling * (a.double() @ b.double()).t()  # (out, in), as nn.Linear stores its weight
        pieces = delta.chunk(3, dim=0) if len(receivers) == 3 else [delta]
        if len(receivers) == 3:
            receivers = sorted(receivers, key=lambda item: item[1].part)
        for (name, _source), piece in zip(receivers, pieces, strict=True):
            if tuple(piece.shape) != tuple(params[name].shape):
                raise ModelSpecError(
                    f"{path}: '{module}.lora' gives a {tuple(delta.shape)} update, the base's {name} is "
                    f"{tuple(params[name].shape)}: this LoRA was trained on another architecture"
                )
            updates.append((name, piece))
        targets[module.rsplit(".", 1)[-1]] += 1
    with torch.no_grad():
        for name, piece in updates:
            param = params[name]
            param.copy_((param.double() + piece.to(param.device)).to(param.dtype))
    return LoraReport(
        path=str(path),
        rank=rank,
        alpha=alpha,
        modules=len(pairs),
        merged_parameters=len(updates),
        targets=dict(targets),
        skipped=dict(skipped),
    )
