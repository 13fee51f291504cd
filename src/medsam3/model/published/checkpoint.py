"""Load a SAM 3 checkpoint file in its owner's layout onto transformers' ``Sam3Model``, strictly.

Layouts recognised (from the tensors' names, never from the file name):

- Meta's release files: keys ``detector.*`` (the image model) and ``tracker.*`` (the video
  tracker): SAM 3's ``sam3.pt``. SAM 3.1's ``sam3.1_multiplex.pt`` keeps the detector names but its
  neck has three levels (``convs.0-2``), the tracker neck became ``interactive_convs`` and
  ``propagation_convs`` (SAM 3: ``sam2_convs``) and the tracker moved under ``tracker.model.*``.
- Meta's trainer checkpoints (``{"model": state_dict, "optimizer": ..., "epoch": ...}``) and plain
  ``Sam3Image`` state dicts, with no ``detector.`` prefix: Medical-SAM3's ``checkpoint_2D.pt``.
- transformers' own names (``Sam3Model``, or ``detector_model.*`` of ``Sam3VideoModel``), e.g. a
  ``model.safetensors`` taken out of its folder.

Strict means: every tensor of the file is either loaded into a parameter, or belongs to one of the
named groups below that the image model has no place for (counted in ``medsam3 info``), and every
parameter of the model is loaded; otherwise the load fails with one line naming the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Sam3Config, Sam3Model

from medsam3.errors import ModelSpecError
from medsam3.model.published.files import read_tensor_file
from medsam3.model.published.meta_names import MetaSource, source_plan

# Tensors of Meta's checkpoints that transformers' image model has no place for, by design.
SKIPPED_GROUPS: list[tuple[str, str]] = [
    (
        r"backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis",
        "ViT rotary tables (transformers recomputes them)",
    ),
    (
        r"geometry_encoder\.points_(direct|pool|pos_enc)_project\.(weight|bias)",
        "point-prompt projections (Sam3Model takes boxes, not points)",
    ),
    (r"backbone\.vision_backbone\.sam2_convs\..+", "SAM 3 tracker neck (video)"),
    (
        r"backbone\.vision_backbone\.(interactive|propagation)_convs\..+",
        "SAM 3.1 interactive/propagation necks (video)",
    ),
    (r"inst_interactive_predictor\..+", "SAM 1-task interactive predictor"),
]
_SKIPPED = [(re.compile(pattern), why) for pattern, why in SKIPPED_GROUPS]
_SAM31_MARKERS = ("backbone.vision_backbone.interactive_convs.", "backbone.vision_backbone.propagation_convs.")
_UNUSED_LAST_LEVEL = re.compile(r"vision_encoder\.neck\.fpn_layers\.(\d+)\..+")


@dataclass
class Provenance:
    """What a model was loaded from and how; ``medsam3 info`` prints it."""

    source: str
    format: str
    files: list[str] = field(default_factory=list)
    tensors_in_file: int = 0
    tensors_used: int = 0
    parameters_loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # group -> number of tensors
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"source: {self.source}", f"format: {self.format}"]
        out.append(
            f"tensors: {self.tensors_used} of {self.tensors_in_file} in the file mapped onto "
            f"{self.parameters_loaded} Sam3Model parameters"
        )
        out += [f"  skipped by design: {count} x {group}" for group, count in self.skipped.items()]
        out += [f"  note: {note}" for note in self.notes]
        return out


def skipped_group(key: str) -> str | None:
    """The named group a Meta key belongs to when the image model has no place for it."""
    for pattern, why in _SKIPPED:
        if pattern.fullmatch(key):
            return why
    return None


def _unwrap(obj: dict, path: Path) -> tuple[dict, list[str]]:
    """The state dict inside a checkpoint, and the names of the trainer state beside it."""
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            return obj[wrapper], sorted(k for k in obj if k != wrapper)
    return obj, []


def _config_for(path: Path) -> tuple[Sam3Config, str]:
    """The architecture: a ``config.json`` beside the file (as the hub repos ship it), else SAM 3's published one."""
    config_file = path.parent / "config.json"
    if not config_file.is_file():
        return Sam3Config(), "SAM 3's published architecture (transformers' Sam3Config defaults)"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"{config_file}: not a readable config ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("detector_config"), dict):  # Sam3VideoConfig
        data = data["detector_config"]
    if not isinstance(data, dict) or data.get("model_type") not in ("sam3", None):
        raise ModelSpecError(f"{config_file}: not a SAM 3 config (model_type {data.get('model_type')!r})")
    try:
        return Sam3Config.from_dict(data), f"{config_file}"
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"{config_file}: not a usable SAM 3 config ({exc})") from exc


def _split_layout(state: dict, path: Path) -> tuple[dict, dict[str, int], str, bool]:
    """(image-model tensors, skipped groups, layout name, uses transformers' names)."""
    skipped: dict[str, int] = {}
    keys = list(state)
    if any(k.startswith("detector_model.") for k in keys) or any(k.startswith("vision_encoder.") for k in keys):
        image = {}
        for key, value in state.items():
            if key.startswith(("tracker_model.", "tracker_neck.")):
                skipped["Sam3VideoModel tracker (video)"] = skipped.get("Sam3VideoModel tracker (video)", 0) + 1
            else:
                image[key.removeprefix("detector_model.")] = value
        return image, skipped, "transformers Sam3Model names", True
    if any(k.startswith("detector.") for k in keys):
        image = {}
        for key, value in state.items():
            if key.startswith("detector."):
                image[key.removeprefix("detector.")] = value
            elif key.startswith("tracker."):
                group = "video tracker (tracker.*)"
                skipped[group] = skipped.get(group, 0) + 1
            else:
                raise ModelSpecError(
                    f"{path}: key '{key}' is neither detector.* nor tracker.*: not Meta's SAM 3 release layout"
                )
        sam31 = any(k.startswith(_SAM31_MARKERS) for k in image) or any(k.startswith("tracker.model.") for k in keys)
        layout = (
            "Meta SAM 3.1 release (detector.* / tracker.model.*)"
            if sam31
            else "Meta SAM 3 release (detector.* / tracker.*)"
        )
        return image, skipped, layout, False
    sam31 = any(k.startswith(_SAM31_MARKERS) for k in keys)
    return (
        dict(state),
        skipped,
        ("Meta SAM 3.1 image model" if sam31 else "Meta SAM 3 image model (Sam3Image state dict)"),
        False,
    )


def _problem_line(path: Path, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 1} more {label})" if len(items) > 1 else ""
            parts.append(f"{label}: {items[0]}{more}")
    return f"{path}: does not match the SAM 3 layout: " + "; ".join(parts)


def _new_model(config: Sam3Config) -> Sam3Model:
    """An uninitialised model (every parameter is overwritten next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the random init
        return Sam3Model(config)
    with no_init_weights():
        return Sam3Model(config)


def load_sam3_checkpoint(path: str | Path) -> tuple[Sam3Model, Provenance]:
    """Build ``Sam3Model`` from a checkpoint file in any layout above; fails naming the first bad key."""
    path = Path(path)
    return sam3_from_checkpoint(read_tensor_file(path), path)


def sam3_from_checkpoint(raw: dict, path: Path) -> tuple[Sam3Model, Provenance]:
    """:func:`load_sam3_checkpoint` on an object already read (``path`` names it in messages, finds config.json)."""
    state, trainer_state = _unwrap(raw, path)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelSpecError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
    image, skipped, layout, hf_names = _split_layout(state, path)
    config, config_origin = _config_for(path)
    sam31 = "3.1" in layout
    with torch.device("meta"):  # names and shapes only: a bad file fails before 3 GB are allocated
        wanted = Sam3Model(config).state_dict()
    scales = list(config.vision_config.scale_factors)
    notes = [f"architecture: {config_origin}"]
    if trainer_state:
        notes.append("trainer state beside the weights, not used: " + ", ".join(trainer_state))

    loaded: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    shapes: list[str] = []
    used: set[str] = set()
    if hf_names:
        plan: dict[str, MetaSource] = {name: MetaSource(name) for name in wanted}
    else:
        plan, unmapped = source_plan(list(wanted), scales)
        if unmapped:  # a transformers version with parameters this table does not know
            raise ModelSpecError(f"{path}: Sam3Model parameter '{unmapped[0]}' has no counterpart in Meta's layout")
    zero_level = None
    if sam31 and not hf_names:
        # SAM 3.1's detector neck has the 4x, 2x and 1x levels only. transformers computes a fourth,
        # 0.5x level and drops it before use (Sam3Model.forward: fpn_hidden_states[:-1]), so that
        # level has no weights to load: it is set to zero and named here.
        zero_level = len(scales) - 1
    for name, target in wanted.items():
        source = plan[name]
        level = _UNUSED_LAST_LEVEL.fullmatch(name)
        if zero_level is not None and level and int(level.group(1)) == zero_level and source.key not in image:
            loaded[name] = torch.zeros(target.shape, dtype=target.dtype)
            continue
        if source.key not in image:
            missing.append(source.key if hf_names else f"{source.key} (for {name})")
            continue
        used.add(source.key)
        try:
            value = source.take(image[source.key])
        except ValueError as exc:
            shapes.append(str(exc))
            continue
        if tuple(value.shape) != tuple(target.shape):
            shapes.append(f"{source.key} gives {tuple(value.shape)}, {name} needs {tuple(target.shape)}")
            continue
        loaded[name] = value.to(target.dtype)
    unexpected = []
    for key in image:
        if key in used:
            continue
        group = None if hf_names else skipped_group(key)
        if group is None:
            unexpected.append(key)
        else:
            skipped[group] = skipped.get(group, 0) + 1
    if missing or unexpected or shapes:
        raise ModelSpecError(_problem_line(path, sorted(missing), sorted(unexpected), shapes))
    if zero_level is not None:
        notes.append(
            f"fpn_layers.{zero_level} (the 0.5x level Sam3Model computes and discards) has no weights in SAM 3.1: zeros"
        )
    for key, value in loaded.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelSpecError(f"{path}: tensor for {key} holds NaN or infinite values")
    model = _new_model(config)
    model.load_state_dict(loaded, strict=True)
    model.eval()
    provenance = Provenance(
        source=str(path),
        format=layout,
        files=[str(path)] + ([str(path.parent / "config.json")] if (path.parent / "config.json").is_file() else []),
        tensors_in_file=len(state),
        tensors_used=len(used),
        parameters_loaded=len(loaded),
        skipped=skipped,
        notes=notes,
    )
    return model, provenance
