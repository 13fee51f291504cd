"""What every layout reader shares: options, the bad-file report, and the reader interface.

A layout reader finds its root (users often point at the folder above the one the zip created),
then *indexes* it into :class:`~medsam3.data.layouts.refs.SampleRef` objects without decoding
images. Bad cases raise a one-line :class:`~medsam3.errors.MedSAM3Error` naming the file; with
``skip_bad`` the :class:`IndexReport` records them instead and indexing goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from medsam3.data.layouts.refs import SampleRef
from medsam3.errors import MedSAM3Error

log = logging.getLogger("medsam3.data")


@dataclass(frozen=True)
class IndexOptions:
    """How to turn files into samples.

    ``negatives_fraction``: share of a volume's concept-free slices kept as negative samples (per
    concept). ``negatives_2d``: whether 2D images yield a negative sample for each concept they lack.
    ``concept_map``: label name or phrase -> the phrase to use instead.
    """

    axis: int = 0
    negatives_fraction: float = 0.1
    negatives_2d: bool = True
    seed: int = 0
    skip_bad: bool = False
    concept_map: Mapping[str, str] = field(default_factory=dict)
    channel: int = 0

    def rename(self, phrase: str) -> str:
        """Apply ``concept_map`` (matched case-insensitively) to a concept phrase or label name."""
        if not self.concept_map:
            return phrase
        lowered = {k.strip().lower(): v for k, v in self.concept_map.items()}
        return lowered.get(phrase.strip().lower(), phrase)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    problem: str


@dataclass
class IndexReport:
    """Files left out while indexing (only with ``skip_bad``) and other notes for the summary."""

    skip_bad: bool = False
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def guard(self, path: Path | str) -> Iterator[None]:
        """Run one case's indexing; with ``skip_bad`` a user-facing error skips it with a warning."""
        try:
            yield
        except MedSAM3Error as error:
            if not self.skip_bad:
                raise
            where = str(getattr(error, "path", "") or path)
            problem = getattr(error, "problem", None) or str(error)
            self.skipped.append(SkippedFile(where, problem))
            log.warning("skipped %s: %s", where, problem)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


class Layout:
    """A dataset layout reader. Subclasses set ``name``/``summary`` and implement both methods."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def find_root(self, path: Path) -> Path | None:
        """The folder this layout reads, at ``path`` or just below it; None if it is not this layout."""
        raise NotImplementedError

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        raise NotImplementedError


def child_dir(folder: Path, name: str) -> Path | None:
    """The sub-folder of ``folder`` called ``name``, ignoring case; None if missing."""
    exact = folder / name
    if exact.is_dir():
        return exact
    if not folder.is_dir():
        return None
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def search_down(path: Path, test, depth: int = 2) -> Path | None:
    """``path`` or the first folder below it (up to ``depth`` levels, sorted) for which ``test`` holds."""
    if not path.is_dir():
        return None
    if test(path):
        return path
    if depth <= 0:
        return None
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = search_down(child, test, depth - 1)
        if found is not None:
            return found
    return None
