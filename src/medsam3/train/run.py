"""What ``medsam3 train DATA --base SPEC --out RUN`` does, as one library call.

    from medsam3.train.run import train_path
    run = train_path("Dataset003_Liver", "nano", "runs/liver", epochs=5, max_minutes=30)
    run.adapter        # RUN/best, the checkpoint to segment with (see run.adapter_note)

The dataset is indexed once and split by case into train and val. With ``skip_bad`` every train
and val image (a whole volume for 3D data) is decoded once before training, so an unreadable or
all-NaN file is left out with a warning (and listed in ``run.skipped``) instead of stopping the
run halfway. ``RUN/best`` is the checkpoint to use: the best validation Dice, or (a validation split
too thin to choose by, ``TrainConfig.keep``) the mean of that pick and the moving average of the
weights, the pick then in ``RUN/validation-pick``; without validation samples the latest checkpoint.
``run.adapter_note`` says which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medsam3.errors import DatasetError, MedSAM3Error
from medsam3.model.presets import DEFAULT_MODEL
from medsam3.train.trainer import KEEP_CHOICES, VALIDATION_PICK, TrainConfig, Trainer, seed_everything

log = logging.getLogger("medsam3.train")
AUGMENTATIONS = ("views", "flips", "full", "none")


@dataclass
class TrainRun:
    """A finished (or budget-stopped) training run."""

    out_dir: Path
    adapter: Path  # the checkpoint to use: RUN/best, or RUN/last when no best/ exists yet
    adapter_note: str  # why that one, in words
    summary: dict  # Trainer.fit()'s summary (also RUN/summary.json)
    train_samples: int
    val_samples: int
    concepts: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: problem" of files left out (skip_bad)

    @property
    def history(self) -> list[dict]:
        return self.summary["history"]


def _drop_unreadable(dataset, skipped: list[str]):
    """The samples whose image decodes; the cases of the others are left out and listed."""
    from medsam3.data.layouts.readers import verify_image

    bad_cases = set()
    for path, case in dict.fromkeys((ref.image.path, ref.case_id) for ref in dataset.refs):
        if case in bad_cases:
            continue
        try:
            verify_image(path)
        except MedSAM3Error as error:
            bad_cases.add(case)
            problem = getattr(error, "problem", None) or str(error)
            skipped.append(f"{path}: {problem}")
            log.warning("skipped %s: %s", path, problem)
    if not bad_cases:
        return dataset
    return dataset.select(cases=[case for case in dataset.cases if case not in bad_cases])


MIN_CASES_TO_HOLD_OUT = 5


def hold_out_validation(train_set, seed: int = 0):
    """(train, val) from a training split alone: ~15% of its cases (at least one) for validation.

    Early stopping, picking the best checkpoint and choosing each concept's mask source all need
    images the detector did not train on; a few-shot dataset (10-16 slices) often gets no case in
    the hashed val split. Cases are ranked by a stable hash, so the choice is reproducible.
    """
    from medsam3.data.splits import stable_fraction

    cases = sorted(train_set.cases, key=lambda case: stable_fraction("holdout", seed, case))
    n_val = max(1, round(0.15 * len(cases)))
    return train_set.select(cases=cases[n_val:]), train_set.select(cases=cases[:n_val])


def training_splits(train_set, val_set, seed: int = 0):
    """(train, val, held_out): the dataset's own val split, or, when it has none and the training
    split has enough cases, ``hold_out_validation``'s (``held_out`` True)."""
    if len(val_set) == 0 and len(train_set.cases) >= MIN_CASES_TO_HOLD_OUT:
        return *hold_out_validation(train_set, seed), True
    return train_set, val_set, False


def train_path(
    data: str | Path,
    base: str = DEFAULT_MODEL,
    out: str | Path = "runs/train",
    *,
    config: TrainConfig | None = None,
    layout: str = "auto",
    axis: int = 0,
    skip_bad: bool = False,
    augment: str = "views",
    resume: bool = False,
    allow_long_phrases: bool = False,
    device: str = "auto",
    say: Callable[[str], None] | None = None,
    **settings,
) -> TrainRun:
    """Fine-tune ``base`` on the train split of the dataset at ``data``; checkpoints go to ``out``.

    ``settings`` override fields of ``config`` (a :class:`TrainConfig`; defaults if None), e.g.
    ``epochs=5, batch_size=2, max_minutes=10``. ``augment``: "views" (default: a fixed bank of
    augmented views per image, each encoded once, so it works with the feature cache), "flips" (flips
    only), "full" (fresh random views every step: no feature cache) or "none". ``resume`` continues
    ``out/last`` exactly. ``say`` receives progress lines. A training split without a val split gets
    one held out of it (see :func:`hold_out_validation`).
    """
    from medsam3.data.dataset import open_dataset
    from medsam3.data.vocabulary import check_phrase
    from medsam3.model import load_model

    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise MedSAM3Error(f"unknown training setting(s) {', '.join(unknown)}")
    config = dataclasses.replace(config or TrainConfig(), **settings)
    if config.keep not in KEEP_CHOICES:
        raise MedSAM3Error(f"--keep must be one of {', '.join(KEEP_CHOICES)}, got '{config.keep}'")
    if augment not in AUGMENTATIONS:
        raise MedSAM3Error(f"augment must be one of {', '.join(AUGMENTATIONS)}, got '{augment}'")
    from medsam3.utils.outputs import check_output_folder

    # before any work: never into (or over) the dataset, a file, or an unwritable place
    out = check_output_folder(out, inputs=[data], sealed=[data], files=("metrics.csv", "summary.json"))
    if resume and not (out / "last" / "adapter.json").is_file():
        raise MedSAM3Error(f"--resume: {out / 'last'} holds no checkpoint to continue from")
    say = say or (lambda line: None)

    dataset = open_dataset(data, layout=layout, axis=axis, skip_bad=skip_bad)
    skipped = [f"{item.path}: {item.problem}" for item in dataset.skipped]
    train_set, val_set = dataset.split("train"), dataset.split("val")
    if skip_bad:  # decode each image once now rather than fail on it halfway through an epoch
        train_set, val_set = _drop_unreadable(train_set, skipped), _drop_unreadable(val_set, skipped)
    for line in skipped:
        say(f"warning: skipped {line}")
    if not len(train_set):  # before the model is loaded: a tiny dataset whose cases all hashed elsewhere
        held = ", ".join(f"{len(dataset.split(n).cases)} in {n}" for n in ("val", "test") if len(dataset.split(n)))
        raise DatasetError(
            f"{data}: nothing to train on: no case is in the training split ({held or 'no usable case'}); "
            "cases are split by a hash of their id (about 80% train), so a dataset this small can have none: add cases"
        )
    train_set, val_set, held = training_splits(train_set, val_set, config.seed)
    held_out = ""
    if held:
        total = len(train_set.cases) + len(val_set.cases)
        held_out = f" (held out of the {total} training cases: the dataset has no val split)"
    for concept in train_set.concepts:
        check_phrase(concept, allow_long=allow_long_phrases)

    seed_everything(config.seed)  # before the model is built: random presets and heads draw from it
    loaded = load_model(base, device=device)
    augmentation = None
    if augment != "none":
        from medsam3.data.transforms import default_augmentation, flip_augmentation, view_augmentation

        augmentation = {
            "full": default_augmentation,
            "flips": flip_augmentation,
            "views": lambda: view_augmentation(seed=config.seed),
        }[augment]()
    trainer = Trainer(loaded, train_set, out, config, val_data=val_set if len(val_set) else None, augment=augmentation)
    if resume:
        trainer.resume()
    views = f", each under {trainer.val_views} views of the bank" if trainer.val_views > 1 else ""
    validation = (
        f"validating on {len(val_set)}{held_out}{views}" if len(val_set) else "no validation samples (best/ = last/)"
    )
    say(f"training {len(train_set)} samples ({', '.join(train_set.concepts)}), {validation}")
    summary = trainer.fit()

    if (out / "best" / "adapter.json").is_file():
        adapter = out / "best"
        best = summary.get("best_val_dice")
        kept = summary.get("kept")
        if len(val_set) and kept in ("last", "average", "ema", "average-ema") and (out / VALIDATION_PICK).is_dir():
            what = {
                "last": "the final weights",
                "average": "the mean of validation's pick and the final weights",
                "ema": "the moving average of the weights",
                "average-ema": "the mean of validation's pick and the moving average of the weights",
            }[kept]
            why = f"--keep {kept}"
            if config.keep == "auto":
                why = f"{len(val_set)} validation sample(s): too few to choose by"
            note = f"{what} ({why}; validation's pick is {out / VALIDATION_PICK})"
        elif len(val_set):
            note = "best validation Dice" + (f" {best:.4f}" if best is not None else "")
        else:
            note = "no validation samples: the latest checkpoint"
    else:
        adapter = out / "last"
        note = "stopped before the first validation: the latest checkpoint"
    return TrainRun(
        out_dir=out,
        adapter=adapter,
        adapter_note=note,
        summary=summary,
        train_samples=len(train_set),
        val_samples=len(val_set),
        concepts=list(train_set.concepts),
        skipped=skipped,
    )
