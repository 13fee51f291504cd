"""Evaluate the bundled model on held-out data: the table the README quotes.

    python scripts/evaluate_nano.py --phantoms runs/nano/phantoms --real real_examples --out eval/nano

Phantom test splits (never seen in training) with text (T) and text+box (T+I) prompts, and the real
offline cases from ``medsam3 data fetch-examples`` (zero-shot: nano never saw a real image). Each
run is what ``medsam3 evaluate DATA --model nano --prompt-mode MODE --split SPLIT`` writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medsam3.data.examples import fetch_examples
from medsam3.evaluate.runner import evaluate_path
from medsam3.train.recipes import NANO_KINDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=Path, default=Path("runs/nano/phantoms"))
    parser.add_argument("--real", type=Path, default=Path("real_examples"))
    parser.add_argument("--out", type=Path, default=Path("eval/nano"))
    parser.add_argument("--model", default="nano")
    args = parser.parse_args()
    if not (args.real / "examples.json").is_file():
        fetch_examples(args.real)
    real = sorted(p.parent for p in args.real.glob("*/dataset.json"))
    runs = [(kind, args.phantoms / kind, "test") for kind in NANO_KINDS]
    runs += [(f"real {folder.name}", folder, None) for folder in real]
    rows = []
    for name, data, split in runs:
        for mode in ("text", "text+box"):
            result = evaluate_path(
                data,
                args.model,
                out_dir=args.out / f"{name}_{mode.replace('+', '_')}",
                prompt_mode=mode,
                split=split,
                device="cpu",
                progress=False,
            )
            for concept, stats in result.summary["concepts"].items():
                dice = stats["dice"]
                rows.append(
                    (
                        name,
                        concept,
                        mode,
                        stats["n_positive"],
                        stats["n_negative"],
                        dice["mean"],
                        dice["std"],
                        stats["presence"].get("accuracy"),
                    )
                )
    print("| data | concept | prompt | positives | negatives | Dice mean | Dice std | presence acc. |")
    print("|---|---|---|---|---|---|---|---|")
    for name, concept, mode, pos, neg, mean, std, acc in rows:
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {concept} | {mode} | {pos} | {neg} | {fmt(mean)} | {fmt(std)} | {fmt(acc)} |")


if __name__ == "__main__":
    main()
