"""MedSAM-3 fine-tuning: the detector learns medical concepts while the encoders stay frozen.

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch encodes its images once (from
the feature cache when the vision encoder is frozen and caching is on), splits samples into
text-only and text+box prompts (a geometry prompt changes what the detector attends to, so each
kind gets its own detector pass, exactly as at inference), and applies the matched SAM 3 losses.

Reproducibility: the torch and numpy RNGs are seeded from ``seed`` before the policy is applied
(LoRA initialisation, dropout), so two runs with one seed end with the same weights; the sample
order of an epoch is a permutation seeded by (seed, epoch) (for volume datasets a
``volume_blocked_order``: slices of one volume stay together, so each volume is decoded once per
epoch); every per-sample random choice draws from a generator seeded by (seed, epoch, index); the
torch RNG is saved in each checkpoint. A run stopped after any checkpoint and resumed therefore
ends with the same weights as one that never stopped. Resuming refuses another training set (a
fingerprint of its samples is in every checkpoint) and another batch size, accumulation, seed or
process count (the saved position would point into another order).

Losses: the last decoder layer's outputs get every term; the earlier decoder layers' logits, boxes
and presence (recorded with hooks around the seam's detector call) get the classification,
presence and box terms scaled by ``LossWeights.aux`` (0 turns them off).

Stopping: after ``epochs``; after ``max_steps`` optimizer steps (as if interrupted: only the last
periodic checkpoint counts); or after the step that leaves too little of ``max_minutes`` of wall-clock
time for the run's end (a final validation and the mask-source choice, timed by the last
validation), which validates, writes ``last/`` (and ``best/`` when better) and records the stop in
``metrics.csv`` (a fractional epoch) and ``summary.json``. Without validation samples ``best/``
is the latest ``last/``; with a thin validation split (``keep="auto"``) validation decides when to
stop and ``best/`` ends as the mean of validation's pick and the moving average of the weights
(the pick moves to ``validation-pick/``).

Multi-process (``torchrun`` / ``accelerate launch``): each rank takes every ``world``-th sample of
the epoch's order and gradients of the trainable parameters are averaged with all_reduce before the
optimizer step (gloo on CPU, NCCL on GPU). Only rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.data.sample import Sample
from medsam3.data.splits import stable_seed
from medsam3.data.transforms import SampleViews, ViewBank
from medsam3.errors import MedSAM3Error
from medsam3.evaluate.metrics import balanced_dice, dice
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt
from medsam3.model.adapter import read_adapter_metadata, save_adapter, update_adapter_metadata
from medsam3.model.components import ENCODER_COMPONENTS
from medsam3.model.loading import LoadedModel
from medsam3.model.policy import apply_policy, check_policy
from medsam3.model.tower_memo import image_key
from medsam3.train.batches import TrainItem, check_prompt_mode, make_item, sample_rng
from medsam3.train.ema import WeightEMA
from medsam3.train.feature_cache import FeatureCache
from medsam3.train.losses import DecoderLayerRecorder, LossWeights, Sam3DetectionLoss
from medsam3.train.optim import build_optimizer
from medsam3.train.schedule import warmup_cosine
from medsam3.train.semantic_head import (
    HEAD_MAX_IMAGES,
    HEAD_MAX_SECONDS,
    collect_head_inputs,
    fit_semantic_head,
    has_semantic_head,
    head_pays,
)
from medsam3.utils.files import write_json_atomic

STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "summary.json"
# Settings that fix where a saved position points in the data order: a resumed run must keep them.
RESUME_INVARIANTS = (("batch_size", "--batch-size"), ("grad_accum", "--grad-accum"), ("seed", "--seed"))
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")
#: Below this many validation images, validation also scores them under the view bank's views
#: (and ``keep="auto"`` averages validation's pick with the moving average of the weights: such a
#: split is too thin to choose a checkpoint by).
VAL_SAMPLES_WANTED = 24
KEEP_CHOICES = ("auto", "best", "last", "average", "ema", "average-ema")
EMA_CHOICES = ("ema", "average-ema")  # the end points that need the weight average tracked
#: The end of a run after its last step, in validations' durations: the final validation, then the
#: kept weights' mask sources (every text source and box mode on each validation sample) and the
#: saves. Measured on few-shot runs: 12-18 s after the final validation, 6-8 validations; with 8
#: passes a 3-minute run still ended 3 s late, with 10 passes 0.3 s late (END_MARGIN_S covers that).
END_PASSES = 10
END_MARGIN_S = 5.0
#: Where a run whose best/ is not validation's pick leaves that pick.
VALIDATION_PICK = "validation-pick"


@dataclass
class TrainConfig:
    """Every training setting. Two ways to say how long:

    - ``epochs=None`` (default): a budget. At most ``steps`` optimizer steps and ``max_minutes`` of
      wall clock, validating every ``val_every`` steps (at epoch ends) and stopping early after
      ``patience`` validations without a gain of ``min_delta`` Dice; the cosine schedule follows
      whichever of steps and time runs out first, so the run always ends at a low learning rate.
    - ``epochs=N``: exactly N passes over the data, validated after each (``max_minutes`` still stops it).
    """

    policy: str = "paper"
    prompt_mode: str = "mixed"
    text_box_fraction: float = 0.5
    epochs: int | None = None
    steps: int = 1500  # the step budget when epochs is None
    val_every: int = 50  # steps between validations under a budget (at the next epoch end)
    patience: int = 8  # validations without a gain of min_delta before stopping early (0: never)
    min_delta: float = 0.002
    # What best/ holds at the end: "best" (validation's pick), "last" (the final weights; validation
    # only decides when to stop), "average" (the element-wise mean of the two), "ema" (an exponential
    # moving average of the weights over the run, ``ema_decay``, train.ema: best on the trained view,
    # not on the unseen one), "average-ema" (the mean of validation's pick and that moving average) or
    # "auto": "average-ema" when the validation split is thin (fewer than VAL_SAMPLES_WANTED samples),
    # else "best". On the few-shot benchmark 1-2 held-out slices pick checkpoints early in the run; a
    # mean of the pick and a later end point scored higher than the pick on other slices of the
    # trained view in every run measured, and lost less of the unseen view than the later end point
    # alone; the moving average is a steadier later end point than the last step (docs/fine-tuning.md).
    keep: str = "auto"
    ema_decay: float = 0.99  # the weight average's decay (tracked when ``keep`` resolves to "ema" or "average-ema")
    choose_mask_sources: bool = True  # pick each concept's mask source on the validation split at the end
    # Steps that fit the semantic head alone on the training images once the kept weights are set
    # (models with one: lite; needs a validation split, which decides whether the fitted head is kept:
    # train.semantic_head.head_pays); 0: off (docs/fine-tuning.md).
    head_steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    grad_clip: float = 0.1
    box_jitter: float = 0.1
    seed: int = 0
    cache_features: bool | None = None  # None: on whenever the image tower is frozen and the augmentation cacheable
    cache_dir: str | None = None
    rebuild_cache: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = end of each epoch only
    val_limit: int = 200  # validation samples per epoch (first N of the split, views included)
    # Views of each validation image (from the training view bank) that validation scores. None: a
    # split of fewer than VAL_SAMPLES_WANTED images is scored under as many views as reach that count
    # (at most the bank's); larger splits, or no bank: the images alone. 1: the images alone.
    val_views: int | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (as if interrupted)
    max_minutes: float | None = 10.0  # the whole run's wall-clock budget (the last step leaves room for the end)
    bf16: bool = True  # bf16 autocast on GPU (fp32 master weights)
    cpu_autocast: bool = False  # bf16 autocast on CPU too (benchmarks/bench_cpu.py measures whether it pays)
    progress: bool = True
    loss_weights: dict = field(default_factory=dict)  # LossWeights fields (SAM 3's values by default)
    optimizer_groups: bool = True  # SAM 3's parameter groups (train.optim); False: one AdamW group


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps done overall
    best_dice: float = -1.0
    last_loss: float | None = None  # the latest step's loss and learning rate (an epoch ending on resume)
    last_lr: float | None = None


def distributed_context() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun/accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sample_keys(data, indices=None):
    """Identities of the training samples, without decoding lazily indexed ones."""
    refs = getattr(data, "refs", None)
    if isinstance(refs, list) and (not refs or hasattr(refs[0], "image")):
        for i in range(len(refs)) if indices is None else indices:
            ref = refs[i]
            yield (ref.case_id, ref.concept, ref.image.path.name, ref.image.slice_index, ref.image.axis)
        return
    parts = getattr(data, "parts", None)  # recipes.ConcatSamples
    if isinstance(parts, list):
        for dataset, part_indices in parts:
            yield from _sample_keys(dataset, part_indices)
        return
    if isinstance(data, (list, tuple)):  # samples already in memory
        for i in range(len(data)) if indices is None else indices:
            sample = data[i]
            image = np.ascontiguousarray(sample.image)
            digest = hashlib.sha256(str(image.shape).encode() + image.tobytes()).hexdigest()[:16]
            yield (sample.case_id, sample.concept, digest, int(np.asarray(sample.masks).sum()))
        return
    yield (type(data).__name__, len(data) if indices is None else len(indices))


def training_set_fingerprint(data: Sequence[Sample]) -> dict:
    """{"fingerprint", "samples", "concepts"} of a training set: case, concept and image file (or
    pixels) of each sample, read from the index where there is one (nothing is decoded)."""
    digest = hashlib.sha256()
    concepts: set[str] = set()
    for key in _sample_keys(data):
        digest.update(repr(key).encode("utf-8", "backslashreplace"))
        digest.update(b"\x1e")
        if len(key) > 2:
            concepts.add(key[1])
        else:  # an unknown lazy sequence: its concepts need its samples
            concepts.update(sample.concept for sample in data)
    return {"fingerprint": digest.hexdigest()[:20], "samples": len(data), "concepts": sorted(concepts)}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (CUDA too) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validation_views(val_data: Sequence[Sample] | None, augment, asked: int | None) -> int:
    """How many views of each validation image validation scores (see ``TrainConfig.val_views``)."""
    bank_views = augment.views if isinstance(augment, ViewBank) else 1
    if asked is not None:
        if asked < 1 or asked > bank_views:
            raise MedSAM3Error(
                f"val_views must be between 1 and the view bank's {bank_views} views, got {asked}"
                + ("" if bank_views > 1 else " (only --augment views has views to score)")
            )
        return asked
    if not val_data or len(val_data) >= VAL_SAMPLES_WANTED:
        return 1
    return min(bank_views, math.ceil(VAL_SAMPLES_WANTED / len(val_data)))


def mean_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The element-wise mean of two checkpoints' trained parameters (in fp32, back in ``first``'s dtypes)."""
    return {name: ((v.float() + second[name].float().to(v.device)) / 2).to(v.dtype) for name, v in first.items()}


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter.safetensors"))


def scored_validation(val_data: Sequence[Sample] | None, augment, asked: int | None):
    """(views, samples): what validation scores, the split under ``validation_views`` views each."""
    views = validation_views(val_data, augment, asked)
    return views, SampleViews(val_data, augment, views) if views > 1 else val_data


def _records_decoder_layers(model) -> bool:
    try:
        DecoderLayerRecorder(model).remove()
    except ValueError:
        return False
    return True


class Trainer:
    """Fine-tunes a loaded SAM 3 on concept samples and writes adapter checkpoints to ``out_dir``."""

    def __init__(
        self,
        loaded: LoadedModel,
        train_data: Sequence[Sample],
        out_dir: str | Path,
        config: TrainConfig,
        val_data: Sequence[Sample] | None = None,
        augment: Callable[[Sample, np.random.Generator], Sample] | None = None,
    ):
        check_policy(config.policy)
        check_prompt_mode(config.prompt_mode)
        if len(train_data) == 0:
            raise MedSAM3Error("the training split is empty: nothing to train on")
        if config.epochs is not None and config.epochs < 1:
            raise MedSAM3Error(f"epochs must be at least 1, got {config.epochs}: nothing would be trained")
        if config.epochs is None and config.steps < 1:
            raise MedSAM3Error(f"steps must be at least 1, got {config.steps}: nothing would be trained")
        if config.batch_size < 1 or config.grad_accum < 1:
            raise MedSAM3Error(
                f"batch size and gradient accumulation must be at least 1, got {config.batch_size} "
                f"and {config.grad_accum}"
            )
        if config.keep not in KEEP_CHOICES:
            raise MedSAM3Error(f"keep must be one of {', '.join(KEEP_CHOICES)}, got '{config.keep}'")
        if config.max_minutes is not None and not (math.isfinite(config.max_minutes) and config.max_minutes > 0):
            raise MedSAM3Error(f"max_minutes must be a positive number of minutes, got {config.max_minutes}")
        self.loaded = loaded
        self.model = loaded.model
        self.config = config
        self.train_data = train_data
        self.augment = augment
        self.val_views, self.val_data = scored_validation(val_data, augment, config.val_views)
        self.val_images = len(val_data) if val_data else 0
        self.out_dir = Path(out_dir)
        self.rank, self.world = distributed_context()
        self.device = loaded.device
        self.encoders_frozen = config.policy in ("paper", "lora-detector")
        cacheable = augment is None or bool(getattr(augment, "cacheable", False))
        if config.cache_features and not self.encoders_frozen:
            raise MedSAM3Error(
                f"--cache-features needs frozen encoders, but policy '{config.policy}' trains the vision "
                "encoder: use --policy paper or lora-detector, or drop --cache-features"
            )
        if config.cache_features and not cacheable:
            raise MedSAM3Error(
                "--cache-features cannot be combined with random image augmentation: cached features are "
                "those of the exact pixels, so augmented views would be encoded anew each step (use the "
                "default --augment views: a fixed bank of views per image, each cached once)"
            )
        self.use_cache = (
            config.cache_features if config.cache_features is not None else (self.encoders_frozen and cacheable)
        )
        seed_everything(config.seed)  # before the policy: LoRA's initial weights come from torch's RNG
        apply_policy(self.model, config.policy)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        tracks_average = config.keep in EMA_CHOICES or self.keep_choice() in EMA_CHOICES
        if tracks_average and not 0.0 < config.ema_decay < 1.0:
            raise MedSAM3Error(f"ema_decay must be between 0 and 1, got {config.ema_decay}")
        self.ema = WeightEMA(self.model, config.ema_decay) if tracks_average else None
        if config.optimizer_groups:  # SAM 3's groups: detector / vision with layer decay / text; no decay on norms
            self.optimizer, self.param_groups = build_optimizer(self.model, config.lr, config.weight_decay)
        else:  # one group, decay on everything (the recipe before issue 17)
            self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
            self.param_groups = []
        names = [group.get("name") for group in self.optimizer.param_groups]
        self._lr_group = names.index("detector") if "detector" in names else 0
        self.steps_per_epoch = math.ceil(self._shard_size() / config.batch_size / config.grad_accum)
        self.budgeted = config.epochs is None
        if self.budgeted:
            self.total_steps = config.steps
            self.n_epochs = math.ceil(config.steps / self.steps_per_epoch)
        else:
            self.total_steps = self.steps_per_epoch * config.epochs
            self.n_epochs = config.epochs
        self._started: float | None = None
        self.scheduler = warmup_cosine(
            self.optimizer,
            self.total_steps,
            int(config.warmup_fraction * self.total_steps),
            time_fraction=self._time_fraction if self.budgeted and config.max_minutes else None,
        )
        self.loss = Sam3DetectionLoss(LossWeights.from_options(config.loss_weights), input_side=loaded.image_size)
        self.aux_losses = self.loss.weights.aux != 0 and _records_decoder_layers(self.model)
        self.cache = None
        if self.use_cache:
            cache_dir = config.cache_dir or self.out_dir / "feature_cache"
            self.cache = FeatureCache(cache_dir, loaded.seam, rebuild=config.rebuild_cache)
        self.seam = loaded.seam
        self.position = Position()
        self.train_set = training_set_fingerprint(train_data)
        self.concepts = self.train_set.pop("concepts")
        refs = getattr(train_data, "refs", None) or ()
        self.volume_blocks = callable(getattr(train_data, "volume_blocked_order", None)) and any(
            getattr(getattr(ref, "image", None), "slice_index", None) is not None for ref in refs
        )
        self.autocast_device = "cuda" if self.device.type == "cuda" else "cpu"
        self.autocast = config.bf16 and (self.device.type == "cuda" or config.cpu_autocast)

    # -- data order ----------------------------------------------------------------------------
    def _shard_size(self) -> int:
        return len(self.train_data) // self.world if self.world > 1 else len(self.train_data)

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.volume_blocks:  # volumes are decoded whole: keep each one's slices together
            seed = stable_seed("epoch", self.config.seed, epoch)
            order = np.asarray(self.train_data.volume_blocked_order(seed=seed), dtype=np.int64)
        else:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train_data))
        if self.world > 1:
            order = order[self.rank :: self.world][: self._shard_size()]
        return order.tolist()

    def micro_batches(self, epoch: int) -> list[list[int]]:
        order = self.epoch_indices(epoch)
        size = self.config.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    # -- encoders ------------------------------------------------------------------------------
    def _vision(self, items: list[TrainItem]) -> Sam3VisionEncoderOutput:
        """Detector features: the frozen tower's embedding (cached or not), then any trainable neck."""
        rgbs = [item.rgb for item in items]
        with torch.autocast(self.autocast_device, enabled=False):  # the frozen tower keeps its own dtype
            if self.cache is not None:
                embedding = self.cache.encode(rgbs)
            else:
                embedding = self.seam.embed_images(rgbs, grad=not self.encoders_frozen)
        return self.seam.vision_features(embedding)

    # -- one step ------------------------------------------------------------------------------
    def forward_items(
        self, items: list[TrainItem]
    ) -> tuple[dict[str, torch.Tensor], list[dict], list[dict[str, torch.Tensor]]]:
        """Detector outputs for every item (text-only and text+box passes joined), their targets, and
        the earlier decoder layers' outputs for the auxiliary losses (empty when those are off)."""
        vision = self._vision(items)
        outputs: dict[str, list[torch.Tensor]] = {k: [] for k in OUTPUT_KEYS}
        targets: list[dict] = []
        layers: list[list[dict[str, torch.Tensor]]] = []
        text_only = [i for i, item in enumerate(items) if len(item.prompt_boxes) == 0]
        with_boxes = [i for i, item in enumerate(items) if len(item.prompt_boxes) > 0]
        for group in (text_only, with_boxes):
            if not group:
                continue
            features, mask = self.seam.encode_phrases(
                [items[i].phrase for i in group], text_tower_frozen=self.encoders_frozen
            )
            boxes = labels = None
            if group is with_boxes:
                chosen = [items[i] for i in group]
                boxes, labels = self.seam.box_tensors(
                    [it.prompt_boxes for it in chosen],
                    [[1] * len(it.prompt_boxes) for it in chosen],
                    [it.rgb.shape[:2] for it in chosen],
                )
            selected = self.seam.select(vision, group)
            if self.aux_losses:
                with DecoderLayerRecorder(self.model) as recorder:
                    result = self.seam.detect(selected, features, mask, boxes, labels)
                    layers.append(recorder.layer_outputs())
            else:
                result = self.seam.detect(selected, features, mask, boxes, labels)
            for key in OUTPUT_KEYS:
                outputs[key].append(getattr(result, key))
            targets.extend(items[i].target for i in group)
        aux = [
            {key: torch.cat([passes[layer][key] for passes in layers]) for key in layers[0][layer]}
            for layer in range(len(layers[0]) if layers else 0)
        ]
        return {k: torch.cat(v) for k, v in outputs.items()}, targets, aux

    def _items(self, epoch: int, indices: list[int]) -> list[TrainItem]:
        c = self.config
        return [
            make_item(
                self.train_data[i],
                sample_rng(c.seed, epoch, i),
                c.prompt_mode,
                c.text_box_fraction,
                c.box_jitter,
                self.augment,
                canvas_size=self.seam.canvas_size,
            )
            for i in indices
        ]

    def _targets_on_device(self, items: list[TrainItem]) -> list[TrainItem]:
        """``items`` with their targets' tensors moved to the training device (in place)."""
        for item in items:
            item.target = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in item.target.items()}
        return items

    def _sync_gradients(self) -> None:
        if self.world == 1:
            return
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= self.world

    def train_step(self, epoch: int, batches: list[list[int]]) -> dict[str, float]:
        """One optimizer step over ``batches`` (grad accumulation); returns logged loss terms."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for indices in batches:
            items = self._targets_on_device(self._items(epoch, indices))
            with torch.autocast(self.autocast_device, dtype=torch.bfloat16, enabled=self.autocast):
                outputs, targets, aux = self.forward_items(items)
                total, terms = self.loss(outputs, targets, aux_outputs=aux)
            (total / len(batches)).backward()
            logged["loss"] = logged.get("loss", 0.0) + float(total.detach()) / len(batches)
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + float(value) / len(batches)
        self._sync_gradients()
        if self.config.grad_clip > 0:
            logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        logged["lr"] = self.scheduler.get_last_lr()[self._lr_group]
        return logged

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> float | None:
        """Union Dice on the validation samples (text prompts, or text+box in that mode), positives and
        negatives weighed equally (``balanced_dice``)."""
        if not self.val_data:
            return None
        return balanced_dice(*self.validation_scores())

    def validation_by_framing(self) -> dict[str, float]:
        """Validation Dice on the held-out images as they are ("images": the training slices' framing)
        and under the bank's views ("views"; the same number without views)."""
        scores, positive = self.validation_scores()
        plain = [i for i in range(len(scores)) if i % self.val_views == 0]  # view 0 is the image itself
        return {
            "images": round(balanced_dice([scores[i] for i in plain], [positive[i] for i in plain]), 4),
            "views": round(balanced_dice(scores, positive), 4),
        }

    @torch.no_grad()
    def validation_scores(self) -> tuple[list[float], list[bool]]:
        """Each validation sample's union Dice and whether it holds its concept, in the split's order."""
        started = time.perf_counter()
        self.model.eval()
        predictor = Sam3Predictor(self.loaded)
        scores, positive = [], []
        for index in range(min(len(self.val_data), self.config.val_limit)):
            sample = self.val_data[index]
            boxes = tuple(map(tuple, sample.boxes)) if self.config.prompt_mode == "text+box" else ()
            if self.cache is not None:  # the frozen tower's output is on disk already
                with torch.inference_mode():
                    predictor.set_embedding(self.cache.encode([sample.image]), sample.image.shape[:2])
            else:
                predictor.set_image(sample.image)
            result = predictor.predict_one(Prompt(sample.concept, boxes=boxes))
            scores.append(dice(result.union, sample.union))
            positive.append(not sample.is_negative)
        self._val_seconds = time.perf_counter() - started
        return scores, positive

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "position": asdict(self.position),
            "config": asdict(self.config),
            "world": self.world,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_checkpoint(self, name: str, extra: dict | None = None) -> Path:
        """Write ``out_dir/name`` atomically: the previous checkpoint survives any failure."""
        from medsam3.utils.files import save_torch

        state = self._state()
        meta = {
            "position": asdict(self.position),
            "train_config": asdict(self.config),
            "train_set": self.train_set,
            "world": self.world,
            **(extra or {}),
        }
        return save_adapter(
            self.loaded,
            self.out_dir / name,
            self.config.policy,
            self.concepts,
            extra=meta,
            write_extra=lambda folder: save_torch(folder / STATE_FILE, state),  # a full disk: an OSError
        )

    def resume(self, checkpoint: str | Path | None = None) -> None:
        """Restore weights, optimizer, scheduler, RNG and data position from ``out_dir/last``."""
        folder = Path(checkpoint) if checkpoint else self.out_dir / "last"
        meta = read_adapter_metadata(folder)
        if meta.get("base_fingerprint") != self.loaded.fingerprint:
            raise MedSAM3Error(
                f"{folder}: cannot resume: the checkpoint was trained on base '{meta.get('base_model')}' "
                f"(fingerprint {meta.get('base_fingerprint')}), not on '{self.loaded.spec}'"
            )
        if meta.get("policy") != self.config.policy:
            raise MedSAM3Error(
                f"{folder}: cannot resume: checkpoint policy is '{meta.get('policy')}', "
                f"this run's is '{self.config.policy}'"
            )
        self._check_same_run(folder, meta)
        import pickle

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        own = dict(self.model.named_parameters())
        try:  # a corrupt or foreign checkpoint is one line naming the file (torch.load never runs pickled code here)
            source = folder / "adapter.safetensors"
            tensors = load_file(str(source))
            for name, tensor in tensors.items():
                own[name].data.copy_(tensor.to(own[name].device, own[name].dtype))
            source = folder / STATE_FILE
            state = torch.load(source, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            position = Position(**state["position"])
            if self.ema is not None and "ema" in state:
                self.ema.load_state_dict(state["ema"])
            elif self.ema is not None and self.config.keep == "auto":
                self.ema = WeightEMA(self.model, self.config.ema_decay)  # a run from before auto tracked it
            elif self.ema is not None:
                raise KeyError("no weight average saved (the run did not track one: resume it with its own --keep)")
        except (OSError, EOFError, RuntimeError, ValueError, TypeError, KeyError, SafetensorError,
                pickle.UnpicklingError) as exc:  # fmt: skip
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise MedSAM3Error(f"{source}: corrupt or incompatible checkpoint, cannot resume ({reason})") from None
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.position = position
        self._drop_unsaved_rows()

    def _drop_unsaved_rows(self) -> None:
        """Drop the ``metrics.csv`` rows the resumed checkpoint does not know of.

        An epoch's row is logged before its checkpoint is written: a run stopped in between (a full
        disk) resumes from the checkpoint before, and would list that epoch twice. Kept: rows up to the
        checkpoint's step, except one at that very step when the run resumes exactly at an epoch's end
        (it logs that epoch again).
        """
        path = self.out_dir / "metrics.csv"
        if self.rank != 0 or not path.is_file():
            return
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames or [], list(reader)
        step, epoch = self.position.step, self.position.epoch
        again = epoch < self.config.epochs and self.position.batch >= len(self.micro_batches(epoch))

        def known(row: dict) -> bool:
            try:
                logged = int(float(row.get("step") or ""))
            except ValueError:
                return True  # not ours to judge
            return logged < step or (logged == step and not again)

        kept = [row for row in rows if known(row)]
        if len(kept) == len(rows):
            return
        import io

        from medsam3.utils.files import write_text_atomic

        text = io.StringIO()
        out = csv.DictWriter(text, fieldnames=fields)
        out.writeheader()
        out.writerows(kept)
        write_text_atomic(path, text.getvalue())

    def _check_same_run(self, folder: Path, meta: dict) -> None:
        """Refuse a checkpoint of another training set, or one whose position means another order."""
        stored = meta.get("train_set")
        if isinstance(stored, dict) and stored.get("fingerprint") != self.train_set["fingerprint"]:
            raise MedSAM3Error(
                f"{folder}: cannot resume: the checkpoint was trained on another training set "
                f"({stored.get('samples')} samples, fingerprint {stored.get('fingerprint')}; this run's has "
                f"{self.train_set['samples']}, {self.train_set['fingerprint']}): train into a new --out"
            )
        config = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
        for key, option in RESUME_INVARIANTS:
            if key in config and config[key] != getattr(self.config, key):
                raise MedSAM3Error(
                    f"{folder}: cannot resume with {option} {getattr(self.config, key)}: the checkpoint was "
                    f"trained with {option} {config[key]} (its saved position counts those steps; keep it, "
                    "or train into a new --out)"
                )
        if "world" in meta and meta["world"] != self.world:
            raise MedSAM3Error(
                f"{folder}: cannot resume on {self.world} process(es): the checkpoint was trained on "
                f"{meta['world']} (each process's share of the data differs)"
            )

    # -- the loop ------------------------------------------------------------------------------
    def _out_of_time(self, started: float) -> bool:
        """Whether the wall-clock budget is spent (every process agrees: rank 0's clock decides)."""
        if self.config.max_minutes is None:
            return False
        spent = time.perf_counter() - started + self._end_reserve() >= 60.0 * self.config.max_minutes
        if self.world > 1:
            flag = torch.tensor([float(spent)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, src=0)
            spent = bool(flag.item())
        return spent

    def _end_reserve(self) -> float:
        """Seconds a run needs after its last step, so that the whole run fits ``max_minutes``: the final
        validation and, when on, the mask-source choice (``END_PASSES``), estimated from the last
        validation's duration, plus ``END_MARGIN_S``."""
        passes = END_PASSES if self.config.choose_mask_sources else 1
        if self._head_stage_runs():  # the head's fit, judged by two validations (with and without it)
            passes += 2
        head = HEAD_MAX_SECONDS if self._head_stage_runs() else 0.0
        return head + (passes * self._val_seconds + END_MARGIN_S if self.val_data else 0.0)

    def _head_stage_runs(self) -> bool:
        """Whether the semantic head gets its stage: asked for, a model with one, and a validation split
        to judge the fitted head by."""
        return self.config.head_steps > 0 and has_semantic_head(self.model) and bool(self.val_data)

    _val_seconds: float = 0.0  # the last validation's duration

    def _time_fraction(self) -> float:
        """Share of the training time spent so far: the budget left once the feature cache was filled
        (0 before training starts or without a budget)."""
        if self._training_started is None or not self.config.max_minutes:
            return 0.0
        left = 60.0 * self.config.max_minutes - (self._training_started - self._started)
        return (time.perf_counter() - self._training_started) / max(left, 1e-6)

    _training_started: float | None = None

    def prefill_cache(self) -> int:
        """Encode every view of every training and validation image into the feature cache up front.

        The cache fills anyway during the first epochs; doing it first keeps those epochs from
        looking slow, shows the encoding as its own progress bar, and lets the learning-rate schedule
        follow the training time that is left. Returns how many images the image tower encoded.
        """
        if self.cache is None:
            return 0
        views = getattr(self.augment, "views", 1) if self.augment is not None else 1
        bank = self.augment if views > 1 and hasattr(self.augment, "view_rng") else None
        seen: set[str] = set()
        pending: list[np.ndarray] = []
        misses = self.cache.misses
        sources = [(self.train_data, bank)] + ([(self.val_data, None)] if self.val_data else [])
        total = len(self.train_data) * (views if bank else 1) + (len(self.val_data) if self.val_data else 0)
        bar = tqdm(total=total, disable=not self.config.progress or self.rank != 0, desc="encode views",
                   unit="view", dynamic_ncols=True)  # fmt: skip
        for data, views_of in sources:
            indices = range(len(data)) if data is self.train_data else range(min(len(data), self.config.val_limit))
            for index in indices:
                sample = data[index]
                images = [sample.image]
                if views_of is not None:
                    images += [views_of.view(sample, v).image for v in range(1, views)]
                for image in images:
                    bar.update(1)
                    key = image_key(image)
                    if key in seen:
                        continue
                    seen.add(key)
                    pending.append(image)
                    if len(pending) == 8:
                        self.cache.encode(pending)
                        pending = []
        if pending:
            self.cache.encode(pending)
        bar.close()
        return self.cache.misses - misses

    def _validation_due(self, final: bool) -> bool:
        """Explicit epochs: after every epoch. A budget: every ``val_every`` steps, and at the end."""
        if not self.budgeted or final:
            return True
        return self.position.step - self._last_val_step >= max(1, self.config.val_every)

    def fit(self) -> dict:
        c = self.config
        writer = self._tensorboard() if self.rank == 0 else None
        bar = tqdm(
            total=self.total_steps,
            initial=self.position.step,
            disable=not c.progress or self.rank != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        started = self._started = time.perf_counter()
        if self.position.step == 0 and self.budgeted:
            self.prefill_cache()
        self._training_started = time.perf_counter()
        self._last_val_step = self.position.step
        self._stale = 0  # validations since the best one
        history = []
        stop = None  # "max_steps", "max_minutes", "steps" (the budget) or "early_stop"
        # A resumed run may start exactly at an epoch's end (its last step was checkpointed): it then
        # only validates and logs, with the loss of that last step.
        logged = {"loss": self.position.last_loss, "lr": self.position.last_lr}
        for epoch in range(self.position.epoch, self.n_epochs):
            batches = self.micro_batches(epoch)
            groups = [batches[i : i + c.grad_accum] for i in range(0, len(batches), c.grad_accum)]
            while self.position.batch < len(batches):
                group = groups[self.position.batch // c.grad_accum]
                logged = self.train_step(epoch, group)
                self.position.batch += len(group)
                self.position.step += 1
                self.position.last_loss, self.position.last_lr = logged["loss"], logged["lr"]
                bar.update(1)
                bar.set_postfix(self._postfix(logged, epoch), refresh=False)
                if writer is not None:
                    for name, value in logged.items():
                        writer.add_scalar(f"train/{name}", value, self.position.step)
                if self.rank == 0 and c.checkpoint_every and self.position.step % c.checkpoint_every == 0:
                    self.save_checkpoint("last")
                if c.max_steps is not None and self.position.step >= c.max_steps:
                    stop = "max_steps"
                    break
                if self.budgeted and self.position.step >= self.total_steps:
                    stop = "steps"
                    break
                if self._out_of_time(started):
                    stop = "max_minutes"
                    break
            if stop == "max_steps":
                break
            finished = self.position.batch >= len(batches)
            if finished:
                self.position.epoch, self.position.batch = epoch + 1, 0
                progress = epoch + 1
            else:  # the budget ran out inside this epoch
                progress = round(epoch + self.position.batch / len(batches), 3)
            final = stop is not None or epoch + 1 >= self.n_epochs
            row = self._end_epoch(progress, logged, started, writer, validate=self._validation_due(final))
            history.append(row)
            bar.set_postfix(self._postfix(logged, epoch), refresh=True)
            if self.world > 1:
                dist.barrier()
            if stop is None and self._early_stop():
                stop = "early_stop"
            if stop is not None:
                break
        bar.close()
        if self.rank == 0 and stop == "max_steps" and not c.checkpoint_every:
            self.save_checkpoint("last")
        if writer is not None:
            writer.close()
        kept = self.keep_choice()
        if kept != "best" and self.val_data:
            if stop == "max_steps":
                kept = "best"  # as if interrupted: a resumed run that ends normally applies `keep`
            elif self.rank == 0:
                self._keep_other_weights(kept)
        head = self._fit_semantic_head() if self.rank == 0 and stop != "max_steps" else None
        mask_sources = self._choose_mask_sources() if self.rank == 0 else None
        summary = {
            "history": history,
            "position": asdict(self.position),
            "stopped_early": stop not in (None, "steps"),
            "stop_reason": stop if stop not in (None, "steps") else ("completed" if history else "nothing to do"),
            "minutes": round((time.perf_counter() - started) / 60.0, 4),
            "max_minutes": c.max_minutes,
            "budget": {"epochs": c.epochs, "steps": self.total_steps, "val_every": c.val_every, "patience": c.patience}
            if self.budgeted
            else {"epochs": c.epochs},
            "best": "best" if (self.out_dir / "best").is_dir() else None,
            "best_val_dice": self.position.best_dice if self.position.best_dice >= 0 else None,
            "kept": kept,
            "validated": bool(self.val_data),
            "val_views": self.val_views,
            "train_set": self.train_set,
            "semantic_head": head,
            "mask_sources": mask_sources,
        }
        if self.rank == 0:
            self._write_summary(summary)
        return summary

    def _postfix(self, logged: dict, epoch: int) -> dict:
        postfix = {"loss": f"{logged['loss']:.3f}" if logged.get("loss") is not None else "-", "epoch": epoch + 1}
        if self.position.best_dice >= 0:
            postfix["val"] = f"{self._last_val:.3f}" if self._last_val is not None else "-"
            postfix["best"] = f"{self.position.best_dice:.3f}"
        return postfix

    _last_val: float | None = None
    _last_val_step: int = 0
    _stale: int = 0

    def _early_stop(self) -> bool:
        """Under a budget: stop after ``patience`` validations that did not beat the best by ``min_delta``."""
        patience = self.config.patience
        return self.budgeted and bool(self.val_data) and patience > 0 and self._stale >= patience

    def _end_epoch(self, progress: float, logged: dict, started: float, writer, validate: bool = True) -> dict:
        """Validate (when due), log a metrics row, write best/ (when better, or always without
        validation) and last/."""
        val = self.validate() if self.rank == 0 and validate else None
        if validate:
            self._last_val_step = self.position.step
        row = {
            "epoch": progress,
            "step": self.position.step,
            "train_loss": "" if logged.get("loss") is None else logged["loss"],
            "val_dice": "" if val is None else round(val, 5),
            "lr": "" if logged.get("lr") is None else logged["lr"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        if self.rank == 0:
            self._log_row(row, writer)
            if val is not None:
                self._last_val = val
                if val > self.position.best_dice + (self.config.min_delta if self.position.best_dice >= 0 else 0):
                    self._stale = 0
                else:
                    self._stale += 1
                if val > self.position.best_dice:
                    self.position.best_dice = val
                    self.save_checkpoint("best", {"val_dice": val, "selected_by": "validation Dice"})
            elif not self.val_data:
                self.save_checkpoint("best", {"selected_by": "latest checkpoint (no validation samples)"})
            self.save_checkpoint("last")
        return row

    def keep_choice(self) -> str:
        """What best/ holds at the end: "best", "last", "average" or "ema" (see ``TrainConfig.keep``)."""
        if not self.val_data:
            return "last"  # best/ is the latest checkpoint all along
        if self.config.keep == "auto":
            return "average-ema" if self.val_images < VAL_SAMPLES_WANTED else "best"
        return self.config.keep

    def _keep_other_weights(self, kept: str) -> None:
        """best/ <- the final weights ("last"), their mean with validation's pick ("average") or the
        run's weight average ("ema"); the pick moves to ``validation-pick/``. The model is at the last
        step here and stays there."""
        import shutil

        best, pick = self.out_dir / "best", self.out_dir / VALIDATION_PICK
        if not best.is_dir():
            return
        # A resumed run whose validation found nothing better still has this rule's earlier best/: the
        # pick is already in validation-pick/.
        if read_adapter_metadata(best).get("selected_by") == "validation Dice" or not pick.is_dir():
            if pick.exists():
                shutil.rmtree(pick)
            os.replace(best, pick)
        why = {
            "last": "final weights",
            "average": "mean of validation's pick and the final weights",
            "ema": f"exponential moving average of the weights (decay {self.config.ema_decay:g})",
            "average-ema": "mean of validation's pick and the exponential moving average of the weights "
            f"(decay {self.config.ema_decay:g})",
        }[kept]
        if self.config.keep == "auto":
            why += f" (validation split of {self.val_images} sample(s): too few to choose a checkpoint by)"
        weights = None
        if kept == "average":
            final = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
            weights = mean_weights(_read_weights(pick), final)
        elif kept == "ema":
            weights = self.ema.weights()
        elif kept == "average-ema":
            weights = mean_weights(_read_weights(pick), self.ema.weights())
        with self._holding(weights):
            self.save_checkpoint("best", {"selected_by": why})

    def _fit_semantic_head(self) -> dict | None:
        """best/ <- its weights with the semantic head fitted alone on the training images as they are
        (no views; see train.semantic_head), when validation backs the fitted head (``head_pays``; else
        best/ is left as it was and the head back at its zero start); None when the stage does not run
        or has nothing to fit on."""
        c = self.config
        best = self.out_dir / "best"
        if not self._head_stage_runs() or not (best / "adapter.json").is_file():
            return None
        samples = []  # images holding the concept (the semantic term skips the others), in a seeded order
        for i in np.random.default_rng([c.seed, 23]).permutation(len(self.train_data))[: 4 * HEAD_MAX_IMAGES]:
            sample = self.train_data[int(i)]
            if len(sample.masks) > 0:
                samples.append(sample)
                if len(samples) == HEAD_MAX_IMAGES:
                    break
        if not samples:
            return None
        items = self._targets_on_device(
            [
                make_item(s, sample_rng(c.seed, 0, k), "text", canvas_size=self.seam.canvas_size)
                for k, s in enumerate(samples)
            ]
        )
        kept = _read_weights(best)
        head = {n: p for n, p in self.model.named_parameters() if n.startswith("semantic_head.")}
        start = {n: (p.detach().clone(), p.requires_grad) for n, p in head.items()}
        with self._holding(kept):
            self.model.eval()
            without = self.validation_by_framing()
            inputs = collect_head_inputs(self.seam, items, self._vision)
            report = fit_semantic_head(self.model, inputs, self.loss.semantic_loss, c.head_steps, c.seed)
            fitted = {n: p.detach().clone() for n, p in head.items()}
            report["validation"] = {"without": without, "with": self.validation_by_framing()}
        report["kept"] = head_pays(without, report["validation"]["with"])
        if not report["kept"]:  # the head as it was: the model predicts as if the stage never ran
            for name, parameter in head.items():
                parameter.data.copy_(start[name][0])
                parameter.requires_grad_(start[name][1])
            update_adapter_metadata(best, semantic_head=report)
            return report
        meta = read_adapter_metadata(best)
        extra = {k: meta[k] for k in ("selected_by", "val_dice") if k in meta}
        with self._holding({**kept, **fitted}):
            self.save_checkpoint("best", {**extra, "semantic_head": report})
        return report

    def _choose_mask_sources(self) -> dict | None:
        """Each concept's mask source, measured on the validation split with the kept weights, written
        into ``best/adapter.json`` (``mask_sources``); None when off or nothing to measure on."""
        best = self.out_dir / "best"
        if not self.config.choose_mask_sources or not self.val_data or not (best / "adapter.json").is_file():
            return None
        from medsam3.train.mask_choice import choose_mask_sources, record_mask_sources

        with self._holding(_read_weights(best)):
            choice = choose_mask_sources(self.loaded, self.val_data, cache=self.cache, limit=self.config.val_limit)
        record_mask_sources(best, choice)
        return choice

    @contextmanager
    def _holding(self, weights: dict[str, torch.Tensor] | None):
        """The model with ``weights`` (trained parameters by name; None: unchanged) inside the block,
        back at the last step after it (what the optimizer state belongs to)."""
        if weights is None:
            yield
            return
        own = dict(self.model.named_parameters())
        current = {name: own[name].detach().clone() for name in weights}
        for name, tensor in weights.items():
            own[name].data.copy_(tensor.to(own[name].device, own[name].dtype))
        try:
            yield
        finally:
            for name, value in current.items():
                own[name].data.copy_(value)

    def _write_summary(self, summary: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out_dir / SUMMARY_FILE, summary)

    def _log_row(self, row: dict, writer) -> None:
        path = self.out_dir / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                out.writeheader()
            out.writerow(row)
        if writer is not None and row["val_dice"] != "":
            writer.add_scalar("val/dice", row["val_dice"], row["step"])

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but training must not die for a log
            return None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))


def frozen_components_untouched(model) -> bool:
    """True when no encoder parameter requires grad (the paper's promise)."""
    return not any(p.requires_grad for n, p in model.named_parameters() if n.split(".")[0] in ENCODER_COMPONENTS)
