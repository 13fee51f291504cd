"""Look at a dataset before training on it: counts per concept and split, and a picture of samples.

``medsam3 data inspect DIR`` prints, for every concept and split, how many images (or slices)
there are, how many show the concept, how many are empty (negatives) and how many instances they
hold, then writes a PNG grid of samples with their masks overlaid, so a wrong label mapping or
a flipped mask is seen at once rather than after a day of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.data.dataset import ConceptDataset, open_dataset
from medsam3.data.layouts.base import SkippedFile
from medsam3.data.splits import SPLITS, stable_seed
from medsam3.errors import DatasetError, MedSAM3Error
from medsam3.utils.outputs import check_output_file


@dataclass
class ConceptCounts:
    """Counts for one (concept, split)."""

    concept: str
    split: str
    images: int = 0
    positives: int = 0
    negatives: int = 0
    instances: int = 0
    cases: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DatasetSummary:
    """What ``inspect_dataset`` found; ``str()`` is the printable table."""

    root: Path
    layout: str
    rows: list[ConceptCounts]
    cases: dict[str, int]
    samples: int
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    grid_path: Path | None = None

    def row(self, concept: str, split: str) -> ConceptCounts | None:
        return next((r for r in self.rows if r.concept == concept and r.split == split), None)

    def total(self, concept: str) -> ConceptCounts:
        """A concept's counts summed over splits (``cases`` too: a case is in one split only)."""
        total = ConceptCounts(concept, "all")
        for r in self.rows:
            if r.concept == concept:
                total.images += r.images
                total.positives += r.positives
                total.negatives += r.negatives
                total.instances += r.instances
                total.cases += r.cases
        return total

    def to_table(self) -> str:
        header = ("concept", "split", "cases", "images", "with concept", "empty", "instances")
        lines = [header]
        for r in self.rows:
            lines.append(
                (
                    r.concept,
                    r.split,
                    str(r.cases),
                    str(r.images),
                    str(r.positives),
                    str(r.negatives),
                    str(r.instances),
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [
            f"{self.root} ({self.layout} layout): {self.samples} samples, "
            + ", ".join(f"{n} {s} cases" for s, n in self.cases.items())
        ]
        for i, line in enumerate(lines):
            cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])] + [
                c.rjust(w) for c, w in zip(line[2:], widths[2:], strict=True)
            ]
            text.append("  ".join(cells).rstrip())
            if i == 0:
                text.append("  ".join("-" * w for w in widths))
        if self.skipped:
            text.append(f"skipped {len(self.skipped)} bad file(s):")
            text += [f"  {s.path}: {s.problem}" for s in self.skipped[:20]]
            if len(self.skipped) > 20:
                text.append(f"  ... and {len(self.skipped) - 20} more")
        text += [f"note: {n}" for n in self.notes]
        if self.grid_path is not None:
            text.append(f"sample grid: {self.grid_path}")
        return "\n".join(text)

    __str__ = to_table

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "samples": self.samples,
            "cases": self.cases,
            "rows": [r.to_json() for r in self.rows],
            "skipped": [{"path": s.path, "problem": s.problem} for s in self.skipped],
            "notes": list(self.notes),
            "grid": str(self.grid_path) if self.grid_path else None,
        }


def count_dataset(dataset: ConceptDataset, count_instances: bool = True) -> DatasetSummary:
    """Counts per concept and split. Instances need the masks decoded (images are not)."""
    rows: dict[tuple[str, str], ConceptCounts] = {}
    case_sets: dict[tuple[str, str], set[str]] = {}
    skipped = list(dataset.skipped)
    skip_bad = dataset.info.skip_bad
    for ref in dataset.refs:
        split = ref.split or "train"
        key = (ref.concept, split)
        row = rows.setdefault(key, ConceptCounts(ref.concept, split))
        case_sets.setdefault(key, set()).add(ref.case_id)
        if count_instances:
            try:
                n = len(ref.load_masks(dataset.instances, dataset.min_instance_area))
            except MedSAM3Error as error:
                if not skip_bad:
                    raise
                path = str(getattr(error, "path", "") or ref.source)
                skipped.append(SkippedFile(path, getattr(error, "problem", None) or str(error)))
                continue
            positive = n > 0
            row.instances += n
        else:
            positive = bool(ref.positive)
        row.images += 1
        row.positives += int(positive)
        row.negatives += int(not positive)
    for key, cases in case_sets.items():
        rows[key].cases = len(cases)
    order = {c: i for i, c in enumerate(dataset.concepts)}
    ordered = sorted(rows.values(), key=lambda r: (order[r.concept], SPLITS.index(r.split)))
    cases = {s: len({ref.case_id for ref in dataset.refs if ref.split == s}) for s in dataset.splits}
    return DatasetSummary(
        dataset.info.root,
        dataset.info.layout,
        ordered,
        cases,
        len(dataset),
        skipped,
        list(dataset.info.notes),
    )


def pick_grid_samples(dataset: ConceptDataset, count: int, seed: int = 0) -> list[int]:
    """Up to ``count`` sample indices, round-robin over concepts, positives before negatives."""
    per_concept: dict[str, list[int]] = {c: [] for c in dataset.concepts}
    for i, ref in enumerate(dataset.refs):
        per_concept[ref.concept].append(i)
    queues = []
    for concept, indices in per_concept.items():
        rng = np.random.default_rng(stable_seed("grid", seed, concept))
        order = [indices[j] for j in rng.permutation(len(indices))]
        positives = [i for i in order if dataset.refs[i].positive is not False]
        negatives = [i for i in order if dataset.refs[i].positive is False]
        # One negative early so "absent" samples are seen too, the rest of the positives after it.
        queues.append(positives[:3] + negatives[:1] + positives[3:] + negatives[1:])
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def render_grid(dataset: ConceptDataset, indices: Sequence[int], tile: int = 256) -> np.ndarray:
    """Samples with their instances overlaid (one colour each, with boxes), tiled with titles."""
    from medsam3.visualize import grid, overlay

    pictures, titles = [], []
    for i in indices:
        try:
            sample = dataset[i]
        except MedSAM3Error:
            if not dataset.info.skip_bad:
                raise
            continue
        pictures.append(
            overlay(sample.image, list(sample.masks), boxes=sample.boxes if len(sample.boxes) else None)
        )
        where = sample.case_id
        if "slice_index" in sample.meta:
            where += f" {'zyx'[sample.meta.get('axis', 0)]}{sample.meta['slice_index']}"
        state = f"{len(sample.masks)} inst" if len(sample.masks) else "absent"
        titles.append(f"{sample.concept} | {where} | {state}")
    if not pictures:
        raise DatasetError(f"{dataset.info.root}: no sample could be read for the grid")
    return grid(pictures, titles=titles, tile_size=(tile, tile))


def inspect_dataset(
    path: str | Path | ConceptDataset,
    out_png: str | Path | None = None,
    *,
    layout: str = "auto",
    grid_size: int = 16,
    seed: int = 0,
    count_instances: bool = True,
    **open_kwargs: Any,
) -> DatasetSummary:
    """Count a dataset per concept and split, and (with ``out_png``) write a grid of samples.

    ``path`` is a dataset folder (opened with :func:`open_dataset` and ``open_kwargs``; images are
    decoded once to find corrupt ones unless ``verify_images=False``) or an already opened
    :class:`ConceptDataset`.
    """
    if out_png is not None:
        source = path.info.root if isinstance(path, ConceptDataset) else path
        check_output_file(out_png, inputs=[source])
        if grid_size < 1:
            raise DatasetError(f"grid size must be >= 1, got {grid_size}")
    if isinstance(path, ConceptDataset):
        dataset = path
    else:
        open_kwargs.setdefault("verify_images", True)
        dataset = open_dataset(path, layout=layout, **open_kwargs)
    summary = count_dataset(dataset, count_instances=count_instances)
    if out_png is not None:
        from medsam3.data.image_io import save_png

        picture = render_grid(dataset, pick_grid_samples(dataset, grid_size, seed))
        summary.grid_path = save_png(out_png, picture)
    return summary
