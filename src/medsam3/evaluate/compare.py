"""Side-by-side comparison of evaluation runs (base vs fine-tuned, T vs T+I, MedSAM-3 vs U-Net).

Runs are joined case by case on (case, concept), so the differences are paired: the same images
scored by two models. The Wilcoxon signed-rank test (scipy) gives a p-value for the paired
differences where there are at least ``min_pairs`` of them. Published numbers from the paper are
printed for datasets of the same name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

from medsam3.errors import InputFileError, MedSAM3Error, OutputError
from medsam3.evaluate.paper import published_markdown
from medsam3.evaluate.report import CSV_NAME, SUMMARY_NAME, CaseRecord, read_case_csv
from medsam3.utils.files import atomic_files, write_json_atomic, write_text_atomic
from medsam3.utils.outputs import check_output_file

METRICS = ("dice", "iou", "nsd", "hd95")
#: Metrics where a smaller value is better (a distance); the others are overlaps, higher is better.
LOWER_IS_BETTER = ("hd95",)
OVERALL = "overall"


@dataclass
class Run:
    """One evaluation folder: its per-case records and its summary."""

    path: Path
    label: str
    records: list[CaseRecord]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or "")


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read ``per_case.csv`` (required) and ``summary.json`` (optional) from an evaluation folder."""
    path = Path(path)
    if not path.is_dir():
        raise InputFileError(path, "not an evaluation folder (it does not exist or is a file)")
    records = read_case_csv(path / CSV_NAME)
    if not records:
        raise InputFileError(path / CSV_NAME, "has no cases")
    summary: dict[str, Any] = {}
    if (path / SUMMARY_NAME).is_file():
        try:
            summary = json.loads((path / SUMMARY_NAME).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputFileError(path / SUMMARY_NAME, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return Run(path=path, label=label or path.name, records=records, summary=summary)


def _source_key(source: str) -> str:
    """The file name (and slice) of a source without its folder, so runs made elsewhere still join."""
    return source.replace("\\", "/").rsplit("/", 1)[-1]


def _keyed(run: Run, with_source: bool) -> dict[tuple[str, ...], CaseRecord]:
    out: dict[tuple[str, ...], CaseRecord] = {}
    for r in run.records:
        key = (r.case, r.concept, _source_key(r.source)) if with_source else (r.case, r.concept)
        if key in out:
            if not with_source:
                return {}  # not unique: the caller retries with the source
            raise MedSAM3Error(f"run {run.label}: case {r.case} ({r.concept}, {r.source}) appears twice")
        out[key] = r
    return out


def pair_records(base: Run, other: Run) -> list[tuple[CaseRecord, CaseRecord]]:
    """Records of the same (case, concept) in both runs, in ``base``'s order.

    Volumes evaluated slice by slice share a case id; then the slice's ``source`` joins them too.
    """
    a, b = _keyed(base, False), _keyed(other, False)
    if not a or not b:
        a, b = _keyed(base, True), _keyed(other, True)
    return [(rec, b[key]) for key, rec in a.items() if key in b]


def paired_test(x: Sequence[float], y: Sequence[float], *, min_pairs: int = 6) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of y - x, or None with fewer than ``min_pairs`` pairs."""
    x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x_arr) < min_pairs:
        return None
    diff = y_arr - x_arr
    if np.allclose(diff, 0.0):
        return 1.0  # identical scores: no evidence of a difference
    return float(wilcoxon(x_arr, y_arr).pvalue)


@dataclass
class ConceptComparison:
    """One line of the comparison: a concept's mean per run, and paired differences vs the first run."""

    concept: str
    means: list[float | None]
    counts: list[int]
    paired_n: list[int]
    diffs: list[float | None]
    p_values: list[float | None]
    infinite: list[int] = field(default_factory=list)
    """Per run, the cases whose value is infinite (HD95 with exactly one mask empty): left out of the mean."""


def _mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values: NaN (not scored) and inf (HD95 with one mask empty) are left out."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _compare_concept(runs: Sequence[Run], concept: str | None, metric: str, min_pairs: int) -> ConceptComparison:
    def positives(run: Run) -> list[CaseRecord]:
        return [r for r in run.records if r.n_gt > 0 and (concept is None or r.concept == concept)]

    selected = [positives(run) for run in runs]
    means = [_mean([getattr(r, metric) for r in recs]) for recs in selected]
    base = Run(runs[0].path, runs[0].label, selected[0], runs[0].summary)
    paired_n, diffs, p_values = [], [], []
    for run, recs in zip(runs[1:], selected[1:], strict=True):
        pairs = pair_records(base, Run(run.path, run.label, recs, run.summary))
        pairs = [(p, q) for p, q in pairs if math.isfinite(getattr(p, metric)) and math.isfinite(getattr(q, metric))]
        x = [getattr(p, metric) for p, _ in pairs]
        y = [getattr(q, metric) for _, q in pairs]
        paired_n.append(len(pairs))
        diffs.append(float(np.mean(np.subtract(y, x))) if pairs else None)
        p_values.append(paired_test(x, y, min_pairs=min_pairs))
    return ConceptComparison(
        concept=concept or OVERALL,
        means=means,
        counts=[len(recs) for recs in selected],
        paired_n=paired_n,
        diffs=diffs,
        p_values=p_values,
        infinite=[sum(math.isinf(getattr(r, metric)) for r in recs) for recs in selected],
    )


@dataclass
class Comparison:
    """The comparison table of several runs; ``markdown()`` renders it."""

    runs: list[Run]
    rows: list[ConceptComparison]
    metric: str = "dice"
    min_pairs: int = 6

    def markdown(self) -> str:
        labels = [r.label for r in self.runs]
        head = ["Concept", f"n ({labels[0]})", labels[0]]
        for label in labels[1:]:
            head += [label, f"Δ {label} − {labels[0]} (p, n)"]
        lines = [f"# Comparison: mean {self.metric} per concept", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for row in self.rows:
            name = f"**{row.concept}**" if row.concept == OVERALL else row.concept
            cells = [name, str(row.counts[0]), _fmt(row.means[0], row.infinite[0])]
            for k in range(1, len(self.runs)):
                cells += [
                    _fmt(row.means[k], row.infinite[k]),
                    _fmt_diff(row.diffs[k - 1], row.p_values[k - 1], row.paired_n[k - 1]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Mean {self.metric} over the cases that contain the concept; Δ is the mean paired difference "
            "on the cases both runs scored; p: two-sided Wilcoxon signed-rank test "
            f"(with >= {self.min_pairs} pairs).{self._direction()}",
            "",
            "Runs:",
        ]
        for run in self.runs:
            s = run.summary
            facts = ", ".join(
                f"{k} {s[k]}" for k in ("dataset", "split", "model", "prompt_mode") if s.get(k) not in (None, "")
            )
            lines.append(f"- {run.label}: {facts or 'no summary.json'} ({run.path})")
        published = self.published()
        if published:
            lines += ["", published.rstrip("\n")]
        return "\n".join(lines) + "\n"

    def _direction(self) -> str:
        if self.metric not in LOWER_IS_BETTER:
            return ""
        return (
            f" Lower {self.metric} is better (mm, or pixels without spacing). It is infinite where exactly one "
            "mask is empty: such cases are counted apart (inf) and left out of the means and the paired differences."
        )

    def published(self) -> str:
        """The paper's numbers for the runs' datasets, one block per dataset name."""
        blocks, seen = [], set()
        for run in self.runs:
            concepts = {r.concept for r in run.records}
            concept = next(iter(concepts)) if len(concepts) == 1 else None
            key = (run.dataset.lower(), concept)
            if not run.dataset or key in seen:
                continue
            seen.add(key)
            text = published_markdown(run.dataset, concept)
            if text and text not in blocks:
                blocks.append(text)
        return "\n".join(blocks)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the Markdown table to ``path`` (.md) and the numbers next to it (.json), both or neither.

        Refused (before writing) inside a compared run's folder: it would overwrite its report.
        """
        md, js = check_comparison_output(path, [run.path for run in self.runs])
        with atomic_files() as files:
            write_text_atomic(files.path(md), self.markdown())
            write_json_atomic(files.path(js), self.to_json())
        return md, js

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "runs": [{"label": r.label, "path": str(r.path), "dataset": r.dataset} for r in self.runs],
            "rows": [row.__dict__ for row in self.rows],
        }


def _fmt(value: float | None, infinite: int = 0) -> str:
    text = "–" if value is None else f"{value:.4f}"
    return text + (f" ({infinite} inf)" if infinite else "")


def _fmt_diff(diff: float | None, p: float | None, n: int) -> str:
    if diff is None:
        return "– (no paired cases)"
    p_text = f"p={p:.3g}" if p is not None else "p: too few"
    return f"{diff:+.4f} ({p_text}, n={n})"


def check_comparison_output(path: str | Path, dirs: Sequence[str | Path]) -> tuple[Path, Path]:
    """The two files a comparison writes (``path`` as .md and .json), refused when either is an input,
    lies inside a compared run's folder (it would overwrite that run's report), or cannot be written."""
    path = Path(path)
    if path.is_dir() or path.name in ("", ".", ".."):
        raise OutputError(f"{path}: is a folder; compare --out needs a file name such as cmp.md")
    md = path.with_suffix(".md")
    js = md.with_suffix(".json")
    for option, target in (("--out", md), ("--out (its .json)", js)):
        check_output_file(target, sealed=dirs, option=option)
    return md, js


def compare_runs(
    dirs: Sequence[str | Path],
    *,
    labels: Sequence[str] | None = None,
    metric: str = "dice",
    min_pairs: int = 6,
    out: str | Path | None = None,
) -> Comparison:
    """Compare evaluation folders: per-concept means, paired differences vs the first, Wilcoxon p.

    ``out``, the path :meth:`Comparison.save` will get, is checked first, before anything is read.
    """
    if len(dirs) < 1:
        raise MedSAM3Error("compare needs at least one evaluation folder")
    if out is not None:
        check_comparison_output(out, dirs)
    if metric not in METRICS:
        raise MedSAM3Error(f"compare: metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if labels is not None and len(labels) != len(dirs):
        raise MedSAM3Error(f"compare: {len(labels)} labels for {len(dirs)} folders")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    names = [r.label for r in runs]
    if len(set(names)) != len(names):  # two folders called "run": fall back to their full paths
        for r in runs:
            r.label = str(r.path)
    concepts = sorted({r.concept for run in runs for r in run.records})
    rows = [_compare_concept(runs, c, metric, min_pairs) for c in concepts]
    if len(concepts) > 1:
        rows.append(_compare_concept(runs, None, metric, min_pairs))
    return Comparison(runs=runs, rows=rows, metric=metric, min_pairs=min_pairs)
