"""MedSAM-3 fine-tuning: the detector learns medical concepts while the encoders stay frozen.

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch encodes its images once (from
the feature cache when the vision encoder is frozen and caching is on), splits samples into
text-only and text+box prompts (a geometry prompt changes what the detector attends to, so each
kind gets its own detector pass, exactly as at inference), and applies the matched SAM 3 losses.

Reproducibility: the sample order of an epoch is a permutation seeded by (seed, epoch); every
per-sample random choice draws from a generator seeded by (seed, epoch, index); the torch RNG
(dropout) is saved in each checkpoint. A run stopped after any checkpoint and resumed therefore
ends with the same weights as one that never stopped.

Multi-process (``torchrun`` / ``accelerate launch``): each rank takes every ``world``-th sample of
the epoch's order and gradients of the trainable parameters are averaged with all_reduce before the
optimizer step (gloo on CPU, NCCL on GPU). Only rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.data.sample import Sample
from medsam3.errors import MedSAM3Error
from medsam3.evaluate.metrics import dice
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt
from medsam3.model.adapter import read_adapter_metadata, save_adapter
from medsam3.model.components import ENCODER_COMPONENTS
from medsam3.model.loading import LoadedModel
from medsam3.model.policy import apply_policy, check_policy
from medsam3.train.batches import TrainItem, check_prompt_mode, make_item, sample_rng
from medsam3.train.feature_cache import FeatureCache
from medsam3.train.losses import LossWeights, Sam3DetectionLoss
from medsam3.train.schedule import warmup_cosine

STATE_FILE = "trainer_state.pt"
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")


@dataclass
class TrainConfig:
    policy: str = "paper"
    prompt_mode: str = "mixed"
    text_box_fraction: float = 0.5
    epochs: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    grad_clip: float = 0.1
    box_jitter: float = 0.1
    seed: int = 0
    cache_features: bool = False
    cache_dir: str | None = None
    rebuild_cache: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = end of each epoch only
    val_limit: int = 200  # validation samples per epoch (first N of the split)
    max_steps: int | None = None  # stop after this many optimizer steps (as if interrupted)
    bf16: bool = True  # bf16 autocast on GPU only; CPU always trains in fp32
    progress: bool = True
    loss_weights: dict = field(default_factory=dict)


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps done overall
    best_dice: float = -1.0


def distributed_context() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun/accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        self.loaded = loaded
        self.model = loaded.model
        self.config = config
        self.train_data = train_data
        self.val_data = val_data
        self.augment = augment
        self.out_dir = Path(out_dir)
        self.rank, self.world = distributed_context()
        self.device = loaded.device
        self.encoders_frozen = config.policy in ("paper", "lora-detector")
        if config.cache_features and not self.encoders_frozen:
            raise MedSAM3Error(
                f"--cache-features needs frozen encoders, but policy '{config.policy}' trains the vision "
                "encoder: use --policy paper or lora-detector, or drop --cache-features"
            )
        if config.cache_features and augment is not None and not getattr(augment, "flips_only", False):
            raise MedSAM3Error(
                "--cache-features cannot be combined with random image augmentation: cached features are "
                "those of the exact pixels, so augmented views would be encoded anew each step (flips are "
                "fine: use --augment-flips, each flipped view is cached once)"
            )
        apply_policy(self.model, config.policy)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(self._shard_size() / config.batch_size / config.grad_accum)
        total = self.steps_per_epoch * config.epochs
        self.scheduler = warmup_cosine(self.optimizer, total, int(config.warmup_fraction * total))
        self.loss = Sam3DetectionLoss(LossWeights(**config.loss_weights))
        self.cache = None
        if config.cache_features:
            cache_dir = config.cache_dir or self.out_dir / "feature_cache"
            self.cache = FeatureCache(cache_dir, loaded.seam, rebuild=config.rebuild_cache)
        self.seam = loaded.seam
        self.position = Position()
        self.concepts = sorted({s.concept for s in train_data})
        self.autocast = self.device.type == "cuda" and config.bf16

    # -- data order ----------------------------------------------------------------------------
    def _shard_size(self) -> int:
        return len(self.train_data) // self.world if self.world > 1 else len(self.train_data)

    def epoch_indices(self, epoch: int) -> list[int]:
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
        if self.cache is not None:
            embedding = self.cache.encode(rgbs)
        else:
            embedding = self.seam.embed_images(rgbs, grad=not self.encoders_frozen)
        return self.seam.vision_features(embedding)

    # -- one step ------------------------------------------------------------------------------
    def forward_items(self, items: list[TrainItem]) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Detector outputs for every item (text-only and text+box passes joined) and their targets."""
        vision = self._vision(items)
        outputs: dict[str, list[torch.Tensor]] = {k: [] for k in OUTPUT_KEYS}
        targets: list[dict] = []
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
            result = self.seam.detect(self.seam.select(vision, group), features, mask, boxes, labels)
            for key in OUTPUT_KEYS:
                outputs[key].append(getattr(result, key))
            targets.extend(items[i].target for i in group)
        return {k: torch.cat(v) for k, v in outputs.items()}, targets

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
            items = self._items(epoch, indices)
            targets_device = [
                {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in item.target.items()} for item in items
            ]
            for item, target in zip(items, targets_device):
                item.target = target
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                outputs, targets = self.forward_items(items)
                total, terms = self.loss(outputs, targets)
            (total / len(batches)).backward()
            logged["loss"] = logged.get("loss", 0.0) + float(total.detach()) / len(batches)
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + float(value) / len(batches)
        self._sync_gradients()
        if self.config.grad_clip > 0:
            logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        logged["lr"] = self.scheduler.get_last_lr()[0]
        return logged

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean union Dice on the validation samples (text prompts, or text+box in that mode)."""
        if not self.val_data:
            return None
        self.model.eval()
        predictor = Sam3Predictor(self.loaded)
        scores = []
        for index in range(min(len(self.val_data), self.config.val_limit)):
            sample = self.val_data[index]
            boxes = tuple(map(tuple, sample.boxes)) if self.config.prompt_mode == "text+box" else ()
            predictor.set_image(sample.image)
            result = predictor.predict_one(Prompt(sample.concept, boxes=boxes))
            scores.append(dice(result.union, sample.union))
        return float(np.mean(scores))

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "position": asdict(self.position),
            "config": asdict(self.config),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self, name: str, extra: dict | None = None) -> Path:
        """Write ``out_dir/name`` atomically: the previous checkpoint survives any failure."""
        state = self._state()
        meta = {"position": asdict(self.position), "train_config": asdict(self.config), **(extra or {})}
        return save_adapter(
            self.loaded,
            self.out_dir / name,
            self.config.policy,
            self.concepts,
            extra=meta,
            write_extra=lambda folder: torch.save(state, folder / STATE_FILE),
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
        except (OSError, EOFError, RuntimeError, ValueError, TypeError, KeyError, SafetensorError,
                pickle.UnpicklingError) as exc:  # fmt: skip
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise MedSAM3Error(f"{source}: corrupt or incompatible checkpoint, cannot resume ({reason})") from None
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.position = position

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        c = self.config
        writer = self._tensorboard() if self.rank == 0 else None
        total_steps = self.steps_per_epoch * c.epochs
        bar = tqdm(
            total=total_steps,
            initial=self.position.step,
            disable=not c.progress or self.rank != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        history = []
        stopped = False
        for epoch in range(self.position.epoch, c.epochs):
            batches = self.micro_batches(epoch)
            groups = [batches[i : i + c.grad_accum] for i in range(0, len(batches), c.grad_accum)]
            while self.position.batch < len(batches):
                group = groups[self.position.batch // c.grad_accum]
                logged = self.train_step(epoch, group)
                self.position.batch += len(group)
                self.position.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{logged['loss']:.3f}", epoch=epoch + 1)
                if writer is not None:
                    for name, value in logged.items():
                        writer.add_scalar(f"train/{name}", value, self.position.step)
                if self.rank == 0 and c.checkpoint_every and self.position.step % c.checkpoint_every == 0:
                    self.save_checkpoint("last")
                if c.max_steps is not None and self.position.step >= c.max_steps:
                    stopped = True
                    break
            if stopped:
                break
            self.position.epoch, self.position.batch = epoch + 1, 0
            val = self.validate() if self.rank == 0 else None
            row = {
                "epoch": epoch + 1,
                "step": self.position.step,
                "train_loss": logged["loss"],
                "val_dice": "" if val is None else round(val, 5),
                "lr": logged["lr"],
                "seconds": round(time.perf_counter() - started, 2),
            }
            history.append(row)
            if self.rank == 0:
                self._log_row(row, writer)
                if val is not None and val > self.position.best_dice:
                    self.position.best_dice = val
                    self.save_checkpoint("best", {"val_dice": val})
                self.save_checkpoint("last")
            if self.world > 1:
                dist.barrier()
        bar.close()
        if self.rank == 0 and stopped and not c.checkpoint_every:
            self.save_checkpoint("last")
        if writer is not None:
            writer.close()
        return {"history": history, "position": asdict(self.position), "stopped_early": stopped}

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
