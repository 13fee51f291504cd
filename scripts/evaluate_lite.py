"""Evaluate the bundled ``lite`` model on data it never trained on: the table the README quotes.

    python scripts/evaluate_lite.py --real real_sets --phantoms runs/lite/phantoms --out eval/lite

Per concept, text (T) and text+box (T+I) prompts, on the test splits of every real set lite was
pretrained on (other slices / the other half of the image), on the unseen-view sets (coronal MR
slices; lite trained on axial ones only), and on the phantom test splits. Each run is what
``medsam3 evaluate DATA --model lite --prompt-mode MODE`` writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medsam3.data.real_sets import build_real_sets
from medsam3.evaluate.runner import evaluate_path
from medsam3.train.recipes import LITE_PHANTOM_KINDS, LITE_REAL_SETS

UNSEEN_VIEWS = ("mni-tissue-coronal", "mni-tracts-coronal")
#: Other patients (brain2, lung1): lite trains on other slices of these two volumes, so not unseen for lite.
OTHER_SETS = ("radiomics-tumor-othercase",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=Path("real_sets"))
    parser.add_argument("--phantoms", type=Path, default=Path("runs/lite/phantoms"))
    parser.add_argument("--out", type=Path, default=Path("eval/lite"))
    parser.add_argument("--model", default="lite")
    parser.add_argument("--adapter", type=Path, default=None)
    args = parser.parse_args()
    build_real_sets(args.real)
    runs = [(f"real {name}", args.real / name) for name in (*LITE_REAL_SETS, *UNSEEN_VIEWS, *OTHER_SETS)]
    phantoms = [kind for kind in LITE_PHANTOM_KINDS if (args.phantoms / kind).is_dir()]
    runs += [(f"phantom {kind}", args.phantoms / kind) for kind in phantoms]
    print(
        "| data | concept | prompt | positives | negatives | Dice (positives) | NSD | presence acc. "
        "| found | Dice (found) | negatives with a prediction |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, data in runs:
        for mode in ("text", "text+box"):
            result = evaluate_path(
                data,
                args.model,
                adapter=args.adapter,
                out_dir=args.out / f"{name.replace(' ', '_')}_{mode.replace('+', '_')}",
                prompt_mode=mode,
                split="test",
                device="cpu",
                progress=False,
            )
            for concept, stats in result.summary["concepts"].items():
                fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
                found, found_dice, false_alarms = detection_counts(result.records, concept)
                print(
                    f"| {name} | {concept} | {mode} | {stats['n_positive']} | {stats['n_negative']} | "
                    f"{fmt(stats['dice']['mean'])} | {fmt(stats['nsd']['mean'])} | "
                    f"{fmt(stats['presence'].get('accuracy'))} | {found}/{stats['n_positive']} | "
                    f"{fmt(found_dice)} | {false_alarms}/{stats['n_negative']} |",
                    flush=True,
                )


def detection_counts(records, concept: str) -> tuple[int, float | None, int]:
    """(slices holding the concept where the prediction overlaps the truth, their mean Dice,
    slices without it where something was predicted)."""
    mine = [r for r in records if r.concept == concept]
    hits = [r.dice for r in mine if r.presence_gt and r.dice > 0]
    false_alarms = sum(1 for r in mine if not r.presence_gt and r.n_pred > 0)
    return len(hits), (sum(hits) / len(hits) if hits else None), false_alarms


if __name__ == "__main__":
    main()
