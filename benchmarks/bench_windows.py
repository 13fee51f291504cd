"""Window robustness: the same real tumour test slices under every window a viewer user may pick.

    python benchmarks/bench_windows.py --model lite --out runs/bench_windows

``radiomics-tumor``'s test slices (other slices of the training patients; see medsam3.data.real_sets)
are written once per window (medsam3.data.window_sets): CT under each viewer preset, MR under
several percentile windows. For each window and concept: Dice over the slices that hold the concept,
text (T) and text + ground-truth box (T+I), and the change against the set's own window (CT lung,
MR 0.5-99.5 percentiles). A model robust to windowing keeps every change within 0.05.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

from medsam3.data.window_sets import build_window_sets
from medsam3.evaluate.runner import evaluate_path

DEFAULTS = {"ct": "ct-lung", "mr": "mr-p0.5-99.5"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite")
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_windows"))
    parser.add_argument("--modes", nargs="+", default=["text", "text+box"])
    args = parser.parse_args()
    sets = build_window_sets(args.out / "sets")
    rows = []
    for name, folder in sets.items():
        for mode in args.modes:
            result = evaluate_path(
                folder,
                args.model,
                adapter=args.adapter,
                out_dir=args.out / "eval" / f"{name}_{mode.replace('+', '_')}",
                prompt_mode=mode,
                split="test",
                device="cpu",
                progress=False,
            )
            for concept, stats in result.summary["concepts"].items():
                if stats["n_positive"]:
                    dice = stats["dice"]["mean"] or 0.0
                    rows.append({"window": name, "mode": mode, "concept": concept, "dice": dice})
    by_key = {(r["window"], r["mode"], r["concept"]): r for r in rows}
    for r in rows:
        r["change"] = r["dice"] - by_key[(DEFAULTS[r["window"][:2]], r["mode"], r["concept"])]["dice"]
    lines = [
        f"{args.model}{' + ' + str(args.adapter) if args.adapter else ''}; {machine()}",
        "",
        "| window | concept | " + " | ".join(f"{m} Dice | change" for m in args.modes) + " |",
        "|---|---|" + "---|---|" * len(args.modes),
    ]
    for name in sets:
        for concept in sorted({r["concept"] for r in rows if r["window"] == name}):
            cells = [by_key[(name, mode, concept)] for mode in args.modes]
            lines.append(
                f"| {name} | {concept} | " + " | ".join(f"{c['dice']:.3f} | {c['change']:+.3f}" for c in cells) + " |"
            )
    worst = {m: max((abs(r["change"]) for r in rows if r["mode"] == m), default=0.0) for m in args.modes}
    lines += ["", "largest change: " + ", ".join(f"{m} {v:.3f}" for m, v in worst.items())]
    write_results(args.out, rows, "\n".join(lines))


if __name__ == "__main__":
    main()
