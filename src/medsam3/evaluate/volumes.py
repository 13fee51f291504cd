"""3D evaluation: segment whole volumes and score them with spacing-aware 3D metrics.

``medsam3 evaluate DATA --volumes`` reads a volume dataset through its layout reader (nnU-Net v2
``CASE_0000`` or MSD ``CASE`` image names, either ``labels`` form of dataset.json, region labels),
runs the streamed volume segmentation (each slice encoded once) case by case with every labelled
concept's phrase as a prompt (the layout's vocabulary: MSD Liver's "cancer" is "liver tumor"), and
scores each structure in 3D (Dice, NSD in mm, HD95 in mm) with the volume's own voxel spacing, as the
paper's 3D table does, rather than averaging 2D slice scores. With ``skip_bad`` a case that cannot be
indexed or read (corrupt, all-NaN, another grid than its label) is left out and listed in the summary.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsam3.data.volume_io import check_same_grid, read_volume
from medsam3.errors import DatasetError, MedSAM3Error
from medsam3.evaluate.runner import evaluate_volume_predictions
from medsam3.infer.volume import segment_volume
from medsam3.utils.files import atomic_files, write_json_atomic, write_text_atomic
from medsam3.utils.outputs import check_output_folder

FIELDS = ("case", "concept", "split", "dice", "iou", "nsd", "hd95", "gt_voxels", "pred_voxels", "seconds")


@dataclass(frozen=True)
class VolumeCase:
    case_id: str
    image: Path
    label: Path
    split: str


def _open_volumes(root: Path, layout: str, skip_bad: bool, seed: int):
    from medsam3.data.dataset import open_dataset

    # every slice a sample (negatives_fraction 1): a volume without any labelled structure stays a case
    return open_dataset(root, layout=layout, skip_bad=skip_bad, seed=seed, negatives_fraction=1.0)


def _cases_of(dataset, root: Path, split: str | None) -> tuple[list[VolumeCase], dict[str, tuple[int, ...]]]:
    from medsam3.data.layouts.refs import LabelMapTarget

    found: dict[str, VolumeCase] = {}
    labels: dict[str, tuple[int, ...]] = {}
    for ref in dataset.refs:
        target = ref.target
        if ref.image.slice_index is None or not isinstance(target, LabelMapTarget) or target.instance_map:
            raise DatasetError(
                f"{root}: --volumes needs 3D image and label volumes; {ref.image.path.name} is a 2D "
                f"{dataset.info.layout} image (evaluate it without --volumes)"
            )
        labels.setdefault(ref.concept, tuple(target.values))
        found.setdefault(ref.case_id, VolumeCase(ref.case_id, ref.image.path, target.path, ref.split or "train"))
    cases = list(found.values())
    if split is not None:
        cases = [c for c in cases if c.split == split]
        if not cases:
            raise DatasetError(f"{root}: the '{split}' split has no volumes")
    return cases, labels


def volume_cases(
    root: str | Path, split: str | None = "test", seed: int = 0, *, layout: str = "auto", skip_bad: bool = False
) -> tuple[list[VolumeCase], dict[str, tuple[int, ...]]]:
    """The dataset's cases (image + label volume) in ``split`` and its concepts: phrase -> label values.

    Read by the dataset's layout reader, so splits, names and phrases are those ``medsam3 train`` sees.
    """
    root = Path(root)
    return _cases_of(_open_volumes(root, layout, skip_bad, seed), root, split)


REPORT_FILES = ("per_case.csv", "summary.json", "report.md")


def check_volume_report(out_dir: str | Path, root: str | Path) -> Path:
    """Refuse a report folder before any work (a file, unwritable, the dataset itself, ...)."""
    return check_output_folder(out_dir, inputs=[root], files=REPORT_FILES)


def evaluate_volume_dataset(
    root: str | Path,
    predictor,
    *,
    out_dir: str | Path,
    split: str | None = "test",
    method: str = "slices",
    nsd_tolerance: float = 2.0,
    progress: bool = True,
    layout: str = "auto",
    skip_bad: bool = False,
) -> dict:
    """Segment and score every volume of ``split``; writes per_case.csv, summary.json, report.md.

    ``skip_bad``: a case that fails (unreadable, all-NaN, label on another grid) is skipped and
    listed in the summary instead of stopping the evaluation.
    """
    from tqdm.auto import tqdm

    out = check_volume_report(out_dir, root)
    dataset = _open_volumes(Path(root), layout, skip_bad, 0)
    cases, labels = _cases_of(dataset, Path(root), split)
    skipped: list[dict] = [{"case": None, "error": f"{item.path}: {item.problem}"} for item in dataset.skipped]
    rows = []
    for case in tqdm(cases, desc="volumes", disable=None if progress else True):
        try:
            rows += _score_case(case, labels, predictor, method, nsd_tolerance)
        except MedSAM3Error as error:
            if not skip_bad:
                raise
            skipped.append({"case": case.case_id, "error": str(error)})
    if not rows:
        first = f": first error: {skipped[0]['error']}" if skipped else ""
        raise DatasetError(f"{root}: no volume could be evaluated ({len(skipped)} skipped){first}")
    summary = _summarise(rows, root, method, split)
    summary["n_skipped"], summary["skipped"] = len(skipped), skipped
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_files() as files:  # all three or none
        write_text_atomic(files.path(out / "per_case.csv"), buffer.getvalue())
        write_json_atomic(files.path(out / "summary.json"), summary)
        write_text_atomic(files.path(out / "report.md"), markdown(summary))
    return summary


def _score_case(case: VolumeCase, labels: dict[str, tuple[int, ...]], predictor, method, nsd_tolerance) -> list[dict]:
    volume = read_volume(case.image)
    label_volume = read_volume(case.label)
    check_same_grid(volume, label_volume)
    truth = np.rint(label_volume.array).astype(np.int32)
    started = time.perf_counter()
    seg = segment_volume(volume, list(labels), predictor, method=method)
    seconds = time.perf_counter() - started
    value_of = {phrase: value for value, phrase in seg.legend.items()}
    rows = []
    for name, values in labels.items():
        gt = np.isin(truth, values)
        pred = seg.label_map == value_of[name] if name in value_of else np.zeros_like(gt)
        score = evaluate_volume_predictions(
            pred, gt, volume.spacing, nsd_tolerance=nsd_tolerance, case=f"{case.case_id} {name}"
        )
        rows.append(
            {
                "case": case.case_id,
                "concept": name,
                "split": case.split,
                **score.semantic.as_dict(),
                "gt_voxels": int(gt.sum()),
                "pred_voxels": int(pred.sum()),
                "seconds": round(seconds, 2),
            }
        )
    return rows


def _summarise(rows: list[dict], root, method: str, split) -> dict:
    concepts = {}
    for name in sorted({r["concept"] for r in rows}):
        present = [r for r in rows if r["concept"] == name and r["gt_voxels"] > 0]
        dice = [r["dice"] for r in present]
        hd = [r["hd95"] for r in present if math.isfinite(r["hd95"])]
        concepts[name] = {
            "n_volumes": len(present),
            "dice_mean": float(np.mean(dice)) if dice else None,
            "dice_std": float(np.std(dice)) if dice else None,
            "nsd_mean": float(np.mean([r["nsd"] for r in present])) if present else None,
            "hd95_mean_mm": float(np.mean(hd)) if hd else None,
            "hd95_inf": len(present) - len(hd),
        }
    return {
        "dataset": str(root),
        "method": method,
        "split": split,
        "metrics": "3D, spacing-aware",
        "concepts": concepts,
    }


def markdown(summary: dict) -> str:
    lines = [
        f"# 3D evaluation: {summary['dataset']} ({summary['method']}, split {summary['split']})",
        "",
        "| concept | volumes | Dice mean | Dice std | NSD mean | HD95 mm (finite) | HD95 inf |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    for name, s in summary["concepts"].items():
        lines.append(
            f"| {name} | {s['n_volumes']} | {fmt(s['dice_mean'])} | {fmt(s['dice_std'])} | "
            f"{fmt(s['nsd_mean'])} | {fmt(s['hd95_mean_mm'])} | {s['hd95_inf']} |"
        )
    lines += [
        "",
        "Dice, NSD and HD95 over the volumes that contain the structure, with the volume's voxel spacing.",
        "",
    ]
    if summary.get("n_skipped"):
        lines += [f"Skipped {summary['n_skipped']} bad case(s) or file(s) (--skip-bad): see summary.json.", ""]
    return "\n".join(lines)
