"""Volume benchmark: speed and memory against the number of slices, and 3D accuracy of slices vs track.

    python benchmarks/bench_volume.py --threads 1 --model nano-init --slices 16 64 256
    python benchmarks/bench_volume.py --threads 1 --model sam3-random --slices 2 --methods slices
    python benchmarks/bench_volume.py --threads 1 --model nano --accuracy --examples /tmp/examples
    python benchmarks/bench_volume.py --threads 1 --model nano --video 4

Speed: every (model, method, slices) runs in its own process, so peak resident memory is that
run's alone. The volume is a phantom abdominal CT (liver, kidneys, spleen, tumours) of the given
depth. "2D path" is ``segment_image`` called independently on every slice (what a user without
the volume code would do); the ratio is volume time over that. "features alive" is the most
vision-encoder outputs that existed at once during the run (the claim: 1 or 2, whatever the
length). Peak RSS grows only with the voxel arrays (label map plus one byte per voxel and prompt).

Accuracy: 3D Dice of both methods on phantom CT volumes (test split) and on the real pyradiomics
MR/CT volumes (``medsam3 data fetch-examples``), with the model's concept normalisation.
Video: object-id stability of ``segment_video`` on phantom colonoscopy clips.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import PeakRSS, machine, markdown_table  # noqa: E402

PROMPTS = ["liver", "kidney", "spleen", "liver tumor"]


def phantom_volume(path: Path, depth: int, size: int, seed: int = 0) -> Path:
    """A phantom CT of ``depth`` slices saved as .npz (array, spacing), generated once per depth."""
    from medsam3.data.phantoms.ct3d import make_ct3d

    if not path.exists():
        case = make_ct3d(np.random.default_rng(seed), size, depth=depth)
        np.savez(path, array=case.image.astype(np.float32), spacing=np.asarray(case.spacing))
    return path


def load_volume(path: Path):
    from medsam3.data.volume_io import Volume

    data = np.load(path)
    return Volume(
        array=data["array"],
        spacing=tuple(float(s) for s in data["spacing"]),
        origin=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        path=path,
        modality="CT",
    )


def run_one(args) -> dict:
    """One timed run, in this process; prints a JSON line for the parent."""
    import psutil

    from medsam3.data.volume_io import slice_rgb
    from medsam3.infer.predictor import Sam3Predictor
    from medsam3.infer.segment import segment_image
    from medsam3.infer.volume import segment_volume
    from medsam3.model import load_model

    loaded = load_model(args.model, device=args.device)
    predictor = Sam3Predictor(loaded)
    volume = load_volume(Path(args.volume))
    prompts = PROMPTS[: args.prompts]
    depth = volume.shape[0]
    segment_image(slice_rgb(volume, depth // 2), prompts, predictor)  # warm-up: first-call overheads
    live, peak = [0], [0]
    encode = loaded.model.get_vision_features

    def counted(**kwargs):
        out = encode(**kwargs)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out.last_hidden_state, lambda: live.__setitem__(0, live[0] - 1))
        return out

    loaded.model.get_vision_features = counted
    baseline = psutil.Process().memory_info().rss
    predictor.encode_count = 0
    with PeakRSS() as memory:
        start = time.perf_counter()
        seg = segment_volume(volume, prompts, predictor, method=args.method, batch_slices=args.batch)
        seconds = time.perf_counter() - start
    start = time.perf_counter()
    if args.plain:
        for i in range(depth):
            segment_image(slice_rgb(volume, i), prompts, predictor)
    plain = time.perf_counter() - start if args.plain else float("nan")
    return {
        "seconds": seconds,
        "encodes": seg.encoded_slices,
        "peak_gib": memory.gib,
        "growth_mib": (memory.peak - baseline) / 2**20,
        "features_alive": peak[0],
        "plain_seconds": plain,
        "voxels_found": int(np.count_nonzero(seg.label_map)),
    }


def speed_table(args) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for depth in args.slices:
            path = phantom_volume(Path(scratch) / f"ct_{depth}.npz", depth, args.size)
            for model in args.model:
                for method in args.methods:
                    command = [
                        sys.executable, __file__, "--one", "--model", model, "--volume", str(path),
                        "--method", method, "--threads", str(args.threads), "--device", args.device,
                        "--prompts", str(args.prompts), "--batch", str(args.batch),
                    ] + (["--plain"] if depth <= args.plain_up_to else [])  # fmt: skip
                    done = subprocess.run(command, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise SystemExit(f"{model} {method} {depth}: failed\n{done.stderr[-2000:]}")
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    plain = r["plain_seconds"]
                    timed = plain == plain  # NaN when the 2D path was not timed
                    plain_text = f"{plain:.2f}" if timed else "-"
                    ratio = f"{r['seconds'] / plain:.2f}" if timed else "-"
                    rows.append([
                        model, method, depth, f"{r['seconds']:.2f}", f"{depth / r['seconds']:.3g}", r["encodes"],
                        r["features_alive"], f"{r['peak_gib']:.2f}", f"{r['growth_mib']:.0f}",
                        f"{depth * args.size**2 * (args.prompts + 2) / 2**20:.0f}",
                        plain_text, ratio,
                    ])  # fmt: skip
                    print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    headers = ["model", "method", "slices", "s/volume", "slices/s", "encodes", "features alive",
               "peak RSS GiB", "RSS growth MiB", "voxel arrays MiB", "2D path s", "ratio vs 2D"]  # fmt: skip
    return markdown_table(headers, rows)


# ----------------------------------------------------------------------------- accuracy


def _predictor(args):
    from medsam3.infer.predictor import Sam3Predictor
    from medsam3.model import load_model

    return Sam3Predictor(load_model(args.model[0], device=args.device, adapter=args.adapter))


def _cases(root: Path):
    """(dataset name, image path, label path, {concept: label value}) of every case of nnU-Net folders."""
    found = [root / "dataset.json"] if (root / "dataset.json").exists() else sorted(root.glob("*/dataset.json"))
    for dataset_json in found:
        info = json.loads(dataset_json.read_text())
        if info.get("tensorImageSize", "3D") != "3D" or info.get("channel_names", {}).get("0") == "R":
            continue
        labels = {name: int(v) for name, v in info["labels"].items() if int(v) != 0}
        ending = info.get("file_ending", ".nii.gz")
        for image in sorted((dataset_json.parent / "imagesTr").glob(f"*_0000{ending}")):
            label = dataset_json.parent / "labelsTr" / image.name.replace("_0000", "")
            if label.exists():
                yield dataset_json.parent.name, image, label, labels


def _gt_box(truth: np.ndarray) -> tuple[int, tuple[float, float, float, float]] | None:
    """The ground truth's largest slice (axis 0) and its xyxy box there: the paper's T+I prompt."""
    from medsam3.data.masks import mask_box

    areas = truth.reshape(truth.shape[0], -1).sum(axis=1)
    if not areas.any():
        return None
    index = int(np.argmax(areas))
    return index, mask_box(truth[index])


def _score_runs(args, predictor, dataset, image_path, label_path, labels) -> list[list[str]]:
    """Both methods, text only (all concepts at once) and, with --with-box, text + a ground-truth box."""
    from medsam3.data.volume_io import read_volume
    from medsam3.evaluate.runner import evaluate_volume_predictions
    from medsam3.infer.segment import normalize_prompts
    from medsam3.infer.types import Prompt
    from medsam3.infer.volume import segment_volume

    volume, truth = read_volume(image_path), read_volume(label_path).array
    prompts = [Prompt(name) for name in labels]
    used, _, _ = normalize_prompts(prompts, predictor.loaded.concepts)
    case = image_path.name.split("_0000")[0]
    runs = []  # (method label, method, prompts asked, prompts used, box slice, box)
    for method in args.methods:
        runs.append((method, method, prompts, used, None, None))
        if args.with_box:
            for asked, run in zip(prompts, used, strict=True):
                found = _gt_box(truth == labels[asked.text])
                if found is not None:
                    runs.append((f"{method} + GT box", method, [asked], [run], *found))
    rows = []
    for label, method, asked_list, used_list, box_slice, box in runs:
        start = time.perf_counter()
        seg = segment_volume(volume, used_list, predictor, method=method, box_slice=box_slice, box=box)
        seconds = time.perf_counter() - start
        for k, (asked, run) in enumerate(zip(asked_list, used_list, strict=True), start=1):
            scores = evaluate_volume_predictions(seg.label_map == k, truth == labels[asked.text], volume.spacing)
            rows.append([dataset, case, asked.text, run.text, label, f"{scores.semantic.dice:.3f}",
                         f"{scores.semantic.nsd:.3f}", f"{seconds:.1f}"])  # fmt: skip
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def accuracy_table(args) -> str:
    from medsam3.data.phantoms import write_phantom_dataset

    predictor = _predictor(args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        roots = []
        if args.phantoms:
            roots.append(write_phantom_dataset(Path(scratch) / "phantom", "ct3d", n=args.phantoms, seed=args.seed))
        if args.examples:
            from medsam3.data.examples import fetch_examples

            fetch_examples(args.examples)
            roots.append(Path(args.examples))
        for root in roots:
            for dataset, image_path, label_path, labels in _cases(root):
                rows += _score_runs(args, predictor, dataset, image_path, label_path, labels)
    table = markdown_table(["dataset", "case", "concept", "prompt used", "method", "Dice", "NSD", "s"], rows)
    means: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        kind = "phantom" if "phantom" in row[0].lower() else "real"
        means.setdefault((kind, row[2], row[4]), []).append(float(row[5]))
    summary = [[*k, f"{np.mean(v):.3f}", len(v)] for k, v in sorted(means.items())]
    return table + "\n\n" + markdown_table(["data", "concept", "method", "mean Dice", "n"], summary)


# ----------------------------------------------------------------------------- video ids


def video_table(args) -> str:
    """How well ids follow the true polyps: per object, frames where its main id covers it, id switches."""
    from PIL import Image

    from medsam3.data.phantoms import write_phantom_dataset
    from medsam3.infer.video import segment_video

    predictor = _predictor(args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = write_phantom_dataset(Path(scratch) / "clips", "video", n=args.video, seed=args.seed)
        info = json.loads((root / "dataset.json").read_text())["medsam3"]["cases"]
        for case, meta in info.items():
            out = Path(scratch) / "out" / case
            result = segment_video(root / meta["video"], ["polyp"], predictor, out, write_overlay=False)
            truth = [np.asarray(Image.open(p)) for p in sorted((root / meta["labels"]).glob("*.png"))]
            masks = [np.asarray(Image.open(out / "masks" / f"frame_{i:05d}.png")) for i in range(result.frames)]
            for object_id in meta["objects"]:
                sightings = []
                for gt, pred in zip(truth, masks, strict=True):
                    inside = pred[gt == int(object_id)]
                    ids, counts = np.unique(inside[inside > 0], return_counts=True)
                    covered = ids.size and counts.max() >= 0.5 * inside.size
                    sightings.append(int(ids[np.argmax(counts)]) if covered else 0)
                found = [s for s in sightings if s]
                main = max(set(found), key=found.count) if found else 0
                switches = sum(1 for a, b in zip(found, found[1:], strict=False) if a != b)
                rows.append([case, object_id, len(truth), len(found), found.count(main) if main else 0, switches,
                             len(result.tracks)])  # fmt: skip
    headers = ["clip", "object", "frames", "frames covered", "frames with main id", "id switches", "ids made"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model spec (repeatable); default nano-init")
    parser.add_argument("--slices", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--size", type=int, default=256, help="in-plane size of the phantom slices")
    parser.add_argument("--methods", nargs="+", default=["slices", "track"])
    parser.add_argument("--prompts", type=int, default=1, help="how many concept prompts (1-4)")
    parser.add_argument("--batch", type=int, default=1, help="slices per vision-encoder forward")
    parser.add_argument("--plain-up-to", type=int, default=10**9, help="time the 2D path up to this depth")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapter", type=Path, help="adapter folder on top of --model (--accuracy, --video)")
    parser.add_argument("--accuracy", action="store_true", help="3D Dice of both methods instead of speed")
    parser.add_argument("--phantoms", type=int, default=3, help="phantom CT volumes for --accuracy")
    parser.add_argument("--examples", type=Path, help="folder for the real example volumes (--accuracy)")
    parser.add_argument("--with-box", action="store_true", help="also score text + ground-truth box runs")
    parser.add_argument("--video", type=int, default=0, help="phantom clips for the id-stability table")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--volume", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or ["nano-init"]
    if args.one:
        args.model = args.model[0]
        print(json.dumps(run_one(args)))
        return
    print(f"Machine: {machine()}\n")
    if args.accuracy:
        print(accuracy_table(args))
    elif args.video:
        print(video_table(args))
    else:
        print(f"Phantom CT, {args.size}x{args.size} slices, {args.prompts} prompt(s), batch {args.batch}\n")
        print(speed_table(args))


if __name__ == "__main__":
    main()
