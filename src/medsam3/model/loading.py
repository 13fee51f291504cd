"""Turn a model spec into a ready model behind its seam.

A spec is one of: a preset name (``lite``, ``lite-init``, ``tiny``, ``nano``, ``sam3``,
``sam3-random``), a local folder written by ``save_pretrained`` or :func:`export_model`, a checkpoint
file in its owner's layout (Meta's ``sam3.pt``, SAM 3.1's ``sam3.1_multiplex.pt``, Medical-SAM3's
``checkpoint_2D.pt``; see :mod:`medsam3.model.published`), or a Hugging Face hub id
(``facebook/sam3``). An adapter may be laid on top: a folder written by ``medsam3 train`` (see
:mod:`medsam3.model.adapter`) or the MedSAM3-v1 authors' LoRA file (merged into the weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

from medsam3.errors import ModelSpecError
from medsam3.model import presets
from medsam3.model.adapter import apply_adapter
from medsam3.model.backbones.lite import LiteSam3Model, is_lite_config, load_lite_folder, quiet_placeholder_config
from medsam3.model.loaded import LoadedModel, box_mode_map, mask_source_map
from medsam3.model.precision import choose_precision, default_towers
from medsam3.model.published.checkpoint import load_sam3_checkpoint
from medsam3.model.published.files import TORCH_SUFFIXES
from medsam3.model.published.lora import merge_medsam3_lora
from medsam3.model.runtime import choose_runtime, default_runtime
from medsam3.model.tokenizer import build_clip_tokenizer

CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without it is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"--device {device}: no CUDA GPU is available here (use cpu or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelSpecError(f"unknown device '{device}': use auto, cpu or cuda[:N]")
    return torch.device(device)


def offline_processor(image_size: int) -> Sam3Processor:
    """SAM 3's processor with the offline CLIP tokenizer, for a model of this input size."""
    image_processor = Sam3ImageProcessor(size={"height": image_size, "width": image_size})
    return Sam3Processor(image_processor=image_processor, tokenizer=build_clip_tokenizer())


def random_model(config: Sam3Config, seed: int = 0) -> Sam3Model:
    """A randomly initialised model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Sam3Model(config)


def bundled_model_dir(name: str) -> Path:
    return Path(str(resources.files("medsam3.model") / "weights" / name))


def _load_folder(folder: Path) -> tuple[Sam3Model, Sam3Processor | None]:
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"{folder}: not a model folder (no config.json written by save_pretrained)")
    try:
        with quiet_placeholder_config():
            config = Sam3Config.from_json_file(str(folder / "config.json"))
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"{folder / 'config.json'}: not a readable model config ({exc})") from exc
    if is_lite_config(config):
        return load_lite_folder(folder, config), None
    try:
        model = Sam3Model.from_pretrained(folder, dtype=torch.float32)
    except pickle.UnpicklingError as exc:  # torch's weights_only loader refused it: nothing was executed
        raise ModelSpecError(
            f"{folder}: refusing its pickled weights (pytorch_model.bin holds more than tensors); "
            "use a folder with model.safetensors"
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelSpecError(f"{folder}: cannot load a SAM 3 model: {str(exc).splitlines()[0]}") from exc
    has_processor = (folder / "processor_config.json").is_file() or (folder / "tokenizer_config.json").is_file()
    processor = Sam3Processor.from_pretrained(folder) if has_processor else offline_processor(model.config.image_size)
    return model, processor


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so that offline machines fail in seconds, not minutes."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(repo_id: str) -> tuple[Sam3Model, Sam3Processor]:
    """Load from the hub (or its local cache when the hub cannot be reached)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not _hub_reachable()
    try:
        model = Sam3Model.from_pretrained(repo_id, local_files_only=offline)
        processor = Sam3Processor.from_pretrained(repo_id, local_files_only=offline)
    except Exception as exc:  # hub errors come in many classes; all mean "not available to you"
        reason = (
            "the hub cannot be reached from this machine and it is not in the local cache"
            if offline
            else (f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        )
        gated = (
            f"{repo_id} is gated: request access on its hub page and log in with `hf auth login`; "
            if repo_id == presets.SAM3_HUB_ID
            else ""
        )
        raise ModelSpecError(
            f"cannot load '{repo_id}' from the Hugging Face hub ({reason}). {gated}Alternatives: pass a "
            "local folder written by save_pretrained (--model DIR), Meta's sam3.pt (--model sam3.pt), or the "
            "bundled 'nano' preset"
        ) from exc
    return model, processor


def load_original_checkpoint(checkpoint: Path) -> Sam3Model:
    """A checkpoint file in its owner's layout (Meta's sam3.pt, SAM 3.1, Medical-SAM3...), loaded strictly.

    The model carries where it came from as ``medsam3_provenance`` (see :mod:`medsam3.model.published`).
    """
    model, provenance = load_sam3_checkpoint(checkpoint)
    model.medsam3_provenance = provenance
    return model


def apply_adapter_spec(loaded: LoadedModel, adapter: str | os.PathLike, lora_alpha: float | None = None) -> None:
    """An adapter folder written by ``medsam3 train``, or the MedSAM3-v1 authors' LoRA file (merged)."""
    path = Path(adapter).expanduser()
    if path.is_dir() or not path.exists():
        apply_adapter(loaded, path)
        return
    if is_lite_config(loaded.model.config):
        raise ModelSpecError(
            f"{path}: a MedSAM3-v1 LoRA file needs a SAM 3 base (--model sam3.pt, facebook/sam3 or a SAM 3 folder), "
            f"not '{loaded.spec}'"
        )
    report = merge_medsam3_lora(loaded.model, path, alpha=lora_alpha)
    loaded.model.eval()
    loaded.seam.clear_text_cache()
    loaded.adapter = {
        "format": "medsam3-v1-lora",
        "path": str(path),
        "policy": "merged LoRA (MedSAM3-v1)",
        "medsam3_v1_lora": report.to_json(),
        "concepts": [],
    }
    loaded.model.medsam3_lora_report = report


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    adapter: str | os.PathLike | None = None,
    towers: str | None = None,
    runtime: str | None = None,
) -> LoadedModel:
    """Load a model from a spec (see module docstring) in eval mode on ``device``.

    ``dtype`` is the detector's (what trains); ``towers`` the frozen pretrained encoders' (``auto``
    picks bf16 where it was measured faster on this machine, see :mod:`medsam3.model.precision`;
    None: the process default, fp32 unless the CLI's ``--dtype`` set it). ``runtime`` runs the frozen
    image tower with ``torch`` or ``openvino`` (``auto``: OpenVINO on CPU where the backbone exports its
    tower, see :mod:`medsam3.model.runtime`; None: the process default, torch unless ``--runtime`` set it).
    """
    spec = str(spec)
    if not spec.strip():
        raise ModelSpecError(
            "empty model spec: use a preset (" + ", ".join(presets.PRESET_NAMES) + "), a folder or a hub id"
        )
    path = Path(spec).expanduser()
    concepts: list[str] = []
    if spec in presets.RANDOM_PRESETS:
        model = random_model(presets.RANDOM_PRESETS[spec]())
        processor = offline_processor(model.config.image_size)
    elif spec in presets.LITE_RANDOM_PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, processor = LiteSam3Model(presets.LITE_RANDOM_PRESETS[spec]()), None
    elif spec in presets.BUNDLED_PRESETS:
        folder = bundled_model_dir(spec)
        if not (folder / "config.json").is_file():
            raise ModelSpecError(f"the bundled '{spec}' weights are missing from this install ({folder})")
        model, processor = _load_folder(folder)
        concepts = _read_concepts(folder)
    elif spec in presets.HUB_PRESETS:
        model, processor = _load_hub(presets.HUB_PRESETS[spec])
    elif path.is_dir():
        model, processor = _load_folder(path)
        concepts = _read_concepts(path)
    elif path.suffix in CHECKPOINT_SUFFIXES:
        model = load_original_checkpoint(path)
        processor = offline_processor(model.config.image_size)
    elif path.exists():
        raise ModelSpecError(
            f"{path}: not a model folder, nor a checkpoint file (.pt, .pth, .bin, .ckpt, .safetensors)"
        )
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        model, processor = _load_hub(spec)
    else:
        raise ModelSpecError(
            f"unknown model '{spec}': use a preset ({', '.join(presets.PRESET_NAMES)}), a folder written by "
            "save_pretrained, a checkpoint file (sam3.pt, .pth, .safetensors), or a hub id like facebook/sam3"
        )
    target = resolve_device(device)
    model = model.to(device=target, dtype=dtype).eval()
    loaded = LoadedModel(model=model, processor=processor, spec=spec, device=target, concepts=concepts)
    if spec in presets.BUNDLED_PRESETS or path.is_dir():
        recorded = read_recorded_sources(bundled_model_dir(spec) if spec in presets.BUNDLED_PRESETS else path)
        loaded.mask_sources, loaded.box_modes = mask_source_map(recorded), box_mode_map(recorded)
    precision = choose_precision(towers or default_towers(), target, loaded.backbone.bf16_fidelity)
    exportable = loaded.backbone.exportable_tower(model) is not None
    engine = choose_runtime(runtime or default_runtime(), target, exportable)
    precision = dataclasses.replace(precision, runtime=engine.name, runtime_reason=engine.reason)
    loaded.precision = precision
    if adapter is not None:
        apply_adapter_spec(loaded, adapter)
    if precision.torch_dtype != dtype:
        loaded.seam.set_tower_dtype(precision.torch_dtype)
    loaded.seam.set_runtime(engine.name)
    return loaded


def _read_concepts(folder: Path) -> list[str]:
    """The concept vocabulary a model folder was trained on (``medsam3.json``), if recorded."""
    meta = folder / "medsam3.json"
    if meta.is_file():
        return list(json.loads(meta.read_text()).get("concepts", []))
    return []


def read_recorded_sources(folder: Path) -> dict | None:
    """Each concept's measured mask source and box mode, as training recorded them (``medsam3.json``)."""
    meta = folder / "medsam3.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("mask_sources")
    return None
