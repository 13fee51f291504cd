"""One box on one slice -> the whole 3D lesion: propagation vs the old ``slices`` and ``track`` methods.

    python benchmarks/bench_volume_box.py --threads 2
    python benchmarks/bench_volume_box.py --threads 2 --cases lung2 phantom0 --methods propagate
    python benchmarks/bench_volume_box.py --threads 2 --speed-only     # the 200 x 512 x 512 timing

Cases: the five real pyradiomics 3.0.1 volumes (brain1, brain2, breast1 MR; lung1, lung2 CT, lung
window), read from the archive that ``medsam3 data fetch-real`` / ``fetch-examples`` caches
(``$MEDSAM3_CACHE/examples``; downloaded with pip when absent), and 3D phantom CTs (the largest
object of one concept, thin 2.5 mm slices). For each: one box, the ground truth's box on the middle
slice of the lesion's extent, and a box jittered by 10% of its size (each edge moved by up to 10%
of the box's width/height, fixed seed; the old methods get the exact box only). Scores: 3D Dice,
NSD at 2 mm, slices predicted beyond each end of the lesion's extent (below/above), seconds per
volume and per encoded slice, encoder runs,
peak RSS of the process. Model: ``lite``; ``slices`` and ``track`` get the concept and the box.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRSS, machine, markdown_table  # noqa: E402

REAL = {  # case -> (concept, CT window or None)
    "lung1": ("lung tumor", "lung"),
    "lung2": ("lung tumor", "lung"),
    "brain1": ("brain tumor", None),
    "brain2": ("brain tumor", None),
    "breast1": ("breast lesion", None),
}
PHANTOMS = {  # case -> (seed, concept)
    "phantom-tumor": (5, "liver tumor"),
    "phantom-kidney": (1, "kidney"),
    "phantom-spleen": (3, "spleen"),
}


def real_case(name: str, scratch: Path):
    """(volume, truth, concept, window) of one pyradiomics case, image and label read the same way."""
    from medsam3.data.examples import PYRADIOMICS, default_cache_dir, pip_download, read_members
    from medsam3.data.volume_io import read_volume

    members = read_members(PYRADIOMICS, pip_download(PYRADIOMICS, default_cache_dir()))
    paths = {}
    for part in ("image", "label"):
        paths[part] = scratch / f"{name}_{part}.nrrd"
        paths[part].write_bytes(members[f"pyradiomics-3.0.1/data/{name}_{part}.nrrd"])
    volume, label = read_volume(paths["image"]), read_volume(paths["label"])
    concept, window = REAL[name]
    return volume, label.array != 0, concept, window


def phantom_case(name: str, depth: int = 60, size: int = 128):
    """A phantom CT; the truth is the largest 3D component of the concept (one object, as one box asks)."""
    from scipy import ndimage

    from medsam3.data.phantoms.abdomen import CONCEPTS
    from medsam3.data.phantoms.ct3d import make_ct3d
    from medsam3.data.volume_io import Volume

    seed, concept = PHANTOMS[name]
    case = make_ct3d(np.random.default_rng(seed), size, depth=depth)
    labels, count = ndimage.label(case.label == CONCEPTS[concept])
    sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    truth = labels == 1 + int(np.argmax(sizes))
    volume = Volume(
        array=case.image.astype(np.float32),
        spacing=tuple(float(s) for s in case.spacing),
        origin=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        path=Path(f"{name}.nii.gz"),
        modality="CT",
    )
    return volume, truth, concept, "abdomen"


def key_box(truth: np.ndarray, jitter: float, rng: np.random.Generator) -> tuple[int, tuple[float, ...]]:
    """The middle slice of the lesion's extent and its truth box, each edge moved by up to ``jitter``."""
    from medsam3.data.masks import mask_box

    along = np.flatnonzero(truth.any(axis=(1, 2)))
    index = int(along[(len(along) - 1) // 2])
    x0, y0, x1, y1 = mask_box(truth[index])
    w, h = x1 - x0, y1 - y0
    moves = rng.uniform(-jitter, jitter, 4) * np.array([w, h, w, h])
    height, width = truth.shape[1:]
    box = (
        float(np.clip(x0 + moves[0], 0, width - 1)),
        float(np.clip(y0 + moves[1], 0, height - 1)),
        float(np.clip(x1 + moves[2], 1, width)),
        float(np.clip(y1 + moves[3], 1, height)),
    )
    return index, box


def score(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    from medsam3.evaluate.metrics import dice, nsd

    along_t = np.flatnonzero(truth.any(axis=(1, 2)))
    along_p = np.flatnonzero(pred.any(axis=(1, 2)))
    below = int(np.sum(along_p < along_t[0])) if along_p.size else 0
    above = int(np.sum(along_p > along_t[-1])) if along_p.size else 0
    return {
        "dice": dice(pred, truth),
        "nsd": nsd(pred, truth, 2.0, spacing),
        "below": below,
        "above": above,
        "extent": f"{along_p[0]}-{along_p[-1]}" if along_p.size else "none",
        "truth_extent": f"{along_t[0]}-{along_t[-1]}",
    }


def run_case(predictor, name, volume, truth, concept, window, methods, jitters, rng) -> list[dict]:
    from medsam3.infer.volume import segment_volume

    rows = []
    lesion_slices = int(truth.any(axis=(1, 2)).sum())
    for jitter in jitters:
        index, box = key_box(truth, jitter, rng)
        for method in methods:
            if method != "propagate" and jitter != jitters[0]:
                continue  # the old methods are the reference, on the exact box only
            predictor.encode_count = 0
            with PeakRSS() as memory:
                start = time.perf_counter()
                seg = segment_volume(volume, [concept], predictor, method=method, box_slice=index, box=box,
                                     window=window)  # fmt: skip
                seconds = time.perf_counter() - start
            rows.append({
                "case": name, "method": method, "jitter": jitter, "slices": volume.shape[0],
                "lesion_slices": lesion_slices, "key": index, "seconds": seconds,
                "encodes": seg.encoded_slices, "peak_gib": memory.gib,
                **score(seg.label_map > 0, truth, volume.spacing),
            })  # fmt: skip
            r = rows[-1]
            print(f"{name} {method} jitter {jitter:.0%}: Dice {r['dice']:.3f} NSD {r['nsd']:.3f} extent "
                  f"{r['extent']} (truth {r['truth_extent']}) {seconds:.1f} s, {r['encodes']} encodes",
                  file=sys.stderr, flush=True)  # fmt: skip
    return rows


def oracle_bounds(predictor, name, volume, truth, window) -> dict:
    """What the box decoder can reach at best, per case: the ceilings of any box walk.

    ``every``: the truth box on every lesion slice (a perfect box everywhere, perfect stops).
    ``walk``: each slice prompted with its neighbour's truth box (towards the key slice), enlarged
    by the walk's 10% margin: a walk whose previous step and stopping were perfect.
    ``refined``: ``walk``'s mask re-drawn once from its own box (does a second look tighten the box?).
    """
    from medsam3.data.masks import mask_box
    from medsam3.data.volume_io import slice_rgb
    from medsam3.evaluate.metrics import dice
    from medsam3.infer.propagation import enlarge

    along = np.flatnonzero(truth.any(axis=(1, 2)))
    key = int(along[(len(along) - 1) // 2])
    height, width = truth.shape[1:]
    every, walk, refined = np.zeros_like(truth), np.zeros_like(truth), np.zeros_like(truth)
    for i in along:
        predictor.set_image(slice_rgb(volume, int(i), 0, window))
        neighbour = i if i == key else (i - 1 if i > key else i + 1)
        drawn = predictor.draw_boxes([mask_box(truth[i]), enlarge(mask_box(truth[neighbour]), 0.1, 2.0, height, width)])
        every[i], walk[i] = drawn.probs[0] > 0.5, drawn.probs[1] > 0.5
        refined[i] = predictor.draw_boxes([mask_box(walk[i])]).probs[0] > 0.5 if walk[i].any() else walk[i]
    row = {"case": name, "every": dice(every, truth), "walk": dice(walk, truth), "refined": dice(refined, truth)}
    print(f"{name} ceilings: truth box on every slice {row['every']:.3f}, neighbour's truth box {row['walk']:.3f}, "
          f"re-drawn from its own box {row['refined']:.3f}", file=sys.stderr, flush=True)  # fmt: skip
    return row


def speed_run(predictor, depth: int = 200, size: int = 512, lesion: int = 30) -> list:
    """A 200-slice 512 x 512 volume (noise background, an ellipsoid lesion over ``lesion`` slices), one box."""
    from medsam3.data.masks import mask_box
    from medsam3.data.volume_io import Volume
    from medsam3.infer.volume import segment_volume

    rng = np.random.default_rng(0)
    array = rng.normal(40.0, 15.0, (depth, size, size)).astype(np.float32)
    z, y, x = np.ogrid[:depth, :size, :size]
    truth = ((z - depth / 2) / (lesion / 2)) ** 2 + ((y - 250) / 60.0) ** 2 + ((x - 300) / 45.0) ** 2 <= 1.0
    array[truth] += 120.0
    volume = Volume(array=array, spacing=(1.0, 0.8, 0.8), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), path=Path("speed.nii.gz"),
                    modality="CT")  # fmt: skip
    index = depth // 2
    predictor.encode_count = 0
    with PeakRSS() as memory:
        start = time.perf_counter()
        seg = segment_volume(volume, ["lesion"], predictor, method="propagate", box_slice=index,
                             box=mask_box(truth[index]))  # fmt: skip
        seconds = time.perf_counter() - start
    s = score(seg.label_map > 0, truth, volume.spacing)
    return [f"{depth} x {size} x {size}", int(truth.any(axis=(1, 2)).sum()), seg.encoded_slices,
            f"{seconds:.1f}", f"{memory.gib:.2f}", f"{s['dice']:.3f}", s["extent"]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=[*REAL, *PHANTOMS])
    parser.add_argument("--methods", nargs="+", default=["propagate", "slices", "track"])
    parser.add_argument("--jitters", nargs="+", type=float, default=[0.0, 0.1])
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--oracle", action="store_true",
                        help="only the decoder's ceilings per case (truth box on every slice; neighbour's truth box)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from medsam3.infer.predictor import Sam3Predictor
    from medsam3.model import load_model

    predictor = Sam3Predictor(load_model("lite", device="cpu"))
    print(f"machine: {machine()}")
    if args.oracle:
        with tempfile.TemporaryDirectory() as scratch:
            rows = []
            for name in args.cases:
                volume, truth, _, window = real_case(name, Path(scratch)) if name in REAL else phantom_case(name)
                rows.append(oracle_bounds(predictor, name, volume, truth, window))
        real = [r for r in rows if r["case"] in REAL]
        keys = ("every", "walk", "refined")
        table = [[r["case"], *(f"{r[k]:.3f}" for k in keys)] for r in rows]
        if real:
            table.append(["mean (real)", *(f"{np.mean([r[k] for r in real]):.3f}" for k in keys)])
        print(markdown_table(["case", "3D Dice, truth box on every slice", "3D Dice, neighbour's truth box (+10%)",
                              "the same, re-drawn from its own box"], table))  # fmt: skip
        return
    rows: list[dict] = []
    if not args.speed_only:
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as scratch:
            for name in args.cases:
                case = real_case(name, Path(scratch)) if name in REAL else phantom_case(name)
                rows += run_case(predictor, name, *case, args.methods, args.jitters, rng)
        table = [[r["case"], r["method"], f"{r['jitter']:.0%}", r["slices"],
                  f"{r['truth_extent']} ({r['lesion_slices']})", r["key"], r["extent"], f"{r['dice']:.3f}",
                  f"{r['nsd']:.3f}", f"{r['below']}/{r['above']}",
                  f"{r['seconds']:.1f}", f"{r['seconds'] / max(r['encodes'], 1):.2f}", r["encodes"],
                  f"{r['peak_gib']:.2f}"] for r in rows]  # fmt: skip
        print(markdown_table(["case", "method", "box jitter", "slices", "lesion slices", "key slice", "predicted",
                              "3D Dice", "NSD 2 mm", "beyond below/above", "s/volume", "s/encoded slice",
                              "encodes", "peak RSS GiB"], table))  # fmt: skip
        print()
        summary = []
        for method in args.methods:
            for jitter in args.jitters:
                sel = [r for r in rows if r["method"] == method and r["jitter"] == jitter and r["case"] in REAL]
                if sel:
                    summary.append([method, f"{jitter:.0%}", f"{np.mean([r['dice'] for r in sel]):.3f}",
                                    f"{min(r['dice'] for r in sel):.3f}", f"{np.mean([r['nsd'] for r in sel]):.3f}",
                                    max(max(r["below"], r["above"]) for r in sel)])  # fmt: skip
        print(markdown_table(["method", "box jitter", "mean Dice (real)", "worst Dice (real)", "mean NSD (real)",
                              "most slices beyond an end"], summary))  # fmt: skip
        print()
    if not args.no_speed:
        print(markdown_table(["volume", "lesion slices", "encodes", "seconds", "peak RSS GiB", "Dice", "predicted"],
                             [speed_run(predictor)]))  # fmt: skip


if __name__ == "__main__":
    main()
