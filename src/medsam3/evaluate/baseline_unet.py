"""The specialist yardstick: a MONAI 2D U-Net trained on a dataset's train split, scored like MedSAM-3.

The paper compares MedSAM-3 with a U-Net trained per dataset. ``train_unet_baseline`` trains one
U-Net with one sigmoid output channel per concept on any dataset layout ``open_dataset`` reads,
and saves it as ``model.safetensors`` + ``config.json``. ``UNetSegmenter`` loads it and answers the
same ``set_image`` / ``predict`` protocol as the SAM 3 predictor (connected components become
instances, presence is the channel's highest probability), so ``evaluate_dataset`` and
``compare_runs`` put the two side by side with identical scoring.

Each sample trains only its own concept's channel: a dataset that labels "liver" on some images
and "tumor" on others never teaches the network that an unlabelled structure is background.

``max_minutes`` stops training after the batch that crosses that wall-clock budget (the clock starts
after the training set is loaded, as ``medsam3 train --max-minutes`` counts only its training loop),
so the U-Net and MedSAM-3 can be compared at equal training time; the config records the stop.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.networks.nets import UNet
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from medsam3.data.masks import components, masks_to_boxes
from medsam3.errors import DatasetError, MedSAM3Error, ModelSpecError, PromptError
from medsam3.infer.types import Prompt, PromptResult
from medsam3.utils.files import atomic_files, save_tensors, write_json_atomic, write_text_atomic
from medsam3.utils.outputs import check_output_folder
from medsam3.utils.terminal import one_line as _one_line

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOG_NAME = "train_log.csv"
RUN_FILES = (WEIGHTS_NAME, LOG_NAME, CONFIG_NAME)
MIN_SIZE, MAX_SIZE = 16, 4096  # training resolution in pixels
KIND = "medsam3-unet-baseline"
LOSSES = ("dicece", "dicefocal")


@dataclass
class UNetConfig:
    """Everything needed to rebuild the network and to know how it was trained."""

    concepts: list[str]
    size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    loss: str = "dicece"
    split: str | None = "train"
    dataset: str = ""
    n_train_samples: int = 0
    final_loss: float | None = None
    seconds: float | None = None
    max_minutes: float | None = None
    stop_reason: str = ""  # "completed" or "max_minutes"
    steps: int = 0  # optimizer steps taken
    kind: str = KIND
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"], data["strides"] = list(self.channels), list(self.strides)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UNetConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["channels"] = tuple(int(c) for c in known.get("channels", cls.channels))
        known["strides"] = tuple(int(s) for s in known.get("strides", cls.strides))
        return cls(**known)


def build_unet(config: UNetConfig) -> UNet:
    """MONAI's residual U-Net: RGB in, one logit channel per concept out."""
    if len(config.strides) != len(config.channels) - 1:
        raise ModelSpecError(
            f"U-Net needs one stride fewer than channels: {config.channels} vs strides {config.strides}"
        )
    factor = int(np.prod(config.strides))
    if config.size % factor:
        raise ModelSpecError(
            f"U-Net input size {config.size} must be a multiple of {factor} (the strides' product)"
        )
    return UNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=len(config.concepts),
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
    )


def image_tensor(rgb: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [-1, 1], area-averaged when shrinking."""
    x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) bool -> (size, size) float {0, 1} (nearest neighbour keeps masks binary)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(m, size=(size, size), mode="nearest")[0, 0]


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _load_training_set(
    dataset: Sequence[Any], concepts: list[str], size: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode every sample once and keep it resized: (images uint8, masks bool, concept index)."""
    images = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8)
    masks = torch.empty((len(dataset), size, size), dtype=torch.bool)
    index = torch.empty(len(dataset), dtype=torch.long)
    for i in tqdm(range(len(dataset)), desc="load train split", unit="sample", disable=None if progress else True):
        s = dataset[i]
        union = s.masks.any(axis=0) if len(s.masks) else np.zeros(s.image.shape[:2], dtype=bool)
        images[i] = ((image_tensor(s.image, size) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        masks[i] = mask_tensor(union, size) > 0.5
        index[i] = concepts.index(s.concept)
    return images, masks, index


def _loss_fn(name: str) -> torch.nn.Module:
    """Dice over the whole batch (``batch=True``): a per-image Dice is undefined on negatives (empty
    truth) and, averaged per image, pushes the network to predict nothing anywhere."""
    if name == "dicece":
        return DiceCELoss(sigmoid=True, batch=True)
    if name == "dicefocal":
        return DiceFocalLoss(sigmoid=True, batch=True)
    raise MedSAM3Error(f"U-Net loss must be one of {', '.join(LOSSES)}, got '{name}'")


def _device(device: str) -> torch.device:
    """auto, cpu or cuda[:N]; CUDA asked for on a machine without it is a one-line error."""
    from medsam3.model.loading import resolve_device

    return resolve_device(device)


@dataclass
class UNetRun:
    """A trained baseline: its folder, config and per-epoch mean loss."""

    out_dir: Path
    config: UNetConfig
    history: list[float]


def train_unet_baseline(
    dataset_path: str | Path | None,
    out_dir: str | Path,
    *,
    epochs: int = 50,
    batch_size: int = 8,
    lr: float = 1e-3,
    size: int = 128,
    seed: int = 0,
    split: str | None = "train",
    layout: str = "auto",
    concepts: Sequence[str] | None = None,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] | None = None,
    num_res_units: int = 2,
    loss: str = "dicece",
    augment: bool = True,
    device: str = "cpu",
    progress: bool = True,
    dataset: Sequence[Any] | None = None,
    max_minutes: float | None = None,
) -> UNetRun:
    """Train a 2D U-Net on the ``split`` samples of a dataset and save it in ``out_dir``.

    ``dataset_path`` is opened with ``medsam3.data.dataset.open_dataset`` (any layout); pass an
    already opened ``dataset`` instead to reuse one. ``epochs=0`` saves the untrained network (a
    floor to compare against). Augmentation is a random horizontal flip. ``max_minutes``: stop after
    the batch that crosses this many minutes of training (the last epoch's loss is then over the
    batches it ran).
    """
    if epochs < 0 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise MedSAM3Error(
            f"U-Net training needs epochs >= 0, batch size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})"
        )
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MedSAM3Error(f"U-Net size must be {MIN_SIZE}..{MAX_SIZE} pixels, got {size}")
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise MedSAM3Error(f"U-Net max_minutes must be a positive number of minutes, got {max_minutes}")
    check_output_folder(out_dir, inputs=[dataset_path], files=RUN_FILES)
    dev = _device(device)
    if dataset is None:
        if dataset_path is None:
            raise MedSAM3Error("train_unet_baseline needs a dataset path or an opened dataset")
        from medsam3.data.dataset import open_dataset

        dataset = open_dataset(dataset_path, layout=layout, split=split)
    elif split is not None and callable(getattr(dataset, "split", None)):
        dataset = dataset.split(split)  # type: ignore[union-attr]
    name = Path(dataset_path).name if dataset_path is not None else str(getattr(dataset, "name", ""))
    if len(dataset) == 0:
        raise DatasetError(f"{name or 'dataset'}: split '{split}' has no samples to train the U-Net on")
    if concepts is not None:
        concept_list = list(concepts)
        if callable(getattr(dataset, "select", None)):
            dataset = dataset.select(concepts=concept_list)  # type: ignore[union-attr]
        else:
            dataset = [s for s in dataset if s.concept in set(concept_list)]
    else:
        concept_list = list(getattr(dataset, "concepts", None) or dict.fromkeys(s.concept for s in dataset))
    if not concept_list:
        raise DatasetError(f"{name or 'dataset'}: no concept to train the U-Net on")

    generator = _seed_everything(seed)
    config = UNetConfig(
        concepts=concept_list,
        size=size,
        channels=tuple(int(c) for c in channels),
        strides=tuple(int(s) for s in strides) if strides is not None else (2,) * (len(channels) - 1),
        num_res_units=num_res_units,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        loss=loss,
        split=split,
        dataset=name,
        max_minutes=max_minutes,
    )
    criterion = _loss_fn(loss)
    model = build_unet(config)
    model.to(dev)
    images, masks, index = _load_training_set(dataset, concept_list, size, progress)
    config.n_train_samples = len(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history: list[float] = []
    started = time.perf_counter()
    model.train()
    out_of_time = False
    for _ in tqdm(range(epochs), desc="train U-Net", unit="epoch", disable=None if progress else True):
        order = torch.randperm(len(images), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = images[batch].to(dev).float() / 127.5 - 1.0
            y = masks[batch].to(dev).float()[:, None]
            if augment:
                flip = torch.rand(len(batch), generator=generator) < 0.5
                x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            logits = model(x)[torch.arange(len(batch)), index[batch].to(dev)][:, None]
            step_loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            total += step_loss.item() * len(batch)
            count += len(batch)
            config.steps += 1
            if max_minutes is not None and (time.perf_counter() - started) / 60.0 >= max_minutes:
                out_of_time = True
                break
        history.append(total / count)
        if out_of_time:
            break
    config.stop_reason = "max_minutes" if out_of_time else "completed"
    config.final_loss = history[-1] if history else None
    config.seconds = round(time.perf_counter() - started, 3)
    save_unet(model, config, out_dir, history)
    return UNetRun(out_dir=Path(out_dir), config=config, history=history)


def save_unet(
    model: torch.nn.Module, config: UNetConfig, out_dir: str | Path, history: Sequence[float]
) -> None:
    """Weights (safetensors), the loss log and the config, all three or none (the config moved last)."""
    out_dir = check_output_folder(out_dir, files=RUN_FILES)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["epoch", "loss"])
    writer.writerows([i + 1, f"{v:.6f}"] for i, v in enumerate(history))
    with atomic_files() as files:
        save_tensors(files.path(out_dir / WEIGHTS_NAME), state, metadata={"kind": KIND})
        write_text_atomic(files.path(out_dir / LOG_NAME), buf.getvalue())
        write_json_atomic(files.path(out_dir / CONFIG_NAME), config.to_json())


def is_unet_run(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`train_unet_baseline` (for model-spec dispatch)."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("kind") == KIND
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def _normalize(phrase: str) -> str:
    return " ".join(phrase.lower().split())


class UNetSegmenter:
    """A trained U-Net behind the predictor protocol: ``set_image(rgb)``, then ``predict(prompts)``.

    The prompt's phrase picks the output channel (exact concept name, case-insensitive); a U-Net
    cannot take box prompts, so boxes are ignored. Instances are connected components of the
    thresholded probability map, scored by their mean probability; presence is the map's maximum.
    """

    def __init__(
        self, model: torch.nn.Module, config: UNetConfig, *, device: str = "cpu", mask_threshold: float = 0.5
    ):
        self.model = model.eval()
        self.config = config
        self.device = _device(device)
        self.model.to(self.device)
        self.mask_threshold = mask_threshold
        self.name = f"U-Net baseline ({config.dataset or 'dataset'}, {config.size}px)"
        self._channels = {_normalize(c): i for i, c in enumerate(config.concepts)}
        self._probs: np.ndarray | None = None

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str = "cpu", mask_threshold: float = 0.5) -> UNetSegmenter:
        """Load a folder written by :func:`train_unet_baseline`."""
        path = Path(path)
        if not is_unet_run(path):
            raise ModelSpecError(f"{path}: not a U-Net baseline folder (no {CONFIG_NAME} of kind {KIND})")
        if not (path / WEIGHTS_NAME).is_file():
            raise ModelSpecError(f"{path}: {WEIGHTS_NAME} is missing")
        try:
            config = UNetConfig.from_json(json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")))
        except (TypeError, ValueError, AttributeError) as exc:  # wrong keys or types in the JSON
            raise ModelSpecError(f"{path / CONFIG_NAME}: not a valid U-Net config ({_one_line(exc)})") from None
        model = build_unet(config)
        try:
            weights = load_file(str(path / WEIGHTS_NAME))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelSpecError(f"{path / WEIGHTS_NAME}: corrupt or unreadable weights ({_one_line(exc)})") from None
        try:
            model.load_state_dict(weights)
        except (RuntimeError, ValueError) as exc:
            raise ModelSpecError(
                f"{path / WEIGHTS_NAME}: does not fit the U-Net in {CONFIG_NAME} ({_one_line(exc)[:200]})"
            ) from None
        return cls(model, config, device=device, mask_threshold=mask_threshold)

    @torch.no_grad()
    def set_image(self, rgb: np.ndarray) -> None:
        """Run the network once; keep per-concept probabilities at the image's own size."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise MedSAM3Error(f"U-Net input must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        x = image_tensor(rgb, self.config.size)[None].to(self.device)
        logits = self.model(x)
        logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
        self._probs = torch.sigmoid(logits)[0].float().cpu().numpy()

    def predict(self, prompts: Sequence[Prompt], score_threshold: float = 0.5) -> list[PromptResult]:
        if self._probs is None:
            raise MedSAM3Error("call set_image before predict")
        return [self._predict_one(p, score_threshold) for p in prompts]

    def _predict_one(self, prompt: Prompt, score_threshold: float) -> PromptResult:
        channel = self._channels.get(_normalize(prompt.text))
        if channel is None:
            raise PromptError(
                f"this U-Net knows {', '.join(self.config.concepts)}; it cannot segment '{prompt.text}'"
            )
        prob = self._probs[channel]  # type: ignore[index]
        parts = components(prob >= self.mask_threshold)
        scores = np.array([float(prob[m].mean()) for m in parts], dtype=np.float32)
        keep = np.flatnonzero(scores >= score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        parts, scores = parts[keep], scores[keep]
        boxes = masks_to_boxes(parts)
        return PromptResult(
            prompt=prompt, presence=float(prob.max()), scores=scores, boxes=boxes, masks=parts, semantic=prob
        )
