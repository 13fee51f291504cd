"""What a model is made of: parameters per part under a policy, what is pretrained, where it came from."""

from __future__ import annotations

import os
from pathlib import Path

from medsam3.model import presets
from medsam3.model.components import count_parameters
from medsam3.model.loading import bundled_model_dir, load_model
from medsam3.model.policy import apply_policy, check_policy
from medsam3.model.published.files import sha256_file


def describe_model(
    spec: str, policy: str = "paper", adapter: str | os.PathLike | None = None, towers: str | None = None
) -> str:
    """A printable report: the component table (total / trainable / frozen), preprocessing, provenance."""
    check_policy(policy)
    loaded = load_model(spec, device="cpu", adapter=adapter, towers=towers)
    if adapter is None:
        apply_policy(loaded.model, policy)
    used = loaded.adapter["policy"] if loaded.adapter else policy
    rows = [("component", "total", "trainable", "frozen")]
    rows += [(r.component, f"{r.total:,}", f"{r.trainable:,}", f"{r.frozen:,}") for r in count_parameters(loaded.model)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{spec}: backbone {loaded.backbone.name}, policy {used}"]
    for k, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(row[1:], widths[1:]))]))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    facts = loaded.backbone.preprocessing()
    lines.append(f"input {facts['image_size']} px; resize: {facts['resize']}; normalisation: {facts['normalisation']}")
    p = loaded.precision
    lines.append(f"towers {p.dtype} ({p.reason}), detector {str(loaded.seam.dtype).split('.')[-1]}; "
                 f"config fingerprint {loaded.fingerprint}")  # fmt: skip
    lines.append(f"image tower runs on {p.runtime} ({p.runtime_reason})")
    for source in loaded.backbone.provenance(loaded.model):
        state = "frozen, pretrained" if source.get("frozen") else "trained"
        lines.append(f"weights {source['part']}: {source['source']}" + (f" [{state}]" if "frozen" in source else ""))
    if loaded.concepts:
        lines.append("concepts: " + ", ".join(loaded.concepts))
    lines += training_lines(spec)
    lines += provenance_lines(spec, loaded, adapter)
    return "\n".join(lines)


def training_lines(spec: str) -> list[str]:
    """How a bundled or local model folder was trained, from the record its export wrote (medsam3.json)."""
    import json

    folder = bundled_model_dir(spec) if spec in presets.BUNDLED_PRESETS else Path(spec).expanduser()
    meta_file = folder / "medsam3.json"
    if not meta_file.is_file():
        return []
    meta = json.loads(meta_file.read_text())
    if "recipe" not in meta:
        return []
    data = [*meta.get("dense_sets", []), *meta.get("real_sets", [])]
    kinds = meta.get("phantom_kinds", [])
    lines = [f"trained by: {meta['recipe']}", "training: " + _training_facts(meta)]
    if data or kinds:
        lines.append(
            "training data: " + ", ".join(data) + (f"; phantoms: {', '.join(kinds)}" if kinds else "")
            + (f"; held out: {meta['held_out_concept']}" if meta.get("held_out_concept") else "")
        )
    windows = meta.get("dense_windows")
    if windows:
        lines.append(f"tumour slices under: CT {', '.join(windows['ct'])}; MR {', '.join(windows['mr'])}")
    weights = [f"{n} more {kind} phantoms" for kind, n in meta.get("extra_phantoms", {}).items()]
    weights += [f"{name} {k}x per epoch" for name, k in meta.get("train_repeats", {}).items()]
    if weights:
        lines.append("weighting: " + ", ".join(weights))
    stage = meta.get("continued_from")
    while stage:  # a run started from an earlier export (train_lite.py --init): its stages, latest first
        lines.append(f"continued from: {stage.get('recipe', '?')} ({_training_facts(stage)})")
        stage = stage.get("continued_from")
    return lines


def _training_facts(meta: dict) -> str:
    facts = [
        f"{meta['train_samples']} training samples" if "train_samples" in meta else None,
        f"{meta['val_samples']} validation" if "val_samples" in meta else None,
        f"{meta['steps']} steps" if "steps" in meta else None,
        f"{meta['train_minutes']} minutes" if "train_minutes" in meta else None,
        f"checkpoint: {meta['checkpoint']}" if "checkpoint" in meta else None,
    ]
    return ", ".join(f for f in facts if f)


def _spec_files(spec: str, model) -> tuple[list[str], list[str]]:
    """(how the spec was read, the files its weights came from)."""
    provenance = getattr(model, "medsam3_provenance", None)
    if provenance is not None:
        return provenance.lines(), provenance.files
    folder = bundled_model_dir(spec) if spec in presets.BUNDLED_PRESETS else Path(spec).expanduser()
    if spec in presets.RANDOM_PRESETS or spec in presets.LITE_RANDOM_PRESETS:
        return [f"source: preset '{spec}'", "format: built in memory (random detector weights, seed 0)"], []
    if folder.is_dir():
        files = sorted(str(p) for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
        return [f"source: {folder}", "format: transformers folder (save_pretrained)"], files
    return [f"source: {spec}", "format: Hugging Face hub (files in the hub cache)"], []


def provenance_lines(spec: str, loaded, adapter: str | os.PathLike | None) -> list[str]:
    """Source, format, tensors mapped, LoRA settings and the SHA-256 of every file read."""
    lines, files = _spec_files(spec, loaded.model)
    report = getattr(loaded.model, "medsam3_lora_report", None)
    if report is not None:
        lines += report.lines()
        files = [*files, report.path]
    elif adapter is not None:
        folder = Path(adapter)
        lines.append(f"adapter: {folder} (medsam3 adapter folder)")
        files = [*files, *(str(folder / n) for n in ("adapter.safetensors", "adapter.json") if (folder / n).is_file())]
    lines += [f"sha256 {sha256_file(f)}  {f}" for f in files]
    return lines
