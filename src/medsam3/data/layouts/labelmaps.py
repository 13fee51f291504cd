"""Index one image + label-map pair (2D file or 3D volume) into per-concept sample refs.

Shared by every layout whose annotation is a label map: nnU-Net/MSD, paired folders, and the
native layouts with one binary mask per image (Kvasir, ISIC, COVID-QU-Ex). The checks that make
a bad dataset fail early live here: image/label size mismatch, label values nobody named.

Volumes become 2D slices along ``options.axis``. Every slice showing a concept is a positive
sample; of the slices without it, a deterministic share (``negatives_fraction``, chosen by a
seeded generator keyed on case and concept) is kept as negatives, so the presence head sees
"absent" without drowning in empty slices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.data.layouts.base import IndexOptions
from medsam3.data.layouts.readers import (
    image_size_2d,
    is_volume_file,
    read_label_volume,
    read_mask_2d,
    volume_grid,
    volume_size,
)
from medsam3.data.layouts.refs import ImageSource, LabelMapTarget, SampleRef
from medsam3.data.splits import stable_seed
from medsam3.data.volume_io import grid_difference
from medsam3.errors import DatasetError, InputFileError


def _check_values(present: Iterable[int], known: set[int] | None, label: Path, named_in: str) -> None:
    if known is None:
        return
    unknown = sorted(int(v) for v in present if int(v) not in known)
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DatasetError(
            f"{label}: label values {shown} are not named in {named_in} (named: "
            f"{', '.join(str(v) for v in sorted(known))})"
        )


def pick_negatives(candidates: np.ndarray, fraction: float, *key: object) -> list[int]:
    """A deterministic share of ``candidates`` (slice indices), at least one when fraction > 0."""
    candidates = np.asarray(candidates, dtype=int)
    if fraction <= 0 or candidates.size == 0:
        return []
    count = min(candidates.size, max(1, math.ceil(fraction * candidates.size)))
    rng = np.random.default_rng(stable_seed(*key))
    return sorted(int(i) for i in rng.choice(candidates, size=count, replace=False))


def index_label_pair(
    case_id: str,
    image: Path,
    label: Path,
    concepts: Mapping[str, tuple[int, ...]],
    options: IndexOptions,
    *,
    split: str | None = None,
    binary: bool = False,
    known_values: set[int] | None = None,
    named_in: str = "the dataset's label names",
    instance_path: Path | None = None,
    meta: Mapping[str, Any] | None = None,
) -> list[SampleRef]:
    """Sample refs for every concept of one image/label pair (2D) or of every slice (3D)."""
    if not image.is_file():
        raise DatasetError(f"{label}: label without its image (expected {image})")
    if not label.is_file():
        raise DatasetError(f"{image}: image without its label (expected {label})")
    base_meta = dict(meta or {})
    base_meta.setdefault("label_path", str(label))
    if is_volume_file(label):
        return _index_volume(
            case_id, image, label, concepts, options, split, known_values, named_in, instance_path, base_meta
        )
    if is_volume_file(image):
        raise DatasetError(f"{label}: a 2D label for the 3D image {image}")
    height, width = image_size_2d(image)
    labels = read_mask_2d(label, binary=binary)
    if labels.shape != (height, width):
        raise InputFileError(
            label,
            f"label is {labels.shape[1]}x{labels.shape[0]} but its image {image.name} is {width}x{height}",
        )
    if instance_path is not None:
        ids = read_mask_2d(instance_path)
        if ids.shape != labels.shape:
            raise InputFileError(
                instance_path, f"instance map size {ids.shape} differs from its label {labels.shape}"
            )
    present = set(np.unique(labels).tolist())
    _check_values(present, known_values, label, named_in)
    refs = []
    for concept, values in concepts.items():
        positive = bool(present.intersection(values))
        if not positive and not options.negatives_2d:
            continue
        target = LabelMapTarget(label, tuple(values), binary=binary, instance_path=instance_path)
        refs.append(
            SampleRef(
                case_id,
                concept,
                ImageSource(image),
                target,
                positive=positive,
                split=split,
                meta=dict(base_meta),
            )
        )
    return refs


def _index_volume(
    case_id: str,
    image: Path,
    label: Path,
    concepts: Mapping[str, tuple[int, ...]],
    options: IndexOptions,
    split: str | None,
    known_values: set[int] | None,
    named_in: str,
    instance_path: Path | None,
    meta: dict[str, Any],
) -> list[SampleRef]:
    if not is_volume_file(image):
        raise DatasetError(f"{label}: a 3D label volume for the 2D image {image}")
    grid = volume_grid(image)
    size = grid[0]
    labels = read_label_volume(label)
    if labels.shape != size:
        raise InputFileError(
            label, f"label volume is {labels.shape} (z, y, x) but its image {image.name} is {size}"
        )
    problem = grid_difference(grid, volume_grid(label))
    if problem:
        raise InputFileError(label, f"label volume is not on the grid of {image.name}: {problem}")
    if instance_path is not None and volume_size(instance_path) != size:
        raise InputFileError(
            instance_path, f"instance volume size differs from its image {image.name} {size}"
        )
    _check_values(np.unique(labels).tolist(), known_values, label, named_in)
    axis = options.axis
    if axis not in (0, 1, 2):
        raise DatasetError(f"slice axis must be 0 (Z), 1 (Y) or 2 (X), got {axis}")
    others = tuple(a for a in range(3) if a != axis)
    refs = []
    for concept, values in concepts.items():
        per_slice = np.isin(labels, values).any(axis=others)
        positives = np.flatnonzero(per_slice)
        negatives = pick_negatives(
            np.flatnonzero(~per_slice), options.negatives_fraction, options.seed, case_id, concept
        )
        chosen = sorted([(int(i), True) for i in positives] + [(i, False) for i in negatives])
        for index, positive in chosen:
            target = LabelMapTarget(label, tuple(values), index, axis, instance_path=instance_path)
            refs.append(
                SampleRef(
                    case_id,
                    concept,
                    ImageSource(image, index, axis),
                    target,
                    positive=positive,
                    split=split,
                    meta=dict(meta),
                )
            )
    return refs
