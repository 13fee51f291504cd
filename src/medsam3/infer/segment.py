"""Segment one image by naming concepts: the library behind ``medsam3 segment``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsam3.data.vocabulary import MAX_WORDS
from medsam3.data.windowing import as_rgb_uint8
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Box, Prompt, PromptResult, as_prompts
from medsam3.model.concepts import normalize_prompt, normalizer_for
from medsam3.model.presets import DEFAULT_MODEL
from medsam3.utils.files import atomic_files, write_json_atomic
from medsam3.utils.outputs import check_output_folder, unique_stems


@dataclass
class Segmentation:
    """All prompts' results for one image, and what is needed to write them."""

    image: np.ndarray  # (H, W, 3) uint8, what the model saw
    results: list[PromptResult]
    source: str
    model: str
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)
    normalization: list[dict] = field(default_factory=list)
    precision: dict | None = None  # the frozen towers' dtype and why (medsam3.model.precision)


def build_prompts(
    texts: list[str], boxes: list[Box] = (), negative_boxes: list[Box] = ()
) -> tuple[list[Prompt], list[str]]:
    """One Prompt per phrase; every box applies to every phrase. Returns prompts and warnings."""
    notes = []
    box_list = list(boxes) + list(negative_boxes)
    labels = [1] * len(boxes) + [0] * len(negative_boxes)
    prompts = [Prompt(t, boxes=tuple(box_list), box_labels=tuple(labels)) for t in texts]
    for prompt in prompts:
        if prompt.word_count > MAX_WORDS:
            notes.append(
                f"prompt '{prompt.text}' has {prompt.word_count} words: MedSAM-3 is tuned on concept phrases "
                f"of at most {MAX_WORDS} words, so results may be poor"
            )
    return prompts, notes


def normalize_prompts(prompts: list[Prompt], concepts: list[str]) -> tuple[list[Prompt], list[dict], list[str]]:
    """Map phrases outside the model's concept vocabulary to the nearest trained concept.

    The paper shows wording alone moves Dice from 0 to 0.68, so a phrase the weights never saw is
    replaced by its nearest known concept (synonym table, then sentence embeddings). Models without a
    recorded vocabulary (open-vocabulary SAM 3) keep every phrase as typed.
    """
    if not concepts:
        return prompts, [], []
    normalizer = normalizer_for(concepts)
    out, records, notes = [], [], []
    for prompt in prompts:
        found = normalize_prompt(prompt.text, normalizer)
        records.append(found.to_json())
        if found.changed:
            notes.append(
                f"'{found.asked}' is not a trained concept; using '{found.used}' "
                f"({found.via}, similarity {found.similarity:.2f})"
            )
            prompt = Prompt(found.used, prompt.boxes, prompt.box_labels)
        out.append(prompt)
    return out, records, notes


@dataclass
class PredictorSetup:
    """A predictor ready for its prompts: what :func:`build_predictor` returns."""

    predictor: Sam3Predictor
    prompts: list[Prompt]  # as the model will answer them (normalised unless told not to)
    notes: list[str]  # one line per phrase the normaliser replaced
    normalization: list[dict]  # the ``normalization`` records of result.json

    @property
    def loaded(self):
        return self.predictor.loaded


def build_predictor(
    model: str = DEFAULT_MODEL,
    prompts: Sequence[Prompt | str] = (),
    *,
    adapter: str | Path | None = None,
    device: str = "auto",
    normalize: bool = True,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    nms_iou: float | None = None,
    mask_source: str = "auto",
    towers: str | None = None,
    runtime: str | None = None,
) -> PredictorSetup:
    """The one way to get a predictor: load ``model`` (+ ``adapter``) and, with ``normalize``, map
    ``prompts`` onto the concepts it was tuned on (:func:`normalize_prompts`).

    Used by segment, segment-volume, segment-video, evaluate and the agent alike.
    """
    predictor = Sam3Predictor.from_spec(
        model,
        device=device,
        adapter=adapter,
        score_threshold=score_threshold,
        mask_threshold=mask_threshold,
        nms_iou=nms_iou,
        mask_source=mask_source,
        towers=towers,
        runtime=runtime,
    )
    prompts = as_prompts(prompts) if prompts else []
    records: list[dict] = []
    notes: list[str] = []
    if normalize and prompts:
        prompts, records, notes = normalize_prompts(prompts, predictor.loaded.concepts)
    return PredictorSetup(predictor, prompts, notes, records)


def segment_image(
    image: np.ndarray,
    prompts: list[Prompt],
    predictor: Sam3Predictor,
    *,
    source: str = "<array>",
) -> Segmentation:
    """Encode ``image`` once and answer every prompt."""
    rgb = as_rgb_uint8(image, source)
    predictor.set_image(rgb)
    results = predictor.predict(prompts)
    adapter = predictor.loaded.adapter
    return Segmentation(
        image=rgb,
        results=results,
        source=source,
        model=predictor.loaded.spec,
        adapter=None if adapter is None else str(adapter.get("path", "")) or None,
        precision=predictor.loaded.precision.to_json(),
    )


def slug(text: str) -> str:
    """A file-name-safe form of a phrase ('breast tumor' -> 'breast_tumor')."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "prompt"


def instance_label_map(result: PromptResult) -> np.ndarray:
    """Instances as one uint16 map (1 = best-scoring instance); overlaps go to the higher score."""
    labels = np.zeros(result.masks.shape[1:], dtype=np.uint16)
    for index in range(len(result) - 1, -1, -1):
        labels[result.masks[index]] = index + 1
    return labels


#: The fixed files of a segmentation folder; per prompt: ``STEM.png`` and ``STEM_instances.png``.
FIXED_OUTPUTS = ("overlay.png", "result.json")
MASK_PATTERNS = ("{}.png", "{}_instances.png")


def output_stems(texts: Sequence[str]) -> list[str]:
    """Collision-free file stems for prompt phrases: ``slug`` made unique (``x``, ``x_2``), never
    producing a fixed output's name (a prompt called 'overlay' gets ``overlay_2.png``)."""
    return unique_stems([slug(t) for t in texts], patterns=MASK_PATTERNS, reserved=FIXED_OUTPUTS)


def check_segmentation_output(
    out_dir: str | Path, texts: Sequence[str], inputs: Sequence[str | Path | None] = ()
) -> list[str]:
    """Refuse an output folder before any work (see :mod:`medsam3.utils.outputs`); returns the stems."""
    stems = output_stems(texts)
    files = [*FIXED_OUTPUTS, *(p.format(stem) for stem in stems for p in MASK_PATTERNS)]
    check_output_folder(out_dir, inputs=inputs, files=files)
    return stems


def write_segmentation(seg: Segmentation, out_dir: str | Path, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Write a mask PNG per prompt, an instance map, an overlay and ``result.json``, all or nothing.

    The folder is checked first (``inputs``, default the segmentation's source image, are never
    overwritten); the files are written to temporaries and moved into place together at the end,
    ``result.json`` last, so a failure (a full disk) leaves earlier files untouched.
    """
    from medsam3.data.image_io import save_png
    from medsam3.visualize import overlay

    out_dir = Path(out_dir)
    sources = list(inputs) or ([seg.source] if Path(seg.source).exists() else [])
    stems = check_segmentation_output(out_dir, [r.prompt.text for r in seg.results], sources)
    masks = [r.union for r in seg.results]
    labels = [f"{r.prompt.text} ({len(r)})" for r in seg.results]
    boxes = [b for r in seg.results for b in r.boxes.tolist()]
    box_owner = [i for i, r in enumerate(seg.results) for _ in range(len(r))]
    picture = overlay(seg.image, masks, labels=labels, boxes=boxes or None, box_masks=box_owner or None, legend=True)
    entries = []
    with atomic_files() as files:
        for result, name in zip(seg.results, stems, strict=True):
            save_png(files.path(out_dir / f"{name}.png"), result.union)
            save_png(files.path(out_dir / f"{name}_instances.png"), instance_label_map(result))
            entry = result.to_json(mask_file=f"{name}.png")
            entry["instance_map"] = f"{name}_instances.png"
            entries.append(entry)
        save_png(files.path(out_dir / "overlay.png"), picture)
        write_json_atomic(
            files.path(out_dir / "result.json"),
            {
                "image": seg.source,
                "model": seg.model,
                "adapter": seg.adapter,
                "precision": seg.precision,
                "image_size": list(seg.image.shape[:2]),
                "overlay": "overlay.png",
                "notes": seg.notes,
                "normalization": seg.normalization,
                "prompts": entries,
            },
            allow_nan=False,
        )
    return out_dir


def segment_path(
    image: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    adapter: str | Path | None = None,
    boxes: Sequence[Box] = (),
    negative_boxes: Sequence[Box] = (),
    slice_index: int | None = None,
    axis: int = 0,
    window: str | None = None,
    device: str = "auto",
    normalize: bool = True,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    nms_iou: float | None = None,
    predictor: Sam3Predictor | None = None,
    mask_source: str = "auto",
) -> Segmentation:
    """``medsam3 segment`` as a function: read ``image``, segment each phrase, write ``out``.

    Every box (``boxes`` positive, ``negative_boxes`` negative exemplars) applies to every phrase.
    The output folder is checked before any work, and again
    for the phrases the model will answer once they are normalised. ``predictor`` reuses a loaded
    one (``model``/``adapter``/``device``/thresholds are then its own). The notes (over-long
    phrases, replaced phrases) are in ``Segmentation.notes`` and ``result.json``.
    """
    from medsam3.data.image_io import read_image

    built, notes = build_prompts([str(p) for p in prompts], list(boxes), list(negative_boxes))
    check_segmentation_output(out, [p.text for p in built], [image])
    picture = read_image(image, slice_index=slice_index, axis=axis, window=window)
    records: list[dict] = []
    if predictor is None:
        setup = build_predictor(
            model,
            built,
            adapter=adapter,
            device=device,
            normalize=normalize,
            score_threshold=score_threshold,
            mask_threshold=mask_threshold,
            nms_iou=nms_iou,
            mask_source=mask_source,
        )
        predictor, built, records = setup.predictor, setup.prompts, setup.normalization
        notes += setup.notes
    elif normalize:
        built, records, renamed = normalize_prompts(built, predictor.loaded.concepts)
        notes += renamed
    check_segmentation_output(out, [p.text for p in built], [image])  # the phrases the model will answer
    result = segment_image(picture.rgb, built, predictor, source=str(image))
    result.notes.extend(notes)
    result.normalization = records
    write_segmentation(result, out, inputs=[image])
    return result
