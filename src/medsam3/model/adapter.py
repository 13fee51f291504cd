"""Adapter checkpoints: only what a fine-tune changed, bound to the base it was trained on.

An adapter folder holds ``adapter.safetensors`` (the parameters the policy trains, nothing
else) and ``adapter.json`` (base model spec, base config fingerprint, policy, LoRA settings,
concept vocabulary, preprocessing). Loading refuses a base whose architecture differs. Weights are
read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import medsam3
from medsam3.errors import ModelSpecError
from medsam3.model.loading import LoadedModel
from medsam3.model.policy import LoraSettings, apply_policy, trainable_state_dict
from medsam3.utils.files import atomic_dir

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
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
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
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"{meta_file}: corrupt adapter metadata ({exc.msg})") from exc


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
    return loaded
