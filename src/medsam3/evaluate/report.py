"""Per-case records, their CSV file, the summary statistics and the Markdown table.

One record is one (image, concept) sample. Dice, IoU, NSD and HD95 are summarised over the cases
where the concept is present (``n_gt > 0``), the convention of the MedSAM-3 paper and of most
segmentation benchmarks; cases where it is absent are judged by presence accuracy, and ``dice_all``
adds them back with the empty-mask convention (an empty prediction on an empty truth scores 1).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import InputFileError
from medsam3.evaluate.metrics import aggregate_instances, presence_scores
from medsam3.utils.files import write_text_atomic

CSV_NAME = "per_case.csv"
SUMMARY_NAME = "summary.json"
MARKDOWN_NAME = "report.md"


@dataclass
class CaseRecord:
    """Every number measured on one (image, concept) sample; one row of ``per_case.csv``."""

    case: str
    concept: str
    split: str
    dice: float
    iou: float
    nsd: float
    hd95: float
    presence_pred: float
    presence_gt: bool
    n_pred: int
    n_gt: int
    seconds: float
    tp: int = 0
    fp: int = 0
    fn: int = 0
    inst_f1: float = math.nan
    matched_dice: float = math.nan
    source: str = ""
    modality: str = ""


_FIELDS = [f.name for f in fields(CaseRecord)]
_TYPES = {f.name: f.type for f in fields(CaseRecord)}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return str(value)


def records_to_csv(records: Iterable[CaseRecord]) -> str:
    """The CSV text of ``records`` (header first; floats to 6 significant digits; inf/nan spelled out)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_FIELDS)
    for r in records:
        writer.writerow([_fmt(getattr(r, name)) for name in _FIELDS])
    return buf.getvalue()


def write_case_csv(records: Iterable[CaseRecord], path: str | Path) -> Path:
    """Write ``per_case.csv`` atomically."""
    write_text_atomic(path, records_to_csv(records))
    return Path(path)


def _parse(name: str, text: str) -> Any:
    kind = _TYPES[name]
    if kind == "bool":
        return text.strip().lower() in ("1", "true", "yes")
    if kind == "int":
        return int(float(text))
    if kind == "float":
        return float(text) if text.strip() else math.nan
    return text


def read_case_csv(path: str | Path) -> list[CaseRecord]:
    """Read a ``per_case.csv`` written by :func:`write_case_csv` (columns it lacks take defaults)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no per-case CSV here: run `medsam3 evaluate` into this folder first")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        required = {f.name for f in fields(CaseRecord) if f.default is MISSING}
        missing = sorted(required - set(reader.fieldnames or []))
        if missing:
            raise InputFileError(path, f"not a per-case CSV: missing columns {', '.join(missing)}")
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                values = {k: _parse(k, v) for k, v in row.items() if k in _TYPES and v is not None}
            except ValueError as exc:
                raise InputFileError(path, f"line {line}: {exc}") from None
            records.append(CaseRecord(**values))
    return records


# ---------------------------------------------------------------- summary


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, std (population), median, min, max of the non-NaN values (None when there are none)."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def _json_float(value: float) -> float | None:
    return None if (value is None or math.isnan(value) or math.isinf(value)) else float(value)


def summarise_group(records: Sequence[CaseRecord], *, presence_threshold: float = 0.5) -> dict[str, Any]:
    """The summary of one concept (or of all of them): metrics over positives, presence over all."""
    positives = [r for r in records if r.n_gt > 0]
    hd = [r.hd95 for r in positives]
    finite_hd = [v for v in hd if math.isfinite(v)]
    tp, fp, fn = (sum(getattr(r, k) for r in records) for k in ("tp", "fp", "fn"))
    presence = presence_scores(
        [r.presence_pred for r in records], [r.n_gt > 0 for r in records], threshold=presence_threshold
    )
    instances = aggregate_instances(tp, fp, fn)
    instances["matched_dice"] = describe([r.matched_dice for r in positives])["mean"]
    return {
        "n_cases": len(records),
        "n_positive": len(positives),
        "n_negative": len(records) - len(positives),
        "dice": describe([r.dice for r in positives]),
        "iou": describe([r.iou for r in positives]),
        "nsd": describe([r.nsd for r in positives]),
        "hd95": {**describe(finite_hd), "n_inf": len(hd) - len(finite_hd)},
        "dice_all": describe([r.dice for r in records]),
        "presence": {k: _json_float(v) if isinstance(v, float) else v for k, v in presence.as_dict().items()},
        "instances": {k: _json_float(v) if isinstance(v, float) else v for k, v in instances.items()},
        "seconds": describe([r.seconds for r in records]),
    }


def summarise(
    records: Sequence[CaseRecord],
    *,
    presence_threshold: float = 0.5,
    **info: Any,
) -> dict[str, Any]:
    """The ``summary.json`` content: run information, then per-concept and overall statistics."""
    concepts = sorted({r.concept for r in records})
    return {
        **info,
        "presence_threshold": presence_threshold,
        "n_cases": len(records),
        "concepts": {
            c: summarise_group([r for r in records if r.concept == c], presence_threshold=presence_threshold)
            for c in concepts
        },
        "overall": summarise_group(records, presence_threshold=presence_threshold),
    }


# ---------------------------------------------------------------- markdown


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row(name: str, s: dict[str, Any]) -> str:
    d, hd = s["dice"], s["hd95"]
    dice = "–" if d["mean"] is None else f"{d['mean']:.4f} ± {d['std']:.4f}"
    hd_text = _num(hd["median"], 2) + (f" ({hd['n_inf']} inf)" if hd["n_inf"] else "")
    return (
        f"| {name} | {s['n_cases']} ({s['n_positive']}/{s['n_negative']}) | {dice} | {_num(d['median'])} | "
        f"{_num(s['iou']['mean'])} | {_num(s['nsd']['mean'])} | {hd_text} | "
        f"{_num(s['presence']['accuracy'], 3)} | {_num(s['instances']['f1'], 3)} |"
    )


def markdown_report(summary: dict[str, Any]) -> str:
    """A Markdown page: one line per concept and one overall line (mean, std, median, ...)."""
    unit = summary.get("distance_unit", "px")
    tol = summary.get("nsd_tolerance", 2.0)
    title = summary.get("dataset") or "dataset"
    lines = [f"# Evaluation: {title}", ""]
    facts = [
        ("model", summary.get("model")),
        ("prompt mode", summary.get("prompt_mode")),
        ("split", summary.get("split")),
        ("score threshold", summary.get("threshold")),
        ("cases", summary.get("n_cases")),
        ("skipped", summary.get("n_skipped")),
    ]
    lines += [f"- {k}: {v}" for k, v in facts if v not in (None, "")]
    lines += [
        "",
        f"| Concept | Cases (+/−) | Dice mean ± std | Dice median | IoU | NSD@{tol:g}{unit} | "
        f"HD95 median, finite ({unit}) | Presence acc. | Instance F1@0.5 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for concept, s in summary["concepts"].items():
        lines.append(_row(concept, s))
    if len(summary["concepts"]) > 1:
        lines.append(_row("**overall**", summary["overall"]))
    lines += [
        "",
        "Dice, IoU, NSD and HD95 are over the cases that contain the concept (+); presence accuracy "
        "covers every case; HD95 is infinite where exactly one mask is empty: such cases are counted "
        "apart (inf) and left out of its mean and median. "
        f"NSD and HD95 in {'mm' if unit == 'mm' else 'pixels' if unit == 'px' else 'mm or pixels'}.",
    ]
    if summary.get("distance_unit") == "mixed":
        lines.append("Warning: some cases had a pixel spacing and some not: distances mix mm and pixels.")
    return "\n".join(lines) + "\n"
