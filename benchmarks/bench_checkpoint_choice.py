"""Which checkpoint of a few-shot run to keep: the one validation picked, the last, or their mean.

    python benchmarks/bench_fewshot.py --out runs/bench_fewshot --skip "lite old recipe"
    python benchmarks/bench_checkpoint_choice.py --runs runs/bench_fewshot --out runs/checkpoint_choice

A few-shot split validates on 1-2 held-out slices (under the view bank's views), and that choice
decides early stopping and ``RUN/best``. This scores, for every task that ``bench_fewshot.py``
trained, ``best/`` (what the command hands the user), ``last/`` and the element-wise mean of the two
adapters, from text on the axial test slices and the unseen coronal ones, so the choice itself is
measured. Every variant uses ``best/``'s per-concept mask sources; nothing is trained. Table to stdout
and ``OUT/results.md`` (+ ``results.json``).
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

from medsam3.data.fewshot_sets import TASKS, build_fewshot_sets

VARIANTS = ("best", "last", "mean of best and last")


def variant_adapter(run: Path, variant: str, out: Path) -> Path:
    """The adapter folder of one variant; the mean is written under ``out`` (the run is only read)."""
    if variant == "best":
        return run / "best"
    folder = out / variant.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "best" / "adapter.json", folder / "adapter.json")  # best's mask sources for every variant
    if variant == "last":
        shutil.copy(run / "last" / "adapter.safetensors", folder / "adapter.safetensors")
    else:
        best, last = load_file(run / "best" / "adapter.safetensors"), load_file(run / "last" / "adapter.safetensors")
        mean = {k: ((best[k].float() + last[k].float()) / 2).to(best[k].dtype) for k in best}
        save_file(mean, folder / "adapter.safetensors")
    return folder


def step_of(adapter: Path) -> int | None:
    return (json.loads((adapter / "adapter.json").read_text()).get("position") or {}).get("step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_fewshot"), help="bench_fewshot.py's --out")
    parser.add_argument("--data", type=Path, default=None, help="the task folders (default RUNS/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/checkpoint_choice"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_command_defaults()
    folders = build_fewshot_sets(args.data or args.runs / "data")
    rows = []
    for task in TASKS:
        axial, coronal = folders[task.concept]["axial"], folders[task.concept]["coronal"]
        run = args.runs / axial.name / "defaults"
        if not (run / "best" / "adapter.safetensors").is_file() or not (run / "last" / "adapter.safetensors").is_file():
            print(f"{run}: no best/ and last/ adapters, skipped", file=sys.stderr)
            continue
        work = args.out / axial.name
        steps = {"best": step_of(run / "best"), "last": step_of(run / "last")}
        for variant in VARIANTS:
            adapter = variant_adapter(run, variant, work)
            step = steps.get(variant, f"{steps['best']} + {steps['last']}")
            row = {"task": task.concept, "variant": variant, "step": step}
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
