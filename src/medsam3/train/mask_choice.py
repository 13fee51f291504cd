"""Choose each concept's text mask source on validation data, once training has ended.

No single source is right for every concept (measured on real MR: one structure scored Dice 0 from
the dense semantic map on every test slice while the detector's own instances scored 0.62), so the
trainer measures every source the model offers on the validation split, with the best weights, and
records the winner per concept in ``adapter.json`` (``mask_sources``); the predictor's ``auto`` then
uses it. Ties go to the source listed first in ``PREFERENCE`` (the dense map is the cheapest).

Text + box prompts get the same treatment (``"box"`` in each concept's record): the pretrained box
decoder's outline of the user's box (MedSAM) against the box as an exemplar for the detector with the
concept's chosen text source (SAM 3). A box decoder draws a compact object well and a thin or
scattered one badly (a cortical ribbon, white matter), where the trained detector is far better;
ties go to the outline.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medsam3.data.sample import Sample
from medsam3.evaluate.metrics import balanced_dice, dice
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt
from medsam3.model.adapter import update_adapter_metadata
from medsam3.model.backbones.base import BOX_MODES
from medsam3.model.loading import LoadedModel

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
    """concept -> source -> Dice over the validation samples of that concept (text prompts; a sample
    without the concept scores 1 for an empty answer, 0 for anything else; ``balanced_dice``)."""
    loaded.model.eval()
    predictor = Sam3Predictor(loaded)
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    positive: dict[str, list[bool]] = defaultdict(list)
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
        positive[sample.concept].append(not sample.is_negative)
    return {c: {s: balanced_dice(v, positive[c]) for s, v in per.items()} for c, per in scores.items()}


@torch.inference_mode()
def measure_box_modes(
    loaded: LoadedModel, samples: Sequence[Sample], cache=None, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """concept -> box mode -> mean Dice over the validation samples holding the concept, each prompted
    with its concept and its ground-truth boxes (the T+I paradigm). Uses ``loaded.mask_sources``."""
    loaded.model.eval()
    predictors = {mode: Sam3Predictor(loaded, box_mode=mode) for mode in BOX_MODES}
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for index in range(len(samples) if limit is None else min(limit, len(samples))):
        sample = samples[index]
        if sample.is_negative:
            continue
        embedding = cache.encode([sample.image]) if cache is not None else None
        encoded = predictors["outline"].encode([sample.image])[0] if embedding is None else None  # once for both
        prompt = Prompt(sample.concept, boxes=[tuple(float(v) for v in b) for b in sample.boxes])
        for mode, predictor in predictors.items():
            if embedding is not None:
                predictor.set_embedding(embedding, sample.image.shape[:2])
            else:
                predictor.set_encoded(encoded)
            scores[sample.concept][mode].append(dice(predictor.predict_one(prompt).union, sample.union))
    return {c: {m: float(np.mean(v)) for m, v in per.items()} for c, per in scores.items()}


def choose_mask_sources(
    loaded: LoadedModel, samples: Sequence[Sample], cache=None, limit: int | None = None
) -> dict[str, dict]:
    """concept -> {"source": the best, "dice": {source: validation Dice}, "samples", "positives"}, plus
    {"box": the best box mode, "box_dice": {mode: validation Dice}} for a model with a box decoder.

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
    if loaded.seam.has_box_decoder and choice:
        before = loaded.mask_sources
        loaded.mask_sources = {**before, **{c: v["source"] for c, v in choice.items()}}
        try:
            boxed = measure_box_modes(loaded, samples, cache=cache, limit=limit)
        finally:
            loaded.mask_sources = before
        for concept, per in boxed.items():
            if concept in choice:
                best = max(BOX_MODES, key=lambda m: (round(per.get(m, -1.0), 4), -BOX_MODES.index(m)))
                choice[concept].update(box=best, box_dice={m: round(d, 4) for m, d in per.items()})
    return choice


def record_mask_sources(adapter_dir: str | Path, choice: dict[str, dict]) -> None:
    """Write the choice into the adapter's ``adapter.json`` (atomically)."""
    update_adapter_metadata(adapter_dir, mask_sources=choice)
