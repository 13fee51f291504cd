"""Train the bundled default model ``nano`` from scratch: one command, reproducible.

    python scripts/train_nano.py --out runs/nano --threads 1 --export src/medsam3/model/weights/nano

Generates the phantom corpus (deterministic by seed), trains nano's architecture from random
weights on every phantom concept except the held-out one, keeps the phantom test split untouched,
and exports the model folder the ``nano`` preset loads. See medsam3.train.recipes.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from medsam3.model import load_model
from medsam3.model.export import export_model
from medsam3.train.losses import LEGACY_LOSS
from medsam3.train.recipes import HELD_OUT_CONCEPT, NANO_KINDS, make_phantom_corpus, phantom_splits
from medsam3.train.trainer import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/nano"))
    parser.add_argument("--export", type=Path, default=None, help="write the trained model folder here")
    parser.add_argument("--n-per-kind", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--export-only", action="store_true", help="export RUN/best of a finished run")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folders = make_phantom_corpus(args.out / "phantoms", args.n_per_kind, seed=args.seed)
    splits = phantom_splits(folders, exclude={HELD_OUT_CONCEPT})
    print({name: len(data) for name, data in splits.items()}, flush=True)
    if args.export_only:
        loaded = load_model("nano-init", device="cpu", adapter=args.out / "best")
        history = [row for row in csv.DictReader((args.out / "metrics.csv").open())]
        export(loaded, args, splits, loaded.concepts, history, minutes=float(history[-1]["seconds"]) / 60)
        return
    loaded = load_model("nano-init", device="cpu")
    config = TrainConfig(
        policy="full",
        prompt_mode="mixed",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.05,
        warmup_fraction=0.03,
        grad_clip=1.0,
        seed=args.seed,
        checkpoint_every=100,
        val_limit=150,
        max_steps=args.max_steps,
        # the recipe the bundled weights were trained with (before issue 17's SAM 3 losses and budget):
        # hard targets while the new detector's boxes are poor, the legacy loss, one optimizer group
        loss_weights={**LEGACY_LOSS, "cls_iou_aware": False},
        optimizer_groups=False,
        max_minutes=None,
    )
    trainer = Trainer(loaded, splits["train"], args.out, config, val_data=splits["val"])
    if args.resume:
        trainer.resume()
    started = time.perf_counter()
    summary = trainer.fit()
    minutes = (time.perf_counter() - started) / 60
    print(json.dumps(summary["history"], indent=1), flush=True)
    if args.export:
        best = load_model("nano-init", device="cpu", adapter=args.out / "best")
        export(best, args, splits, trainer.concepts, summary["history"], minutes)


def export(loaded, args, splits, concepts, history, minutes: float) -> None:
    """Write the model folder the ``nano`` preset loads (the best validation checkpoint)."""
    if args.export is None:
        raise SystemExit("--export DIR is needed")
    info = {
        "name": "nano",
        "what": "SAM 3 architecture (4.8 M parameters, 224 px) trained from scratch on medsam3 phantoms; "
        "a small model for using and testing the toolkit offline, not SAM 3",
        "recipe": "python scripts/train_nano.py "
        f"--n-per-kind {args.n_per_kind} --epochs {args.epochs} --batch-size {args.batch_size} "
        f"--lr {args.lr} --seed {args.seed} --threads 1",
        "phantom_kinds": list(NANO_KINDS),
        "held_out_concept": HELD_OUT_CONCEPT,
        "train_samples": len(splits["train"]),
        "train_minutes": round(minutes, 1),
        "checkpoint": "best validation Dice",
        "history": history,
    }
    export_model(loaded, args.export, concepts, info)
    print(f"exported {args.export}")


if __name__ == "__main__":
    main()
