"""Which checkpoint of a few-shot run to keep: validation's pick, the final weights, their mean, or an EMA.

    python benchmarks/bench_fewshot.py --out runs/bench_fewshot --skip "lite old recipe"
    python benchmarks/bench_checkpoint_choice.py --runs runs/bench_fewshot --out runs/checkpoint_choice

A few-shot split validates on 1-2 held-out slices (under the view bank's views). That decides early
stopping; which weights ``RUN/best`` holds is ``TrainConfig.keep`` (``auto``: on such a thin split
the mean of validation's pick and the moving average of the weights, the pick moved to
``RUN/validation-pick``; runs from before that option have the pick in ``best/``). This scores, for
every task that ``bench_fewshot.py`` trained, validation's pick, the final weights (``last/``), the
element-wise mean of the two and the moving-average variants the run kept: for runs trained with
``--set keep=ema`` the average itself (their ``best/``) and its mean with the pick, for the default's
runs that mean (their ``best/``); from text on the axial test slices and the unseen coronal ones, so
the choice itself is measured. Each variant's
mask sources are chosen on the run's own validation split, as ``medsam3 train`` chooses them (the
pick's are the run's record). Nothing is trained. Table to stdout and ``OUT/results.md`` (+
``results.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_fewshot import score  # noqa: E402
from common import machine, markdown_table, use_command_defaults, write_results  # noqa: E402

from medsam3.data.dataset import open_dataset
from medsam3.data.fewshot_sets import TASKS, build_fewshot_sets
from medsam3.data.transforms import view_augmentation
from medsam3.model import load_model
from medsam3.train.mask_choice import choose_mask_sources, record_mask_sources
from medsam3.train.run import training_splits
from medsam3.train.trainer import VALIDATION_PICK, mean_weights, scored_validation

VARIANTS = ("validation pick", "final weights", "mean of the two")
EMA_VARIANT = "weight average (EMA)"  # only in runs that kept one (their best/)
PICK_EMA_MEAN = "mean of pick and EMA"
EMA_VARIANTS = (EMA_VARIANT, PICK_EMA_MEAN)


def validation_split(data: Path, seed: int):
    """The run's validation samples, as ``train_path`` held them out and the trainer scored them."""
    dataset = open_dataset(data)
    _, val, _ = training_splits(dataset.split("train"), dataset.split("val"), seed)
    return scored_validation(val, view_augmentation(seed=seed), None)[1]


def ema_variants(kept: str | None) -> tuple[str, ...]:
    """The moving-average variants a run can be scored on: a ``keep=ema`` run saved the average (its
    best/), a ``keep=average-ema`` run (the default on a thin split) only its mean with the pick."""
    return {"ema": EMA_VARIANTS, "average-ema": (PICK_EMA_MEAN,)}.get(kept, ())


def variant_adapter(run: Path, variant: str, out: Path, val_samples, pick: Path, kept: str | None) -> Path:
    """The adapter folder of one variant; the others are written under ``out`` (the run is only read)."""
    if variant == "validation pick":
        return pick
    if variant == EMA_VARIANT or (variant == PICK_EMA_MEAN and kept == "average-ema"):
        return run / "best"
    folder = out / variant.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(pick / "adapter.json", folder / "adapter.json")
    if variant == "final weights":
        shutil.copy(run / "last" / "adapter.safetensors", folder / "adapter.safetensors")
    else:
        other = run / ("best" if variant == PICK_EMA_MEAN else "last") / "adapter.safetensors"
        mean = mean_weights(load_file(pick / "adapter.safetensors"), load_file(other))
        save_file(mean, folder / "adapter.safetensors")
    loaded = load_model("lite", device="cpu", adapter=folder)
    record_mask_sources(folder, choose_mask_sources(loaded, val_samples))
    return folder


def step_of(adapter: Path) -> int | None:
    return (json.loads((adapter / "adapter.json").read_text()).get("position") or {}).get("step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_fewshot"), help="bench_fewshot.py's --out")
    parser.add_argument("--data", type=Path, default=None, help="the task folders (default RUNS/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/checkpoint_choice"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (their validation split)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_command_defaults()
    folders = build_fewshot_sets(args.data or args.runs / "data")
    rows = []
    for task in TASKS:
        axial, coronal = folders[task.concept]["axial"], folders[task.concept]["coronal"]
        run = args.runs / axial.name / "defaults"
        pick = run / VALIDATION_PICK if (run / VALIDATION_PICK).is_dir() else run / "best"
        if not (pick / "adapter.safetensors").is_file() or not (run / "last" / "adapter.safetensors").is_file():
            print(f"{run}: no validation pick and last/ adapters, skipped", file=sys.stderr)
            continue
        work = args.out / axial.name
        val_samples = validation_split(axial, args.seed)
        steps = {"validation pick": step_of(pick), "final weights": step_of(run / "last")}
        kept = json.loads((run / "summary.json").read_text()).get("kept")
        for variant in VARIANTS + ema_variants(kept):
            adapter = variant_adapter(run, variant, work, val_samples, pick, kept)
            step = steps.get(variant, f"{steps['validation pick']} + {steps['final weights']}")
            if variant in EMA_VARIANTS:
                step = f"1-{steps['final weights']}" if variant == EMA_VARIANT else f"{steps['validation pick']} + EMA"
            sources = json.loads((adapter / "adapter.json").read_text()).get("mask_sources") or {}
            row = {"task": task.concept, "variant": variant, "step": step,
                   "mask_sources": {c: v["source"] for c, v in sources.items()}}  # fmt: skip
            for view, folder in (("axial", axial), ("coronal", coronal)):
                tag = f"{variant}_{view}".replace(" ", "_")
                row[f"text {view}"] = score(folder, "lite", adapter, "text", work / "eval" / tag)
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = markdown_table(
        ["task", "checkpoint", "step", "T axial", "T coronal (unseen)"],
        [
            [r["task"], r["variant"], r["step"]]
            + [f"{r[f'text {v}']['dice']:.3f} / {r[f'text {v}']['nsd']:.3f}" for v in ("axial", "coronal")]
            for r in rows
        ],
    )
    header = f"Checkpoint choice on the few-shot runs in {args.runs}, Dice / NSD (2 mm); {machine()}\n\n"
    write_results(args.out, rows, header + table)


if __name__ == "__main__":
    main()
