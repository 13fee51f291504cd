"""Few-shot fine-tuning benchmark: a new concept from <= 16 real slices, against a U-Net at equal wall clock.

    python benchmarks/bench_fewshot.py --out runs/bench_fewshot            # the defaults' own budget
    python benchmarks/bench_fewshot.py --out runs/quick --minutes 3 --tasks "insular cortex"
    python benchmarks/bench_fewshot.py --out runs/lr3e-4 --set lr=3e-4 --skip "lite old recipe" U-Net \
        "LiteMedSAM + GT box" --modes text          # a setting of the defaults, tried alone

Tasks (medsam3.data.fewshot_sets): concepts the bundled ``lite`` never saw, on the real MNI152 T1
template: "external capsule", "superior longitudinal fasciculus" (JHU atlas), "insular cortex",
"precentral gyrus" (Harvard-Oxford). Each: <= 16 axial training slices, a test split of other
axial slices, and coronal slices (a view training never shows). Rows, per task:

- ``lite defaults``: ``medsam3 train DATA --out RUN`` with nothing else (library: ``train_path``);
  ``--minutes`` overrides only its time budget.
- ``lite old recipe``: the recipe before issue 17 at the same wall clock as the defaults took
  (10 epochs' worth of settings: lr 1e-4, cosine over the run, BCE semantic term on every image,
  queries pushed to 0 in absent images, mask loss on the prediction grid, no augmentation,
  semantic-map masks).
- ``U-Net``: ``medsam3 baseline unet`` (MONAI) for the same wall clock as the defaults took.
- ``LiteMedSAM + GT box``: the pretrained box decoder on the ground-truth boxes, no training (a
  zero-shot reference for text+box).

Scores: mean Dice / NSD (2 px = 2 mm) over the test slices, text prompts (T) and text + ground-truth
box (T+I), on the trained view (axial) and the unseen view (coronal). Table to stdout and
``OUT/results.md`` (+ ``results.json``). The budgets are wall clock: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table, use_command_defaults, write_results  # noqa: E402

from medsam3.data.fewshot_sets import TASKS, build_fewshot_sets
from medsam3.evaluate.baseline_unet import train_unet_baseline
from medsam3.evaluate.runner import evaluate_path
from medsam3.train.losses import LEGACY_LOSS
from medsam3.train.run import train_path
from medsam3.train.trainer import TrainConfig


def old_recipe(minutes: float, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=100_000,
        lr=1e-4,
        seed=seed,
        cache_features=True,
        max_minutes=minutes,
        progress=False,
        choose_mask_sources=False,
        loss_weights=dict(LEGACY_LOSS),
        optimizer_groups=False,
        head_steps=0,
    )


def config_settings(pairs: list[str]) -> dict:
    """``["lr=3e-4", "cache_dir=/tmp/c"]`` -> ``{"lr": 3e-4, "cache_dir": "/tmp/c"}`` (JSON values, else strings)."""
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def score(data: Path, model: str, adapter: Path | None, mode: str, out: Path) -> dict:
    result = evaluate_path(data, model, adapter=adapter, prompt_mode=mode, out_dir=out, device="cpu", progress=False)
    overall = result.summary["overall"]
    return {
        "dice": overall["dice"]["mean"] or 0.0,
        "nsd": overall["nsd"]["mean"] or 0.0,
        "cases": result.summary["n_cases"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fewshot"))
    parser.add_argument("--data", type=Path, default=None, help="where the task folders go (default OUT/data)")
    parser.add_argument("--tasks", nargs="*", default=[t.concept for t in TASKS])
    parser.add_argument("--minutes", type=float, default=None, help="override the defaults' time budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out (e.g. 'lite old recipe')")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig fields for the 'lite defaults' row (tuning: lr=3e-4 steps=800 cache_dir=...)")
    parser.add_argument("--modes", nargs="+", default=["text", "text+box"], help="prompt modes to score")
    parser.add_argument("--table-only", action="store_true", help="print the table of OUT/results.json again")
    args = parser.parse_args()
    if args.table_only:
        print(markdown(json.loads((args.out / "results.json").read_text()), args))
        return
    torch.set_num_threads(args.threads)
    use_command_defaults()  # what `medsam3 train` runs: the fast frozen tower where this CPU has one
    data_root = args.data or args.out / "data"
    folders = build_fewshot_sets(data_root)
    rows = []
    for concept in args.tasks:
        axial, coronal = folders[concept]["axial"], folders[concept]["coronal"]
        work = args.out / axial.name
        models: dict[str, tuple[str, Path | None, float]] = {}
        started = time.perf_counter()
        settings = {} if args.minutes is None else {"max_minutes": args.minutes}
        settings.update(config_settings(args.set))
        run = train_path(axial, "lite", work / "defaults", device="cpu", seed=args.seed, progress=False, **settings)
        budget = time.perf_counter() - started
        models["lite defaults"] = ("lite", run.adapter, budget)
        if "lite old recipe" not in args.skip:
            started = time.perf_counter()
            old = train_path(axial, "lite", work / "old", config=old_recipe(budget / 60.0, args.seed), augment="none",
                             device="cpu")  # fmt: skip
            # no mask_sources in its adapter.json: "auto" is lite's default, the semantic map, as before
            models["lite old recipe"] = ("lite", old.adapter, time.perf_counter() - started)
        if "U-Net" not in args.skip:
            started = time.perf_counter()
            unet = work / "unet"
            train_unet_baseline(axial, unet, epochs=100_000, max_minutes=budget / 60.0, seed=args.seed, progress=False)
            models["U-Net"] = (str(unet), None, time.perf_counter() - started)
        if "LiteMedSAM + GT box" not in args.skip:
            models["LiteMedSAM + GT box"] = ("lite", None, 0.0)
        for label, (model, adapter, seconds) in models.items():
            row = {"task": concept, "method": label, "train_s": round(seconds, 1)}
            if label == "lite defaults":
                row["stop"] = run.summary["stop_reason"]
                row["steps"] = run.summary["position"]["step"]
                row["mask_sources"] = {c: v["source"] for c, v in (run.summary.get("mask_sources") or {}).items()}
            modes = {"U-Net": ("text",), "LiteMedSAM + GT box": ("text+box",)}.get(label, ("text", "text+box"))
            for mode in (m for m in modes if m in args.modes):
                for view, folder in (("axial", axial), ("coronal", coronal)):
                    tag = f"{label}_{mode}_{view}".replace(" ", "_").replace("+", "")
                    row[f"{mode} {view}"] = score(folder, model, adapter, mode, work / "eval" / tag)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(args.out, rows, markdown(rows, args))


def markdown(rows: list[dict], args) -> str:
    def cell(row, key):
        value = row.get(key)
        return "–" if value is None else f"{value['dice']:.3f} / {value['nsd']:.3f}"

    budget = f"time budget {args.minutes:g} min" if args.minutes is not None else "the defaults' own budget"
    if args.set:
        budget += f"; lite defaults with {' '.join(args.set)}"
    keys = ("text axial", "text coronal", "text+box axial", "text+box coronal")
    table = markdown_table(
        ["task", "method", "train s", "T axial", "T coronal (unseen)", "T+I axial", "T+I coronal"],
        [[row["task"], row["method"], f"{row['train_s']:.0f}", *(cell(row, k) for k in keys)] for row in rows],
    )
    return f"Few-shot benchmark, Dice / NSD (2 mm) over the test slices; {budget}; {machine()}\n\n{table}"


if __name__ == "__main__":
    main()
