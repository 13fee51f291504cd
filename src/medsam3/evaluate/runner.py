"""Run a segmenter over a dataset and score every (image, concept) sample.

The segmenter is anything with ``set_image(rgb)`` and ``predict(list[Prompt], score_threshold=...)
-> list[PromptResult]``: the SAM 3 predictor, a fine-tuned MedSAM-3, or the U-Net baseline, so all
of them are scored by the same code. ``prompt_mode="text"`` sends the concept phrase only (the
paper's T); ``"text+box"`` adds the ground-truth boxes as positive exemplars (the paper's T+I).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from medsam3.data.masks import components
from medsam3.errors import DatasetError, MedSAM3Error
from medsam3.evaluate.metrics import (
    InstanceScores,
    SegmentationScores,
    Spacing,
    check_pair,
    match_instances,
    segmentation_scores,
)
from medsam3.evaluate.plots import CaseView, make_view, plot_dice_distribution, render_worst_cases
from medsam3.evaluate.report import (
    CSV_NAME,
    MARKDOWN_NAME,
    SUMMARY_NAME,
    CaseRecord,
    markdown_report,
    summarise,
    write_case_csv,
)
from medsam3.infer.types import Prompt, PromptResult
from medsam3.utils.files import atomic_files, write_json_atomic, write_text_atomic
from medsam3.utils.outputs import check_output_folder

PromptMode = Literal["text", "text+box"]
PROMPT_MODES: tuple[str, ...] = ("text", "text+box")
WORST_GRID_NAME = "worst_cases.png"
DISTRIBUTION_NAME = "dice_distribution.png"


class Segmenter(Protocol):
    """What ``evaluate_dataset`` needs of a model."""

    def set_image(self, rgb: np.ndarray) -> Any: ...

    def predict(self, prompts: list[Prompt], score_threshold: float = ...) -> list[PromptResult]: ...


@dataclass
class EvaluationResult:
    """Everything a run measured, and where it was written."""

    records: list[CaseRecord]
    summary: dict[str, Any]
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def markdown(self) -> str:
        return markdown_report(self.summary)


def _case_name(sample: Any) -> str:
    return f"{getattr(sample, 'case_id', '?')} ({getattr(sample, 'concept', '?')})"


def check_sample(sample: Any) -> None:
    """Refuse a sample that cannot be scored, naming its case: NaN pixels, wrong shapes or types."""
    name = _case_name(sample)
    image = np.asarray(sample.image)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise MedSAM3Error(f"case {name}: image contains NaN or inf pixels ({sample.source or 'no source'})")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DatasetError(f"case {name}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    masks = np.asarray(sample.masks)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise DatasetError(f"case {name}: masks {masks.shape} do not match the image {image.shape[:2]}")
    if len(sample.boxes) != len(masks):
        raise DatasetError(f"case {name}: {len(sample.boxes)} boxes for {len(masks)} masks")


def build_prompt(sample: Any, prompt_mode: str) -> Prompt:
    """The concept phrase, plus the ground-truth boxes in ``text+box`` mode (negatives stay text-only)."""
    if prompt_mode == "text" or len(sample.boxes) == 0:
        return Prompt(sample.concept)
    return Prompt(sample.concept, boxes=tuple(tuple(float(v) for v in b) for b in sample.boxes))


def _iterate(dataset: Any) -> Iterator[tuple[int, Any]]:
    """Yield (index, sample-or-exception): indexable datasets are read one item at a time, so one
    unreadable case raises on its own and the rest can still be scored."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for i in range(len(dataset)):
            try:
                yield i, dataset[i]
            except MedSAM3Error as exc:
                yield i, exc
    else:
        yield from enumerate(dataset)


#: What ``evaluate_dataset`` writes into its folder.
REPORT_FILES = (CSV_NAME, SUMMARY_NAME, MARKDOWN_NAME, DISTRIBUTION_NAME, WORST_GRID_NAME)


def check_report_folder(out_dir: str | Path, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Refuse a report folder before any work: a file, unwritable, the dataset itself or inside it,
    or holding a folder under a report file's name (see :mod:`medsam3.utils.outputs`)."""
    return check_output_folder(out_dir, inputs=inputs, files=REPORT_FILES)


def _dataset_root(dataset: Any) -> Path | None:
    """The folder a dataset was read from, when it says."""
    for value in (getattr(getattr(dataset, "info", None), "root", None), getattr(dataset, "root", None)):
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
    return None


def _dataset_name(dataset: Any) -> str:
    """A dataset's name for reports (and for matching the paper's tables): its own, or its folder's."""
    name = getattr(dataset, "name", None)
    if isinstance(name, str) and name:
        return name
    info = getattr(dataset, "info", None)
    roots = (getattr(info, "root", None), getattr(dataset, "root", None), getattr(dataset, "path", None))
    for value in roots:
        if value:
            return Path(value).name
    return type(dataset).__name__


def _describe_model(segmenter: Any) -> str:
    """The segmenter's own name, or its model spec (+ adapter) when it is the SAM 3 predictor."""
    for attr in ("name", "spec", "model_name"):
        value = getattr(segmenter, attr, None)
        if isinstance(value, str) and value:
            return value
    loaded = getattr(segmenter, "loaded", None)
    spec = getattr(loaded, "spec", None)
    if isinstance(spec, str) and spec:
        adapter = getattr(loaded, "adapter", None)
        return f"{spec} + adapter" if adapter else spec
    return type(segmenter).__name__


def score_case(
    sample: Any,
    result: PromptResult,
    *,
    nsd_tolerance: float,
    split: str,
    seconds: float,
) -> CaseRecord:
    """Compare one prediction with its sample's ground truth; a shape mismatch names the case."""
    name = _case_name(sample)
    gt_union = np.asarray(sample.masks, dtype=bool).any(axis=0) if len(sample.masks) else None
    height, width = sample.image.shape[:2]
    if gt_union is None:
        gt_union = np.zeros((height, width), dtype=bool)
    pred_masks = np.asarray(result.masks, dtype=bool)
    if pred_masks.ndim != 3:
        raise MedSAM3Error(f"case {name}: predicted masks must be (N, H, W), got shape {pred_masks.shape}")
    pred_union = pred_masks.any(axis=0) if len(pred_masks) else np.zeros(pred_masks.shape[1:], dtype=bool)
    check_pair(pred_union, gt_union, case=name)
    sem = segmentation_scores(pred_union, gt_union, sample.spacing, nsd_tolerance=nsd_tolerance, case=name)
    inst = match_instances(pred_masks, np.asarray(sample.masks, dtype=bool), case=name)
    presence = float(result.presence)
    if math.isnan(presence):
        raise MedSAM3Error(f"case {name}: the segmenter returned a NaN presence score")
    return CaseRecord(
        case=str(sample.case_id),
        concept=sample.concept,
        split=split,
        dice=sem.dice,
        iou=sem.iou,
        nsd=sem.nsd,
        hd95=sem.hd95,
        presence_pred=presence,
        presence_gt=len(sample.masks) > 0,
        n_pred=len(pred_masks),
        n_gt=len(sample.masks),
        seconds=seconds,
        tp=inst.tp,
        fp=inst.fp,
        fn=inst.fn,
        inst_f1=inst.f1,
        matched_dice=inst.matched_dice,
        source=str(getattr(sample, "source", "") or ""),
        modality=str(getattr(sample, "modality", "") or ""),
    )


class _WorstCases:
    """Keep the ``k`` lowest-Dice cases (thumbnails only) while streaming through a dataset."""

    def __init__(self, k: int):
        self.k = k
        self._heap: list[tuple[float, int, CaseView]] = []
        self._counter = itertools.count()

    def offer(self, record: CaseRecord, image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> None:
        if self.k <= 0:
            return
        key = -record.dice  # heap top = highest Dice kept, the first to drop
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, (key, next(self._counter), make_view(record, image, gt, pred)))
        elif key > self._heap[0][0]:
            heapq.heapreplace(self._heap, (key, next(self._counter), make_view(record, image, gt, pred)))

    @property
    def views(self) -> list[CaseView]:
        return [v for _, _, v in self._heap]


class _CaseRunner:
    """Prompt the segmenter for one sample and score it; re-encode the image only when it changes
    (an image with three concepts is three samples in a row, but one vision-encoder pass)."""

    def __init__(self, segmenter: Segmenter, *, prompt_mode: str, threshold: float, nsd_tolerance: float):
        self.segmenter = segmenter
        self.prompt_mode = prompt_mode
        self.threshold = threshold
        self.nsd_tolerance = nsd_tolerance
        self._image: np.ndarray | None = None

    def _set_image(self, image: np.ndarray) -> None:
        if (
            self._image is not None
            and self._image.shape == image.shape
            and np.array_equal(self._image, image)
        ):
            return
        self._image = None  # a failed set_image must not leave a stale cache behind
        self.segmenter.set_image(image)
        self._image = image

    def run(self, sample: Any, *, split: str) -> tuple[CaseRecord, np.ndarray, np.ndarray]:
        """(record, ground-truth union, predicted union) of one sample."""
        check_sample(sample)
        prompt = build_prompt(sample, self.prompt_mode)
        tick = time.perf_counter()
        self._set_image(sample.image)
        results = self.segmenter.predict([prompt], score_threshold=self.threshold)
        seconds = time.perf_counter() - tick
        if len(results) != 1:
            raise MedSAM3Error(f"case {_case_name(sample)}: {len(results)} results for 1 prompt")
        record = score_case(
            sample, results[0], nsd_tolerance=self.nsd_tolerance, split=split, seconds=seconds
        )
        gt = np.asarray(sample.masks, dtype=bool)
        pred = np.asarray(results[0].masks, dtype=bool)
        empty = np.zeros(sample.image.shape[:2], dtype=bool)
        return record, gt.any(axis=0) if len(gt) else empty, pred.any(axis=0) if len(pred) else empty


def evaluate_dataset(
    dataset: Iterable[Any],
    segmenter: Segmenter,
    *,
    prompt_mode: PromptMode | str = "text",
    out_dir: str | Path,
    skip_bad: bool = False,
    progress: bool = True,
    threshold: float = 0.5,
    presence_threshold: float = 0.5,
    nsd_tolerance: float = 2.0,
    split: str | None = None,
    worst_k: int = 8,
    dataset_name: str | None = None,
    model_name: str | None = None,
) -> EvaluationResult:
    """Score ``segmenter`` on every sample of ``dataset`` and write the report files into ``out_dir``.

    Writes (each atomically) ``per_case.csv``, ``summary.json``, ``report.md``, ``worst_cases.png``
    and ``dice_distribution.png``. A bad case (unreadable, NaN pixels, mismatched shapes) raises a
    :class:`MedSAM3Error` naming it, or with ``skip_bad`` is skipped and listed in the summary.
    """
    if prompt_mode not in PROMPT_MODES:
        raise MedSAM3Error(f"prompt mode must be one of {', '.join(PROMPT_MODES)}, got '{prompt_mode}'")
    out_dir = check_report_folder(out_dir, inputs=[_dataset_root(dataset)])
    if split is not None and callable(getattr(dataset, "split", None)):
        dataset = dataset.split(split)  # type: ignore[union-attr]
    name = dataset_name or _dataset_name(dataset)
    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    if total == 0:
        where = f" split '{split}'" if split else ""
        raise DatasetError(f"{name}{where}: no samples to evaluate")

    records: list[CaseRecord] = []
    skipped: list[dict[str, Any]] = []
    worst = _WorstCases(worst_k)
    units: set[str] = set()
    runner = _CaseRunner(segmenter, prompt_mode=prompt_mode, threshold=threshold, nsd_tolerance=nsd_tolerance)
    started = time.perf_counter()
    progress_bar = tqdm(total=total, desc=f"evaluate {name}", unit="case", disable=None if progress else True)
    with progress_bar as bar:
        for index, item in _iterate(dataset):
            try:
                if isinstance(item, BaseException):
                    raise item
                case_split = split or str(getattr(item, "meta", {}).get("split", "") or "")
                record, gt_union, pred_union = runner.run(item, split=case_split)
            except MedSAM3Error as exc:
                if not skip_bad:
                    raise
                case = None if isinstance(item, BaseException) else getattr(item, "case_id", None)
                skipped.append({"index": index, "case": case, "error": str(exc)})
                bar.set_postfix(skipped=len(skipped))
                bar.update(1)
                continue
            units.add("mm" if item.spacing is not None else "px")
            records.append(record)
            worst.offer(record, item.image, gt_union, pred_union)
            bar.update(1)

    if not records:
        first = f": first error: {skipped[0]['error']}" if skipped else ""
        raise DatasetError(f"{name}: no case could be evaluated ({len(skipped)} skipped){first}")

    summary = summarise(
        records,
        presence_threshold=presence_threshold,
        dataset=name,
        split=split,
        model=model_name or _describe_model(segmenter),
        prompt_mode=prompt_mode,
        threshold=threshold,
        nsd_tolerance=nsd_tolerance,
        distance_unit=units.pop() if len(units) == 1 else "mixed",
        n_skipped=len(skipped),
        skipped=skipped,
        index_skipped=[str(item) for item in getattr(dataset, "skipped", None) or []],
        seconds_total=round(time.perf_counter() - started, 3),
    )
    files = {
        "csv": out_dir / CSV_NAME,
        "summary": out_dir / SUMMARY_NAME,
        "markdown": out_dir / MARKDOWN_NAME,
        "distribution": out_dir / DISTRIBUTION_NAME,
        "worst": out_dir / WORST_GRID_NAME,
    }
    with atomic_files() as group:  # all five files or none; the earlier report survives a failure
        write_case_csv(records, group.path(files["csv"]))
        plot_dice_distribution(records, group.path(files["distribution"]), title=f"Dice: {name}")
        render_worst_cases(worst.views, group.path(files["worst"]))
        write_json_atomic(group.path(files["summary"]), summary)
        write_text_atomic(group.path(files["markdown"]), markdown_report(summary))
    return EvaluationResult(records=records, summary=summary, out_dir=out_dir, files=files, skipped=skipped)


def evaluate_path(
    data: str | Path,
    model: str,
    *,
    out_dir: str | Path,
    adapter: str | Path | None = None,
    prompt_mode: PromptMode | str = "text",
    split: str | None = "test",
    layout: str = "auto",
    skip_bad: bool = False,
    device: str = "auto",
    threshold: float = 0.5,
    nsd_tolerance: float = 2.0,
    progress: bool = True,
    wrap: Callable[[Any], Any] | None = None,
) -> EvaluationResult:
    """What ``medsam3 evaluate DATA --model SPEC`` does: open the dataset, load the model, score it.

    ``wrap`` turns the loaded segmenter into another one (e.g. the agent around the predictor).
    """
    from medsam3.data.dataset import open_dataset
    from medsam3.evaluate.segmenters import load_segmenter

    if prompt_mode not in PROMPT_MODES:
        raise MedSAM3Error(f"prompt mode must be one of {', '.join(PROMPT_MODES)}, got '{prompt_mode}'")
    check_report_folder(out_dir, inputs=[data])
    dataset = open_dataset(data, layout=layout, skip_bad=skip_bad)
    segmenter = load_segmenter(model, adapter=adapter, device=device)
    label = f"{model} + adapter {Path(adapter).name}" if adapter else model
    if wrap is not None:
        segmenter = wrap(segmenter)
        label += f" ({type(segmenter).__name__})"
    return evaluate_dataset(
        dataset,
        segmenter,
        prompt_mode=prompt_mode,
        out_dir=out_dir,
        skip_bad=skip_bad,
        progress=progress,
        threshold=threshold,
        nsd_tolerance=nsd_tolerance,
        split=split,
        dataset_name=Path(data).resolve().name,
        model_name=label,
    )


# ---------------------------------------------------------------- 3D


@dataclass(frozen=True)
class VolumeScores:
    """Scores of one 3D prediction: the union masks and their connected components as instances."""

    semantic: SegmentationScores
    instances: InstanceScores


def evaluate_volume_predictions(
    pred_mask_vol: np.ndarray,
    gt_vol: np.ndarray,
    spacing: Spacing,
    *,
    nsd_tolerance: float = 2.0,
    pred_spacing: Spacing | None = None,
    case: str | None = None,
) -> VolumeScores:
    """Score a (Z, Y, X) binary prediction against its ground truth with the volume's voxel spacing (mm).

    ``spacing`` is (z, y, x) as the volume readers report it; ``pred_spacing``, if the prediction was
    saved on its own grid, must match it. Instances are 3D connected components of each mask.
    """
    pred, gt, spacing_t = check_pair(pred_mask_vol, gt_vol, spacing, pred_spacing=pred_spacing, case=case)
    if gt.ndim != 3:
        raise MedSAM3Error(f"case {case or '?'}: a volume must be 3D, got shape {gt.shape}")
    return VolumeScores(
        semantic=segmentation_scores(pred, gt, spacing_t, nsd_tolerance=nsd_tolerance, case=case),
        instances=match_instances(components(pred), components(gt), case=case),
    )


def evaluate_volume_labels(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: Spacing,
    labels: dict[str, int] | Sequence[tuple[str, int]],
    **kwargs: Any,
) -> dict[str, VolumeScores]:
    """Score label volumes (one integer per structure) structure by structure: ``{name: VolumeScores}``."""
    items = labels.items() if isinstance(labels, dict) else labels
    case = kwargs.pop("case", None)
    return {
        name: evaluate_volume_predictions(
            np.asarray(pred_labels) == value,
            np.asarray(gt_labels) == value,
            spacing,
            case=f"{case} {name}" if case else name,
            **kwargs,
        )
        for name, value in items
    }
