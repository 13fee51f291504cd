"""Choose each concept's text mask source on validation data, once training has ended.

No single source is right for every concept (measured on real MR: one structure scored Dice 0 from
the dense semantic map on every test slice while the detector's own instances scored 0.62), so the
trainer measures every source the model offers on the validation split, with the best weights, and
records the winner per concept in ``adapter.json`` (``mask_sources``); the predictor's ``auto`` then
uses it. Ties go to the source listed first in ``PREFERENCE`` (the dense map is the cheapest).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medsam3.data.sample import Sample
from medsam3.evaluate.metrics import dice
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt
from medsam3.model.adapter import META_FILE, read_adapter_metadata
from medsam3.model.loading import LoadedModel
from medsam3.utils.files import write_json_atomic

PREFERENCE = ("semantic", "fusion", "box-decoder", "detector")


def available_sources(loaded: LoadedModel) -> list[str]:
    """The text mask sources this model can produce."""
    sources = ["semantic", "fusion", "detector"]
    if loaded.seam.has_box_decoder:
        sources.insert(2, "box-decoder")
    return [s for s in PREFERENCE if s in sources]


@torch.inference_mode()
def measure_mask_sources(
    loaded: LoadedModel, samples: Sequence[Sample], cache=None, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """concept -> source -> mean Dice over the validation samples of that concept (text prompts;
    a sample without the concept scores 1 for an empty answer, 0 for anything else)."""
    loaded.model.eval()
    predictor = Sam3Predictor(loaded)
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    sources = available_sources(loaded)
    for index in range(len(samples) if limit is None else min(limit, len(samples))):
        sample = samples[index]
        if cache is not None:
            predictor.set_embedding(cache.encode([sample.image]), sample.image.shape[:2])
        else:
            predictor.set_image(sample.image)
        for source in sources:
            predictor.mask_source = source
            result = predictor.predict_one(Prompt(sample.concept))
            scores[sample.concept][source].append(dice(result.union, sample.union))
    return {c: {s: float(np.mean(v)) for s, v in per.items()} for c, per in scores.items()}


def choose_mask_sources(
    loaded: LoadedModel, samples: Sequence[Sample], cache=None, limit: int | None = None
) -> dict[str, dict]:
    """concept -> {"source": the best, "dice": {source: validation Dice}, "samples", "positives"}.

    A concept with no validation sample that holds it is left out (nothing to tell the sources apart
    by): the predictor then uses the backbone's default for it.
    """
    measured = measure_mask_sources(loaded, samples, cache=cache, limit=limit)
    counts: dict[str, int] = defaultdict(int)
    positives: dict[str, int] = defaultdict(int)
    for index in range(len(samples) if limit is None else min(limit, len(samples))):
        counts[samples[index].concept] += 1
        positives[samples[index].concept] += int(len(samples[index].masks) > 0)
    choice = {}
    for concept, per in sorted(measured.items()):
        if positives[concept] == 0:
            continue
        best = max(PREFERENCE, key=lambda s: (round(per.get(s, -1.0), 4), -PREFERENCE.index(s)))
        choice[concept] = {
            "source": best,
            "dice": {s: round(d, 4) for s, d in per.items()},
            "samples": counts[concept],
            "positives": positives[concept],
        }
    return choice


def record_mask_sources(adapter_dir: str | Path, choice: dict[str, dict]) -> None:
    """Write the choice into the adapter's ``adapter.json`` (atomically)."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_metadata(adapter_dir)
    meta["mask_sources"] = choice
    write_json_atomic(adapter_dir / META_FILE, meta)
