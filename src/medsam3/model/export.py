"""Write a trained model as a self-contained folder that ``load_model(folder)`` reads offline."""

from __future__ import annotations

import json
from pathlib import Path

from medsam3.model.loading import LoadedModel
from medsam3.utils.files import atomic_dir


def export_model(
    loaded: LoadedModel, folder: str | Path, concepts: list[str], info: dict | None = None
) -> Path:
    """save_pretrained (safetensors) + processor + ``medsam3.json`` (concepts, provenance), atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.processor.save_pretrained(tmp)
        meta = {"concepts": sorted(set(concepts)), **(info or {})}
        (tmp / "medsam3.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder
