"""Predictor benchmark: encode once, answer K prompts, against K plain transformers forwards.

    python benchmarks/bench_predictor.py --model sam3-random --model nano --k 5

``sam3-random`` is SAM 3's full 840 M-parameter architecture with random weights: compute does not
depend on weight values, so its timings are SAM 3's. The plain path is what a user of transformers
writes: ``Sam3Processor(images, text) -> Sam3Model.forward -> post_process_instance_segmentation``,
once per prompt. Target: K prompts cost at most 1.15 x (one encode + K prompt passes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRSS, best_of, machine, markdown_table  # noqa: E402

from medsam3.infer.predictor import Sam3Predictor  # noqa: E402
from medsam3.infer.types import Prompt  # noqa: E402
from medsam3.model import load_model  # noqa: E402

PHRASES = ["liver", "breast tumor", "polyp", "cell nucleus", "skin lesion", "kidney", "lung", "spleen"]


def plain_forward(loaded, image: np.ndarray, phrase: str) -> None:
    inputs = loaded.processor(images=image, text=phrase, return_tensors="pt")
    with torch.inference_mode():
        outputs = loaded.model(**inputs)
    loaded.processor.post_process_instance_segmentation(outputs, threshold=0.5, target_sizes=[image.shape[:2]])


def bench(spec: str, k: int, size: int, repeats: int) -> dict:
    loaded = load_model(spec, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    prompts = [Prompt(p) for p in PHRASES[:k]]
    predictor = Sam3Predictor(loaded)

    def timed(fn) -> float:
        return best_of(fn, repeats)

    plain_forward(loaded, image, "warm up")  # first-call overheads out of the way
    predictor.set_image(image)
    predictor.predict(prompts)
    with PeakRSS() as memory:
        encode = timed(lambda: predictor.set_image(image))
        one_prompt = timed(lambda: predictor.predict(prompts[:1]))
        k_prompts = timed(
            lambda: (predictor._text_cache.clear(), predictor.set_image(image), predictor.predict(prompts))
        )
        plain = timed(lambda: [plain_forward(loaded, image, p.text) for p in prompts])
    budget = encode + k * one_prompt
    return {
        "model": spec,
        "params_m": sum(p.numel() for p in loaded.model.parameters()) / 1e6,
        "image_size": loaded.image_size,
        "encode": encode,
        "one_prompt": one_prompt,
        "k_prompts": k_prompts,
        "plain": plain,
        "k": k,
        "budget_ratio": k_prompts / budget,
        "rss": memory.gib,
    }


def table_row(r: dict) -> list[str]:
    return [
        r["model"],
        f"{r['params_m']:.1f} M",
        str(r["image_size"]),
        f"{r['encode']:.3f}",
        f"{r['one_prompt']:.3f}",
        f"{r['k_prompts']:.3f}",
        f"{r['plain']:.3f}",
        f"{r['plain'] / r['k_prompts']:.2f}x",
        f"{r['budget_ratio']:.2f}",
        f"{r['rss']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model specs (default: nano and sam3-random)")
    parser.add_argument("--k", type=int, default=5, help="prompts per image")
    parser.add_argument("--size", type=int, default=512, help="input image side in pixels")
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [table_row(bench(spec, args.k, args.size, args.repeats)) for spec in args.model or ["nano", "sam3-random"]]
    print(f"Machine: {machine()}\n")
    print(
        markdown_table(
            [
                "model",
                "params",
                "input px",
                "encode s",
                "+1 prompt s",
                f"predictor, {args.k} prompts s",
                f"plain, {args.k} forwards s",
                "speed-up",
                "cost / (encode + K prompts)",
                "peak RSS GiB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
