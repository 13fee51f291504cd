"""The ``medsam3`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medsam3.errors import MedSAM3Error, PromptError

app = typer.Typer(
    name="medsam3",
    help="MedSAM-3: segment anything in medical images by naming it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _say(message: str) -> None:
    typer.echo(message, err=True)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' in pixels -> a box tuple (one-line error otherwise)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise PromptError(f"--box '{text}': expected four numbers X0,Y0,X1,Y1") from None
    if len(values) != 4:
        raise PromptError(f"--box '{text}': expected four numbers X0,Y0,X1,Y1, got {len(values)}")
    if not (values[2] > values[0] and values[3] > values[1]):
        raise PromptError(f"--box '{text}': needs X1 > X0 and Y1 > Y0")
    return values  # type: ignore[return-value]


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Preset (nano, tiny, sam3), model folder, sam3.pt or hub id.")]
AdapterOpt = Annotated[Path | None, typer.Option("--adapter", help="Adapter folder written by `medsam3 train`.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]


@app.command()
def segment(
    image: Annotated[Path, typer.Argument(help="PNG, JPEG, BMP, TIFF, DICOM, or a NIfTI/NRRD/MHA volume with --slice.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Concept phrase, e.g. 'breast tumor'. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    box: Annotated[list[str] | None, typer.Option("--box", help="Positive exemplar box X0,Y0,X1,Y1 (pixels); applies to every prompt.")] = None,
    negative_box: Annotated[list[str] | None, typer.Option("--negative-box", help="Negative exemplar box X0,Y0,X1,Y1.")] = None,
    model: ModelOpt = "nano",
    adapter: AdapterOpt = None,
    threshold: Annotated[float, typer.Option(help="Instance score threshold (sigmoid(logit) x presence).")] = 0.5,
    mask_threshold: Annotated[float, typer.Option(help="Mask probability threshold.")] = 0.5,
    nms: Annotated[float | None, typer.Option(help="Box IoU for non-maximum suppression (off by default, as SAM 3).")] = None,
    slice_index: Annotated[int | None, typer.Option("--slice", help="Slice index for a 3D volume.")] = None,
    axis: Annotated[int, typer.Option(help="Slicing axis of the volume's (Z, Y, X) array.")] = 0,
    window: Annotated[str | None, typer.Option(help="CT window: preset (abdomen, lung, bone, brain, ...) or CENTER,WIDTH.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Segment every instance of each named concept in one image."""
    from medsam3.data.image_io import read_image
    from medsam3.infer.predictor import Sam3Predictor
    from medsam3.infer.segment import build_prompts, segment_image, write_segmentation
    from medsam3.model import load_model

    prompts, notes = build_prompts(
        prompt, [parse_box(b) for b in box or []], [parse_box(b) for b in negative_box or []]
    )
    for note in notes:
        _say(f"warning: {note}")
    picture = read_image(image, slice_index=slice_index, axis=axis, window=window)
    loaded = load_model(model, device=device, adapter=adapter)
    predictor = Sam3Predictor(loaded, score_threshold=threshold, mask_threshold=mask_threshold, nms_iou=nms)
    result = segment_image(picture.rgb, prompts, predictor, source=str(image))
    result.notes.extend(notes)
    write_segmentation(result, out)
    for r in result.results:
        typer.echo(f"{r.prompt.text}: {len(r)} instance(s), presence {r.presence:.3f}")
    typer.echo(f"wrote {out}/result.json")


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Preset, model folder, sam3.pt or hub id.")] = "nano",
    policy: Annotated[str, typer.Option(help="Parameter policy: paper, lora-detector, lora-all, full.")] = "paper",
    adapter: AdapterOpt = None,
) -> None:
    """Parameters per SAM 3 component under a fine-tuning policy: total, trainable, frozen."""
    from rich.console import Console
    from rich.table import Table

    from medsam3.model import load_model
    from medsam3.model.components import count_parameters
    from medsam3.model.policy import apply_policy, check_policy

    check_policy(policy)
    loaded = load_model(model, device="cpu", adapter=adapter)
    if adapter is None:
        apply_policy(loaded.model, policy)
    table = Table(title=f"{model}: policy {loaded.adapter['policy'] if loaded.adapter else policy}")
    for column in ("component", "total", "trainable", "frozen"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for row in count_parameters(loaded.model):
        table.add_row(row.component, f"{row.total:,}", f"{row.trainable:,}", f"{row.frozen:,}")
    Console().print(table)
    typer.echo(f"image size {loaded.image_size}px, config fingerprint {loaded.fingerprint}")
    if loaded.concepts:
        typer.echo("concepts: " + ", ".join(loaded.concepts))


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2 (``--debug`` for a traceback).

    Usage errors are reported by click itself (exit code 2); everything else that is not a
    MedSAM3Error is a bug and keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        app(args=args, prog_name="medsam3")
    except MedSAM3Error as exc:
        if debug:
            raise
        _say(f"medsam3: error: {exc}")
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exits with main()'s code."""
    sys.exit(main())
