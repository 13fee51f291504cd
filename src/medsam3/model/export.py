"""Write a trained model as a self-contained folder that ``load_model(folder)`` reads offline."""

from __future__ import annotations

import json
from pathlib import Path

from medsam3.model.backbones.lite import is_lite_config, save_lite_folder
from medsam3.model.loading import LoadedModel
from medsam3.utils.files import atomic_dir


def export_model(loaded: LoadedModel, folder: str | Path, concepts: list[str], info: dict | None = None) -> Path:
    """Weights (safetensors) + preprocessing + ``medsam3.json`` (concepts, provenance), atomically.

    SAM 3 models use save_pretrained; lite models store only their trained parts (the pretrained
    towers come from their pinned packages).
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        if is_lite_config(loaded.model.config):
            save_lite_folder(loaded.model, tmp)
        else:
            loaded.model.save_pretrained(tmp)
            loaded.processor.save_pretrained(tmp)
        meta = {"concepts": sorted(set(concepts)), **(info or {})}
        (tmp / "medsam3.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder
