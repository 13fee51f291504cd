"""The concept dataset: one sample per (image or slice, concept), read lazily from any known layout.

    ds = open_dataset("Dataset003_Liver", split="train")
    sample = ds[0]            # Sample: image (H, W, 3) uint8, concept, masks (N, H, W), boxes ...

An image labelled for three concepts gives three samples; a concept absent from an image gives a
negative sample (N = 0), which is how SAM 3's presence head learns to say "not here". Volumes are
read as 2D slices along ``axis``. Nothing is decoded until an item is asked for, and no torch is
needed: the trainer wraps this in its own torch Dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, overload

import numpy as np

from medsam3.data.layouts.base import IndexOptions, IndexReport, SkippedFile
from medsam3.data.layouts.detection import resolve_layout
from medsam3.data.layouts.refs import SampleRef
from medsam3.data.sample import INSTANCE_MODES, InstanceMode, Sample
from medsam3.data.splits import SPLITS, check_no_leakage, split_cases, stable_seed
from medsam3.errors import DatasetError, MedSAM3Error


@dataclass
class DatasetInfo:
    """Where a dataset came from and what indexing left out."""

    root: Path
    layout: str
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skip_bad: bool = False


class ConceptDataset(Sequence[Sample]):
    """A sequence of lazily loaded :class:`Sample` objects (torch-free; index, slice, filter)."""

    def __init__(
        self,
        refs: Sequence[SampleRef],
        info: DatasetInfo,
        *,
        instances: InstanceMode = "components",
        min_instance_area: int = 0,
        window: Any = None,
    ):
        if instances not in INSTANCE_MODES:
            raise DatasetError(f"instances must be one of {', '.join(INSTANCE_MODES)}, got '{instances}'")
        if min_instance_area < 0:
            raise DatasetError(f"min_instance_area must be >= 0, got {min_instance_area}")
        self.refs: list[SampleRef] = list(refs)
        self.info = info
        self.instances: InstanceMode = instances
        self.min_instance_area = int(min_instance_area)
        self.window = window

    # -- sequence
    def __len__(self) -> int:
        return len(self.refs)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> ConceptDataset: ...

    def __getitem__(self, index: int | slice) -> Sample | ConceptDataset:
        if isinstance(index, slice):
            return self._subset(self.refs[index])
        return self.refs[index].load(self.instances, self.min_instance_area, self.window)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"ConceptDataset({self.info.layout} at {self.info.root}: {len(self)} samples, "
            f"{len(self.cases)} cases, concepts {self.concepts})"
        )

    def _subset(self, refs: Sequence[SampleRef]) -> ConceptDataset:
        return ConceptDataset(
            refs,
            self.info,
            instances=self.instances,
            min_instance_area=self.min_instance_area,
            window=self.window,
        )

    # -- views
    @property
    def concepts(self) -> list[str]:
        """Concept phrases in first-seen order."""
        return list(dict.fromkeys(ref.concept for ref in self.refs))

    @property
    def cases(self) -> list[str]:
        return list(dict.fromkeys(ref.case_id for ref in self.refs))

    @property
    def splits(self) -> list[str]:
        present = {ref.split for ref in self.refs}
        return [name for name in SPLITS if name in present]

    def split(self, name: str) -> ConceptDataset:
        """The samples of one split ("train", "val" or "test"); an empty one is allowed."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split '{name}'; splits are {', '.join(SPLITS)}")
        return self._subset([ref for ref in self.refs if ref.split == name])

    def select(
        self,
        concepts: Sequence[str] | None = None,
        positives_only: bool = False,
        cases: Sequence[str] | None = None,
    ) -> ConceptDataset:
        """Keep some concepts, cases, or only samples known to contain their concept."""
        wanted = set(concepts) if concepts is not None else None
        if wanted is not None:
            missing = sorted(wanted - set(self.concepts))
            if missing:
                raise DatasetError(
                    f"no concept {', '.join(missing)} in this dataset; it has {', '.join(self.concepts)}"
                )
        chosen_cases = set(cases) if cases is not None else None
        return self._subset(
            [
                ref
                for ref in self.refs
                if (wanted is None or ref.concept in wanted)
                and (chosen_cases is None or ref.case_id in chosen_cases)
                and (not positives_only or ref.positive is not False)
            ]
        )

    def volume_blocked_order(self, seed: int = 0) -> list[int]:
        """A shuffled order of all indices that keeps each image file's samples together.

        Volumes are decoded whole and only the last two are cached, so a plain shuffle over the
        slices of large CTs decodes a volume per sample. This order shuffles the files, then the
        samples within each file: as random across epochs (change ``seed``), one decode per file.
        """
        blocks: dict[Path, list[int]] = {}
        for i, ref in enumerate(self.refs):
            blocks.setdefault(ref.image.path, []).append(i)
        rng = np.random.default_rng(stable_seed("order", seed))
        groups = list(blocks.values())
        order: list[int] = []
        for key in rng.permutation(len(groups)):
            order += [groups[key][j] for j in rng.permutation(len(groups[key]))]
        return order

    def ref(self, index: int) -> SampleRef:
        return self.refs[index]

    @property
    def skipped(self) -> list[SkippedFile]:
        return self.info.skipped


def _assign_splits(
    refs: list[SampleRef], seed: int, fractions: Mapping[str, float] | None
) -> list[SampleRef]:
    fixed: dict[str, str] = {}
    for ref in refs:
        if ref.split is None:
            continue
        previous = fixed.setdefault(ref.case_id, ref.split)
        if previous != ref.split:
            raise DatasetError(
                f"case {ref.case_id} is in both the {previous} and the {ref.split} folders of the dataset "
                f"({ref.source}); a case must belong to one split"
            )
    cases = list(dict.fromkeys(ref.case_id for ref in refs))
    chosen = split_cases(cases, fixed, seed=seed, fractions=fractions)
    out = [
        ref if ref.split == chosen[ref.case_id] else replace(ref, split=chosen[ref.case_id]) for ref in refs
    ]
    check_no_leakage((ref.case_id, ref.split) for ref in out)
    return out


def _verify_images(refs: list[SampleRef], report: IndexReport) -> list[SampleRef]:
    """Decode each distinct image (volume) once; drop the refs of those that fail when skipping."""
    from medsam3.data.layouts.readers import verify_image

    bad: set[Path] = set()
    for path in dict.fromkeys(ref.image.path for ref in refs):
        with report.guard(path):
            try:
                verify_image(path)
            except MedSAM3Error:
                bad.add(path)
                raise
    return [ref for ref in refs if ref.image.path not in bad]


def open_dataset(
    path: str | Path,
    layout: str = "auto",
    split: str | None = None,
    axis: int = 0,
    negatives_fraction: float = 0.1,
    skip_bad: bool = False,
    *,
    instances: InstanceMode = "components",
    min_instance_area: int = 0,
    negatives_2d: bool = True,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
    concept_map: Mapping[str, str] | None = None,
    channel: int = 0,
    window: Any = None,
    verify_images: bool = False,
) -> ConceptDataset:
    """Index a dataset folder into a :class:`ConceptDataset`.

    ``layout``: a layout name or "auto" (see :func:`~medsam3.data.layouts.detection.detect_layout`).
    ``split``: keep only "train", "val" or "test" (case-level, deterministic by ``seed`` and
    ``fractions``; splits the dataset defines itself are respected). ``axis``: slice axis for
    volumes. ``negatives_fraction``: share of a volume's slices without a concept kept as negatives.
    ``skip_bad``: leave out bad cases with a warning instead of failing; they are listed in
    ``dataset.skipped``. ``instances``: "components" splits semantic masks into connected components,
    "semantic" keeps one whole mask per concept. ``concept_map``: label name -> phrase overrides.
    ``verify_images``: decode every image once now (indexing reads only headers and labels), so a
    corrupt image is reported (or, with ``skip_bad``, left out) before training rather than during.
    """
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such dataset folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: a dataset is a folder, not a file")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; splits are {', '.join(SPLITS)}")
    if not 0.0 <= negatives_fraction <= 1.0:
        raise DatasetError(f"negatives_fraction must lie in [0, 1], got {negatives_fraction}")
    if axis not in (0, 1, 2):
        raise DatasetError(f"slice axis must be 0 (Z), 1 (Y) or 2 (X), got {axis}")
    if instances not in INSTANCE_MODES:
        raise DatasetError(f"instances must be one of {', '.join(INSTANCE_MODES)}, got '{instances}'")
    reader, data_root = resolve_layout(root, layout)
    options = IndexOptions(
        axis=axis,
        negatives_fraction=negatives_fraction,
        negatives_2d=negatives_2d,
        seed=seed,
        skip_bad=skip_bad,
        concept_map=dict(concept_map or {}),
        channel=channel,
    )
    report = IndexReport(skip_bad=skip_bad)
    try:
        refs = reader.index(data_root, options, report)
    except MedSAM3Error:
        raise
    except OSError as error:
        raise DatasetError(f"{data_root}: cannot read the dataset ({error})") from None
    if not refs:
        detail = f"; {len(report.skipped)} bad file(s) skipped" if report.skipped else ""
        raise DatasetError(f"{data_root}: no samples found in this {reader.name} dataset{detail}")
    if verify_images:
        refs = _verify_images(refs, report)
    if not refs:
        raise DatasetError(
            f"{data_root}: no readable samples left ({len(report.skipped)} bad file(s) skipped)"
        )
    refs = _assign_splits(refs, seed, fractions)
    info = DatasetInfo(data_root, reader.name, report.skipped, report.notes, skip_bad)
    dataset = ConceptDataset(
        refs, info, instances=instances, min_instance_area=min_instance_area, window=window
    )
    return dataset.split(split) if split is not None else dataset
