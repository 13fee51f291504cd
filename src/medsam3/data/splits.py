"""Deterministic train/val/test splits by *case*, so no patient leaks across splits.

A case (one image, or one whole volume with all its slices, or all samples sharing a case id)
goes to one split, chosen from a SHA-256 hash of ``seed`` and the case id mapped onto the split
fractions. The assignment of a case never depends on which other cases exist, so adding data
does not reshuffle earlier cases. Splits the dataset defines itself (an nnU-Net ``imagesTs``,
ISIC's validation/test folders, COVID-QU-Ex's Train/Val/Test) are kept as given; the remaining
cases are then divided among the splits the dataset did not fix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from medsam3.errors import DatasetError

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts`` (SHA-256; unlike hash() it is the same in every process)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def stable_seed(*parts: object) -> int:
    """A 32-bit generator seed fixed by ``parts``."""
    return int(stable_fraction(*parts) * 2**32)


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate fractions (known split names, non-negative, summing to 1) and return them in order."""
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise DatasetError(f"unknown split name(s) {', '.join(unknown)}; splits are {', '.join(SPLITS)}")
    values = {name: float(fractions.get(name, 0.0)) for name in SPLITS}
    if any(v < 0 for v in values.values()):
        raise DatasetError(f"split fractions must be >= 0, got {values}")
    total = sum(values.values())
    if abs(total - 1.0) > 1e-6:
        raise DatasetError(f"split fractions must sum to 1, got {total:g} ({values})")
    return values


def assign_split(case_id: str, seed: int = 0, fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> str:
    """The split of one case: hash(seed, case id) in [0, 1) against the cumulative fractions."""
    values = {k: v for k, v in fractions.items() if v > 0}
    if not values:
        raise DatasetError("no split has a positive fraction")
    total = sum(values.values())
    point = stable_fraction("split", seed, case_id) * total
    edge = 0.0
    for name, share in values.items():
        edge += share
        if point < edge:
            return name
    return next(reversed(values))


def split_cases(
    case_ids: Iterable[str],
    fixed: Mapping[str, str] | None = None,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> dict[str, str]:
    """Case id -> split for every case; ``fixed`` ones keep their split.

    When the dataset fixes some split (say its own test set), the other cases are shared among the
    splits it did not fix, in proportion to their fractions: a dataset with an official test set
    gets no second, hashed test split carved out of its training cases.
    """
    values = check_fractions(fractions or DEFAULT_FRACTIONS)
    fixed = dict(fixed or {})
    for case, name in fixed.items():
        if name not in SPLITS:
            raise DatasetError(f"case {case}: unknown split '{name}'; splits are {', '.join(SPLITS)}")
    free = {name: share for name, share in values.items() if name not in set(fixed.values())}
    if not any(share > 0 for share in free.values()):
        free = {name: share for name, share in values.items() if share > 0} or {"train": 1.0}
    return {case: fixed[case] if case in fixed else assign_split(case, seed, free) for case in case_ids}


def find_leaks(pairs: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """Cases seen in more than one split, from (case id, split) pairs: case -> its splits."""
    seen: dict[str, set[str]] = {}
    for case, split in pairs:
        seen.setdefault(case, set()).add(split)
    return {case: splits for case, splits in seen.items() if len(splits) > 1}


def check_no_leakage(pairs: Iterable[tuple[str, str]]) -> None:
    """Raise :class:`DatasetError` when any case appears in two splits."""
    leaks = find_leaks(pairs)
    if leaks:
        shown = "; ".join(f"{case}: {', '.join(sorted(s))}" for case, s in sorted(leaks.items())[:5])
        raise DatasetError(f"{len(leaks)} case(s) appear in more than one split ({shown})")
