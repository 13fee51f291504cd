"""The MedSAM-3 paper's published Dice scores (Tables 2 to 6), as data, and lookup by dataset name.

The numbers live in ``paper_results.json`` next to this module, so a reader can check them against
the paper and a comparison can print them beside a run on a dataset of the same name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

_PREFIXES = re.compile(r"^(dataset\d{3}|task\d{2,3})[_-]")  # nnU-Net v2 and MSD folder names


@dataclass(frozen=True)
class PaperEntry:
    """One published number: table, method, dataset, Dice."""

    table: str
    caption: str
    method: str
    dataset: str
    dice: float


@lru_cache(maxsize=1)
def load_paper_results() -> dict[str, Any]:
    """The raw content of ``paper_results.json``."""
    text = resources.files("medsam3.evaluate").joinpath("paper_results.json").read_text(encoding="utf-8")
    return json.loads(text)


def paper_entries() -> list[PaperEntry]:
    """Every published number, table by table, in the order the paper gives them."""
    data = load_paper_results()
    return [
        PaperEntry(table=t["table"], caption=t["caption"], method=method, dataset=dataset, dice=float(value))
        for t in data["tables"]
        for method, row in t["rows"].items()
        for dataset, value in row.items()
    ]


def normalize_name(name: str) -> str:
    """Letters and digits, lower case, no nnU-Net/MSD prefix: 'Dataset001_Kvasir-SEG' -> 'kvasirseg'."""
    name = _PREFIXES.sub("", name.strip().lower())
    return re.sub(r"[^a-z0-9]", "", name)


def match_datasets(name: str, concept: str | None = None) -> list[str]:
    """The paper's dataset names that ``name`` refers to (case and punctuation ignored).

    A family name such as "RIM-ONE" matches both its cup and disc entries, narrowed by ``concept``
    ("optic cup") when given.
    """
    key = normalize_name(name)
    if not key:
        return []
    datasets = load_paper_results()["datasets"]
    exact = [
        canonical
        for canonical, info in datasets.items()
        if key == normalize_name(canonical) or key in {normalize_name(a) for a in info.get("aliases", [])}
    ]
    if exact:
        return exact
    family = [c for c, info in datasets.items() if normalize_name(info.get("family", "")) == key]
    if concept is not None:
        wanted = concept.strip().lower()
        family = [c for c in family if datasets[c].get("concept", "").lower() == wanted] or family
    return family


def published_for(name: str, concept: str | None = None) -> list[PaperEntry]:
    """The paper's numbers for the dataset called ``name`` (empty when the paper has none)."""
    wanted = set(match_datasets(name, concept))
    return [e for e in paper_entries() if e.dataset in wanted]


def published_markdown(name: str, concept: str | None = None) -> str:
    """A small Markdown table of the published numbers for ``name``, or '' when there are none."""
    entries = published_for(name, concept)
    if not entries:
        return ""
    source = load_paper_results()["source"]
    lines = [
        f"Published Dice for {', '.join(sorted({e.dataset for e in entries}))} ({source}):",
        "",
        "| Table | Method | Dataset | Dice |",
        "|---|---|---|---|",
    ]
    lines += [f"| {e.table} | {e.method} | {e.dataset} | {e.dice:.4f} |" for e in entries]
    return "\n".join(lines) + "\n"
