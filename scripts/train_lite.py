"""Train the bundled default model ``lite``: one command, reproducible.

    python scripts/train_lite.py --out runs/lite --export src/medsam3/model/weights/lite

Builds the real labelled sets (``medsam3 data fetch-real``), the dense training sets (every slice of
the same volumes that is not a benchmark test slice, under CT window presets and MR percentile
windows, plus sagittal MNI slices: :mod:`medsam3.data.dense_sets`) and the phantom corpus, then trains
lite's detector, vision neck and text projection with MedSAM-3's policy (LiteMedSAM's image encoder
and MiniLM frozen) and the fine-tuning recipe's defaults (SAM 3's losses, parameter groups, per-concept
mask sources, a cached bank of augmented views), under a wall-clock budget. Test splits, the coronal
unseen-view sets and the held-out concept are never seen. Exports the best validation checkpoint as
the model folder the ``lite`` preset loads: only the trained parts; the pretrained towers come from
their packages at load time.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from medsam3.data.dense_sets import CT_WINDOWS, MR_PERCENTILES, build_dense_train_sets
from medsam3.data.real_sets import build_real_sets
from medsam3.data.transforms import view_augmentation
from medsam3.model import load_model
from medsam3.model.export import export_model
from medsam3.train.recipes import (
    HELD_OUT_CONCEPT,
    LITE_DENSE_SETS,
    LITE_PHANTOM_KINDS,
    LITE_REAL_ONLY_SETS,
    LITE_TRAIN_REPEATS,
    lite_dense_splits,
    make_phantom_corpus,
)
from medsam3.train.trainer import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lite"))
    parser.add_argument("--real", type=Path, default=Path("real_sets"), help="where fetch-real writes its sets")
    parser.add_argument("--export", type=Path, default=None, help="write the trained model folder here")
    parser.add_argument("--n-per-kind", type=int, default=60, help="phantom cases per kind (80%% train)")
    parser.add_argument("--minutes", type=float, default=75.0, help="wall-clock budget, view encoding included")
    parser.add_argument("--steps", type=int, default=20000, help="step budget (the time budget usually ends first)")
    parser.add_argument("--views", type=int, default=4, help="augmented views per image (view 0 the image)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", default="openvino", help="the frozen image tower's runtime: torch or openvino")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this exported lite folder (a previous run of this script) instead of lite-init: "
        "a second stage with a fresh warm-up and cosine schedule",
    )
    parser.add_argument(
        "--extra-phantoms",
        action="append",
        default=[],
        metavar="KIND=N",
        help="a second corpus of N cases of a phantom kind, from another seed, whose train split (80%%) is added "
        "(the main corpus and its test split stay as they are): weight for the concepts a previous stage "
        "learned least",
    )
    parser.add_argument(
        "--repeat",
        action="append",
        default=[],
        metavar="SET=K",
        help=f"a dense set seen K times per training epoch (default: {LITE_TRAIN_REPEATS})",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--export-only", action="store_true", help="export RUN/best of a finished run")
    parser.add_argument(
        "--choose-mask-sources-only",
        action="store_true",
        help="measure each concept's text mask source for the model folder at --export on the validation split "
        "and record it in its medsam3.json (what export does at the end of training)",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    build_real_sets(args.real)
    dense_root = args.out / "dense"
    build_dense_train_sets(dense_root)
    phantoms = make_phantom_corpus(args.out / "phantoms", args.n_per_kind, seed=args.seed, kinds=LITE_PHANTOM_KINDS)
    for kind, n in parse_pairs(args.extra_phantoms, LITE_PHANTOM_KINDS).items():
        phantoms += make_phantom_corpus(args.out / "phantoms-extra", n, seed=args.seed + 1, kinds=(kind,))
    args.repeats = {**LITE_TRAIN_REPEATS, **parse_pairs(args.repeat, LITE_DENSE_SETS)}
    splits = lite_dense_splits(dense_root, args.real, phantoms, exclude={HELD_OUT_CONCEPT}, repeats=args.repeats)
    print({name: len(data) for name, data in splits.items()}, flush=True)
    if args.choose_mask_sources_only:
        if args.export is None:
            raise SystemExit("--export DIR is needed")
        record_mask_sources(args.export, splits["val"])
        return
    if args.export_only:
        history = list(csv.DictReader((args.out / "metrics.csv").open()))
        export(args, splits, history, minutes=float(history[-1]["seconds"]) / 60)
        return
    loaded = load_model(str(args.init) if args.init else "lite-init", device="cpu", runtime=args.runtime)
    config = TrainConfig(
        steps=args.steps,
        max_minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        cache_features=True,
        cache_dir=str(args.out / "cache"),
        checkpoint_every=200,
        val_every=400,
        val_limit=300,
        patience=0,  # a long run on a large set: the cosine schedule, not early stopping, ends it
        choose_mask_sources=False,  # export measures them (and the box modes) on the exported folder
        head_steps=0,  # the shipped stages predate the head's stage; it stays at its zero start
    )
    augment = view_augmentation(views=args.views, seed=args.seed)
    trainer = Trainer(loaded, splits["train"], args.out, config, val_data=splits["val"], augment=augment)
    if args.resume:
        trainer.resume()
    started = time.perf_counter()
    summary = trainer.fit()
    minutes = (time.perf_counter() - started) / 60
    print(json.dumps(summary["history"], indent=1), flush=True)
    if args.export:
        export(args, splits, list(csv.DictReader((args.out / "metrics.csv").open())), minutes)


def export(args, splits, history: list[dict], minutes: float) -> None:
    """Write the folder the ``lite`` preset loads, from the best validation checkpoint (RUN/best)."""
    if args.export is None:
        raise SystemExit("--export DIR is needed")
    final = load_model(str(args.init) if args.init else "lite-init", device="cpu", adapter=args.out / "best")
    info = {
        "name": "lite",
        "what": "LiteMedSAM's TinyViT medical image encoder and all-MiniLM-L6-v2 (both frozen, from their "
        "pinned PyPI packages) feeding a SAM 3 detector, vision neck and text projection trained by this "
        "project; not SAM 3",
        "recipe": "python scripts/train_lite.py "
        f"--n-per-kind {args.n_per_kind} --minutes {args.minutes:g} --steps {args.steps} --views {args.views} "
        f"--batch-size {args.batch_size} --lr {args.lr:g} --seed {args.seed}"
        + "".join(f" --extra-phantoms {pair}" for pair in args.extra_phantoms)
        + "".join(f" --repeat {pair}" for pair in args.repeat)
        + (" --init PREVIOUS" if args.init else ""),
        "dense_sets": list(LITE_DENSE_SETS),
        "dense_windows": dense_windows(),
        "train_repeats": dict(args.repeats),
        "extra_phantoms": dict(parse_pairs(args.extra_phantoms, LITE_PHANTOM_KINDS)),
        "real_sets": list(LITE_REAL_ONLY_SETS),
        "phantom_kinds": list(LITE_PHANTOM_KINDS),
        "held_out_concept": HELD_OUT_CONCEPT,
        "train_samples": len(splits["train"]),
        "val_samples": len(splits["val"]),
        "steps": int(history[-1]["step"]) if history else 0,
        "views_per_image": args.views,
        "train_minutes": round(minutes, 1),
        "checkpoint": "best validation Dice",
        "history": history,
    }
    if args.init:
        previous = json.loads((args.init / "medsam3.json").read_text())
        info["continued_from"] = {key: previous[key] for key in _STAGE_FACTS if key in previous}
        if "continued_from" in previous:
            info["continued_from"]["continued_from"] = previous["continued_from"]
    export_model(final, args.export, final.concepts, info)
    record_mask_sources(args.export, splits["val"])
    print(f"exported {args.export}")


def dense_windows() -> dict[str, list[str]]:
    """The intensity mappings the dense tumour slices were written under (what window robustness was taught)."""
    return {"ct": list(CT_WINDOWS), "mr": [f"{low:g}-{high:g} percentiles" for low, high in MR_PERCENTILES]}


def parse_pairs(pairs: list[str], names) -> dict[str, int]:
    """``["ct=200"]`` -> ``{"ct": 200}``; an unknown name or a count below 1 is a usage error."""
    parsed = {}
    for pair in pairs:
        name, _, count = pair.partition("=")
        if name not in names or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"error: {pair!r}: expected NAME=N with NAME one of {', '.join(names)} and N >= 1")
        parsed[name] = int(count)
    return parsed


#: What a second stage records of the run it continued (``--init``).
_STAGE_FACTS = (
    "recipe",
    "dense_sets",
    "real_sets",
    "train_repeats",
    "extra_phantoms",
    "train_samples",
    "steps",
    "train_minutes",
)


def record_mask_sources(folder: Path, val) -> None:
    """Each concept's text mask source, measured on the validation split, into the folder's medsam3.json."""
    from medsam3.train.mask_choice import choose_mask_sources
    from medsam3.utils.files import write_json_atomic

    model = load_model(str(folder), device="cpu")
    choice = choose_mask_sources(model, val)
    meta_file = folder / "medsam3.json"
    meta = json.loads(meta_file.read_text())
    meta["mask_sources"] = choice
    meta["mask_sources_measured_on"] = f"the validation split ({len(val)} samples)"
    write_json_atomic(meta_file, meta)
    for concept, picked in choice.items():
        print(f"{concept}: {picked['source']} {picked['dice']}", flush=True)


if __name__ == "__main__":
    main()
