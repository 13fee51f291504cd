"""Cohort benchmark: a shell loop of single-file ``segment-volume`` vs the folder command.

    python benchmarks/bench_cohort.py --cases 40 --depth 8 --size 48 --model nano --ray

Writes ``--cases`` phantom abdominal CT volumes (``medsam3.data.phantoms.ct3d``: ``--depth``
slices of ``--size`` x ``--size`` pixels, NIfTI) and segments them (liver, kidney, spleen):

- ``loop``: one ``medsam3 segment-volume CASE.nii.gz --out ...`` process per case, as a shell
  script over the files would (a model load, imports and text encoding per case);
- ``folder, 1 worker`` / ``folder, 2 workers``: ``medsam3 segment-volume FOLDER --out FOLDER``;
- ``ray local`` (with ``--ray``): the folder command with ``--ray local`` (a local Ray instance
  started by the command, 2 actors).

Each is timed from the command's start to its exit, and reported as cases per minute; peak RSS is
the largest sum of resident memory over the command's process tree (Ray's own daemons included),
sampled every 0.1 s. Every run's label maps are compared voxel for voxel with the loop's and with
the 1-worker run's. Every command runs in a fresh process from the same Python, so imports are paid
as a user pays them. ``--loop-cases K`` runs the loop over the first K cases only (each of its
processes does the same work, so its rate per case does not depend on K), for a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table  # noqa: E402

PROMPTS = ["liver", "kidney", "spleen"]


def write_cases(folder: Path, count: int, depth: int, size: int, seed: int = 0) -> list[Path]:
    import SimpleITK as sitk

    from medsam3.data.phantoms.ct3d import make_ct3d

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        case = make_ct3d(np.random.default_rng(seed + k), size, depth=depth)
        image = sitk.GetImageFromArray(case.image.astype(np.int16))
        image.SetSpacing(tuple(float(s) for s in reversed(case.spacing)))
        path = folder / f"ct_{k:03d}.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        paths.append(path)
    return paths


def tree_rss(root) -> int:
    import psutil

    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_timed(commands: list[list[str]]) -> tuple[float, float]:
    """Run ``commands`` one after the other; (wall seconds, peak RSS of any one's process tree, GiB)."""
    import psutil

    peak = 0
    start = time.perf_counter()
    for command in commands:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(watched))
            except psutil.Error:
                pass
            time.sleep(0.1)
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{err[-2000:]}")
    return time.perf_counter() - start, peak / 2**30


def masks(folder: Path) -> dict[str, np.ndarray]:
    import SimpleITK as sitk

    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--model", default="nano")
    parser.add_argument(
        "--loop-cases",
        type=int,
        default=None,
        help="run the shell loop over the first K cases only (its rate is per case; default all)",
    )
    parser.add_argument("--ray", action="store_true", help="also run the folder command with --ray local")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    cases = write_cases(work / "in", args.cases, args.depth, args.size)
    medsam3 = [sys.executable, "-m", "medsam3.cli"]
    prompts = [a for p in PROMPTS for a in ("-p", p)]
    common = [*prompts, "--model", args.model, "--device", "cpu"]
    runs: dict[str, list[list[str]]] = {
        "shell loop (one process per case)": [
            [*medsam3, "segment-volume", str(c), "--out", str(work / "loop" / c.name), *common]
            for c in cases[: args.loop_cases or len(cases)]
        ],
        "folder, 1 worker": [[*medsam3, "segment-volume", str(work / "in"), "--out", str(work / "w1"), *common]],
        "folder, 2 workers": [
            [*medsam3, "segment-volume", str(work / "in"), "--out", str(work / "w2"), *common, "--workers", "2"]
        ],
    }
    if args.ray:
        runs["folder, Ray local (2 actors)"] = [
            [*medsam3, "segment-volume", str(work / "in"), "--out", str(work / "ray"), *common, "--workers", "2",
             "--ray", "local"]
        ]  # fmt: skip
    folders = {name: work / key for name, key in zip(runs, ("loop", "w1", "w2", "ray"))}
    results = {}
    for name, commands in runs.items():
        seconds, peak = run_timed(commands)
        done = len(commands) if name.startswith("shell loop") else len(cases)
        results[name] = {"cases": done, "seconds": round(seconds, 1), "cases_per_minute": round(60 * done / seconds, 2),
                         "peak_rss_gib": round(peak, 2)}  # fmt: skip
        print(f"{name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
    loop = masks(folders["shell loop (one process per case)"])
    one_worker = masks(folders["folder, 1 worker"])
    assert len(loop) == len(runs["shell loop (one process per case)"]) and len(one_worker) == len(cases)
    for name, folder in folders.items():
        found = masks(folder)
        same_loop = sum(np.array_equal(found.get(k), v) for k, v in loop.items())
        same_one = sum(np.array_equal(found.get(k), v) for k, v in one_worker.items())
        results[name]["identical_to_loop"] = f"{same_loop}/{len(loop)}"
        results[name]["identical_to_1_worker"] = f"{same_one}/{len(one_worker)}"
        results[name]["labelled_voxels"] = int(sum(int((m > 0).sum()) for m in found.values()))
    loop_rate = results["shell loop (one process per case)"]["cases_per_minute"]
    rows = [
        [name, r["cases"], r["seconds"], r["cases_per_minute"], f"{r['cases_per_minute'] / loop_rate:.1f}x",
         r["peak_rss_gib"], r["identical_to_loop"], r["identical_to_1_worker"]]
        for name, r in results.items()
    ]  # fmt: skip
    print()
    print(f"{len(cases)} phantom CT volumes of {args.depth} x {args.size} x {args.size} voxels, prompts "
          f"{', '.join(PROMPTS)}, model {args.model}; {machine()}")  # fmt: skip
    headers = [
        "run",
        "cases",
        "seconds",
        "cases/min",
        "vs loop",
        "peak RSS (GiB)",
        "masks = loop's",
        "masks = 1 worker's",
    ]
    print(markdown_table(headers, rows))
    if args.json:
        meta = {"cases": len(cases), "depth": args.depth, "size": args.size, "model": args.model,
                "machine": machine(), "cpus": os.cpu_count()}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
