"""3D evaluation: segment whole volumes and score them with spacing-aware 3D metrics.

``medsam3 evaluate DATA --volumes`` reads an nnU-Net / MSD volume dataset case by case, runs the
streamed volume segmentation (each slice encoded once) with every labelled concept as a prompt, and
scores each structure in 3D (Dice, NSD in mm, HD95 in mm) with the volume's own voxel spacing, as the
paper's 3D table does, rather than averaging 2D slice scores.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsam3.data.splits import split_cases
from medsam3.data.volume_io import check_same_grid, read_volume
from medsam3.errors import DatasetError
from medsam3.evaluate.runner import evaluate_volume_labels
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


def _labels(meta: dict, root: Path) -> dict[str, int]:
    """name -> value from dataset.json, in nnU-Net v2 (name: value) or MSD (value: name) form."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{root / 'dataset.json'}: no 'labels' mapping")
    first_key = next(iter(raw))
    pairs = {v: int(k) for k, v in raw.items()} if str(first_key).isdigit() else {k: int(v) for k, v in raw.items()}
    return {name: value for name, value in pairs.items() if value != 0 and name.lower() != "background"}


def volume_cases(root: str | Path, split: str | None = "test", seed: int = 0) -> tuple[list[VolumeCase], dict]:
    """The dataset's cases (image + label volume) in ``split`` and its label table."""
    root = Path(root)
    meta_file = root / "dataset.json"
    if not meta_file.is_file():
        raise DatasetError(f"{root}: --volumes needs an nnU-Net/MSD folder with dataset.json")
    meta = json.loads(meta_file.read_text())
    ending = meta.get("file_ending", ".nii.gz")
    found: dict[str, tuple[Path, Path, str | None]] = {}
    for images, labels, fixed in (("imagesTr", "labelsTr", None), ("imagesTs", "labelsTs", "test")):
        for image in sorted((root / images).glob(f"*_0000{ending}")):
            case_id = image.name[: -len(f"_0000{ending}")]
            label = root / labels / f"{case_id}{ending}"
            if not label.is_file():
                raise DatasetError(f"{image}: no label volume {label}")
            found[case_id] = (image, label, fixed)
    if not found:
        raise DatasetError(f"{root}: no volumes (*_0000{ending}) in imagesTr/ or imagesTs/")
    chosen = split_cases(list(found), {c: s for c, (_, _, s) in found.items() if s}, seed=seed)
    cases = [VolumeCase(c, img, lab, chosen[c]) for c, (img, lab, _) in found.items()]
    if split is not None:
        cases = [c for c in cases if c.split == split]
        if not cases:
            raise DatasetError(f"{root}: the '{split}' split has no volumes")
    return cases, _labels(meta, root)


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
) -> dict:
    """Segment and score every volume of ``split``; writes per_case.csv, summary.json, report.md."""
    from tqdm.auto import tqdm

    out = check_volume_report(out_dir, root)
    cases, labels = volume_cases(root, split)
    rows = []
    for case in tqdm(cases, desc="volumes", disable=None if progress else True):
        volume = read_volume(case.image)
        label_volume = read_volume(case.label)
        check_same_grid(volume, label_volume)  # a label on another grid would be scored on the wrong voxels
        truth = np.rint(label_volume.array).astype(np.int32)
        started = time.perf_counter()
        seg = segment_volume(volume, list(labels), predictor, method=method)
        seconds = time.perf_counter() - started
        predicted = np.zeros_like(truth)
        for value, phrase in seg.legend.items():
            predicted[seg.label_map == value] = labels[phrase]
        scores = evaluate_volume_labels(
            predicted, truth, volume.spacing, labels, nsd_tolerance=nsd_tolerance, case=case.case_id
        )
        for name, score in scores.items():
            rows.append(
                {
                    "case": case.case_id,
                    "concept": name,
                    "split": case.split,
                    **score.semantic.as_dict(),
                    "gt_voxels": int((truth == labels[name]).sum()),
                    "pred_voxels": int((predicted == labels[name]).sum()),
                    "seconds": round(seconds, 2),
                }
            )
    summary = _summarise(rows, root, method, split)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_files() as files:  # all three or none
        write_text_atomic(files.path(out / "per_case.csv"), buffer.getvalue())
        write_json_atomic(files.path(out / "summary.json"), summary)
        write_text_atomic(files.path(out / "report.md"), markdown(summary))
    return summary


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
    return "\n".join(lines)
