"""Adapter checkpoints: only what a fine-tune changed, bound to the base it was trained on.

An adapter folder holds ``adapter.safetensors`` (the parameters the policy trains, nothing
else) and ``adapter.json`` (base model spec, base config fingerprint, policy, LoRA settings,
concept vocabulary, preprocessing). Loading refuses a base whose architecture differs. Weights are
read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import medsam3
from medsam3.errors import ModelSpecError
from medsam3.model.loaded import LoadedModel, box_mode_map, mask_source_map
from medsam3.model.policy import LoraSettings, apply_policy, trainable_state_dict
from medsam3.utils.files import atomic_dir, save_tensors, write_json_atomic

WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


def adapter_metadata(loaded: LoadedModel, policy: str, concepts: list[str], extra: dict | None = None) -> dict:
    return {
        "format": "medsam3-adapter/1",
        "medsam3_version": medsam3.__version__,
        "base_model": loaded.spec,
        "base_fingerprint": loaded.fingerprint,
        "policy": policy,
        "lora": getattr(loaded.model, "medsam3_lora", None),
        "concepts": sorted(set(concepts)),
        "preprocessing": loaded.backbone.preprocessing(),
        **(extra or {}),
    }


def save_adapter(
    loaded: LoadedModel,
    out_dir: str | os.PathLike,
    policy: str,
    concepts: list[str],
    extra: dict | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the trainable parameters and metadata atomically (the old folder survives a failure).

    ``write_extra(folder)`` may add files (a trainer's optimizer state) inside the same atomic write.
    """
    out_dir = Path(out_dir)
    tensors = trainable_state_dict(loaded.model)
    if not tensors:
        raise ModelSpecError("nothing to save: the model has no trainable parameters")
    meta = adapter_metadata(loaded, policy, concepts, extra)
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
    return out_dir


def read_adapter_metadata(adapter_dir: str | os.PathLike) -> dict:
    adapter_dir = Path(adapter_dir)
    meta_file = adapter_dir / META_FILE
    if not meta_file.is_file():
        raise ModelSpecError(f"{adapter_dir}: not an adapter folder (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"{meta_file}: corrupt adapter metadata ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"{meta_file}: unreadable adapter metadata ({exc})") from exc
    return check_adapter_metadata(meta, meta_file)


def update_adapter_metadata(adapter_dir: str | os.PathLike, **fields) -> None:
    """Add or replace ``fields`` in an adapter's ``adapter.json`` (atomically; the weights are untouched)."""
    adapter_dir = Path(adapter_dir)
    write_json_atomic(adapter_dir / META_FILE, {**read_adapter_metadata(adapter_dir), **fields})


def check_adapter_metadata(meta: object, meta_file: str | os.PathLike = META_FILE) -> dict:
    """Refuse ``adapter.json`` content of the wrong shape, naming the file and the field; returns it.

    Required: ``base_model``, ``base_fingerprint`` (strings) and ``policy`` (a known one). Optional:
    ``lora`` (null or {rank: int >= 1, alpha: number > 0, dropout: 0 <= number < 1}, no other key),
    ``concepts`` (a list of non-empty strings), ``preprocessing`` (an object), ``format``.
    """
    from medsam3.model.policy import POLICIES

    def bad(problem: str) -> ModelSpecError:
        return ModelSpecError(f"{meta_file}: not valid adapter metadata: {problem}")

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    for key in ("base_model", "base_fingerprint", "policy"):
        if key not in meta:
            raise bad(f"'{key}' is missing")
        if not isinstance(meta[key], str) or not meta[key]:
            raise bad(f"'{key}' must be a non-empty string, got {json.dumps(meta[key])[:60]}")
    if meta["policy"] not in POLICIES:
        raise bad(f"unknown policy '{meta['policy']}' (known: {', '.join(POLICIES)})")
    if "format" in meta and not (isinstance(meta["format"], str) and meta["format"].startswith("medsam3-adapter/")):
        raise bad(f"'format' must be 'medsam3-adapter/N', got {json.dumps(meta['format'])[:60]}")
    lora = meta.get("lora")
    if lora is not None:
        if not isinstance(lora, dict):
            raise bad(f"'lora' must be null or an object, got {json.dumps(lora)[:60]}")
        unknown = sorted(set(lora) - set(LoraSettings.__dataclass_fields__))
        if unknown:
            raise bad(f"unknown 'lora' key(s) {', '.join(unknown)} (known: rank, alpha, dropout)")
        rank, alpha, dropout = lora.get("rank", 16), lora.get("alpha", 32), lora.get("dropout", 0.1)
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
            raise bad(f"'lora.rank' must be an integer >= 1, got {json.dumps(rank)[:60]}")
        if not (number(alpha) and alpha > 0):
            raise bad(f"'lora.alpha' must be a number > 0, got {json.dumps(alpha)[:60]}")
        if not (number(dropout) and 0 <= dropout < 1):
            raise bad(f"'lora.dropout' must be a number in [0, 1), got {json.dumps(dropout)[:60]}")
    concepts = meta.get("concepts", [])
    if not isinstance(concepts, list) or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise bad(f"'concepts' must be a list of concept phrases, got {json.dumps(concepts)[:60]}")
    sources = meta.get("mask_sources")
    if sources is not None:
        from medsam3.model.backbones.base import BOX_MODES, TEXT_MASK_SOURCES

        if not isinstance(sources, dict):
            raise bad(f"'mask_sources' must be an object (concept -> source), got {json.dumps(sources)[:60]}")
        for concept, value in sources.items():
            source = value.get("source") if isinstance(value, dict) else value
            if source not in TEXT_MASK_SOURCES:
                raise bad(
                    f"'mask_sources.{concept}' must name one of {', '.join(TEXT_MASK_SOURCES)}, "
                    f"got {json.dumps(source)[:60]}"
                )
            if isinstance(value, dict) and "box" in value and value["box"] not in BOX_MODES:
                raise bad(
                    f"'mask_sources.{concept}.box' must name one of {', '.join(BOX_MODES)}, "
                    f"got {json.dumps(value['box'])[:60]}"
                )
    if "preprocessing" in meta and not isinstance(meta["preprocessing"], (dict, type(None))):
        raise bad(f"'preprocessing' must be an object, got {json.dumps(meta['preprocessing'])[:60]}")
    return meta


def apply_adapter(loaded: LoadedModel, adapter_dir: str | os.PathLike) -> LoadedModel:
    """Lay an adapter onto its base model in place; refuses another base."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_metadata(adapter_dir)
    if meta.get("base_fingerprint") != loaded.fingerprint:
        raise ModelSpecError(
            f"{adapter_dir}: adapter was trained on base '{meta.get('base_model')}' "
            f"(fingerprint {meta.get('base_fingerprint')}), not on '{loaded.spec}' "
            f"(fingerprint {loaded.fingerprint}): load it with --model {meta.get('base_model')}"
        )
    try:
        tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise ModelSpecError(f"{adapter_dir / WEIGHTS_FILE}: cannot read adapter weights ({exc})") from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelSpecError(
                f"{adapter_dir / WEIGHTS_FILE}: parameter {name} holds NaN or infinite values "
                "(a diverged training run?); refusing the adapter"
            )
    lora = LoraSettings(**meta["lora"]) if meta.get("lora") else None
    apply_policy(loaded.model, meta["policy"], lora)
    own = dict(loaded.model.named_parameters())
    missing = sorted(set(tensors) - set(own))
    if missing:
        raise ModelSpecError(f"{adapter_dir}: adapter has parameters the base lacks, e.g. {missing[0]}")
    for name, tensor in tensors.items():
        if own[name].shape != tensor.shape:
            raise ModelSpecError(
                f"{adapter_dir}: parameter {name} has shape {tuple(tensor.shape)}, base has {tuple(own[name].shape)}"
            )
        own[name].data.copy_(tensor.to(own[name].device, own[name].dtype))
    loaded.model.eval()
    loaded.seam.clear_text_cache()
    loaded.adapter = meta
    loaded.concepts = list(meta.get("concepts", []))
    loaded.mask_sources = mask_source_map(meta.get("mask_sources"))
    loaded.box_modes = box_mode_map(meta.get("mask_sources"))
    return loaded
