"""Turn a ``--model`` spec into something ``evaluate_dataset`` can score.

A folder written by ``medsam3 baseline unet`` is the U-Net baseline; anything else is a SAM 3
model spec ("nano", "tiny", "sam3", a hub id, a folder, a sam3.pt) for the SAM 3 predictor,
optionally with a fine-tuned adapter. Both answer ``set_image`` / ``predict`` the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsam3.errors import ModelSpecError
from medsam3.evaluate.baseline_unet import UNetSegmenter, is_unet_run


def load_segmenter(
    spec: str,
    *,
    adapter: str | Path | None = None,
    device: str = "auto",
) -> Any:
    """A segmenter for ``spec``: the U-Net baseline for a U-Net run folder, else ``Sam3Predictor``."""
    if is_unet_run(spec):
        if adapter is not None:
            raise ModelSpecError(f"{spec}: a U-Net baseline takes no SAM 3 adapter")
        return UNetSegmenter.from_dir(spec, device=device)
    from medsam3.infer.segment import build_predictor

    # The dataset's own phrases are scored as they are: no normalisation.
    return build_predictor(spec, adapter=adapter, device=device, normalize=False).predictor
