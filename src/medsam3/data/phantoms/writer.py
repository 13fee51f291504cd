"""Write phantoms to disk in the nnU-Net v2 layout (images) or a simple clip layout (videos).

nnU-Net v2 layout (every kind but ``video``)::

    DIR/dataset.json                  channel_names, labels (name -> value), numTraining, file_ending
    DIR/imagesTr/<case>_0000<ending>  one file per case (RGB kinds: one RGB PNG, channels R, G, B)
    DIR/labelsTr/<case><ending>       label map: one value per concept, instances kept apart by
                                      at least one pixel so connected components recover them
    DIR/imagesTs/, DIR/labelsTs/      the held-out share (the last cases)

Video layout (``video``)::

    DIR/dataset.json                  concepts, fps, per case: split, frames, objects (id -> concept)
    DIR/videos/<case>.mp4             H.264 clip, RGB
    DIR/labels/<case>/frame_0000.png  8-bit object-id map per frame (0 background, 1, 2, ...: the same
                                      id is the same object in every frame)
    DIR/README.md                     this layout, in words

``dataset.json`` also carries a ``medsam3`` section: the generator settings and, per case, its
split, spacing, instance counts per concept and generator notes. The folder is written to a
temporary sibling and moved into place at the end: a reader never sees half a dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import SimpleITK as sitk
import tifffile
from PIL import Image

from medsam3.data.masks import label_components
from medsam3.data.phantoms.common import PhantomCase, PhantomKind
from medsam3.data.phantoms.registry import KINDS, check_settings, generate, get_kind
from medsam3.errors import DatasetError
from medsam3.utils.files import atomic_dir, write_json_atomic, write_text_atomic
from medsam3.utils.outputs import check_output_folder

GENERATOR_VERSION = 1


def write_phantoms(
    out_dir: str | Path,
    kind: str,
    n: int = 20,
    seed: int = 0,
    size: int | None = None,
    test_fraction: float = 0.2,
) -> list[Path]:
    """Write one kind into ``out_dir``, or with ``kind="all"`` every kind into ``out_dir/<kind>``.

    Every folder is checked before the first case is generated, so a bad one costs nothing.
    """
    names = list(KINDS) if kind == "all" else [kind]
    folders = [Path(out_dir) / name for name in names] if kind == "all" else [Path(out_dir)]
    if kind == "all":
        check_output_folder(out_dir)
    for name, folder in zip(names, folders, strict=True):
        check_settings(get_kind(name), n, seed, size)
        check_output_folder(folder, replaces=True)
        _refuse_foreign_folder(folder)
    return [
        write_phantom_dataset(folder, name, n, seed, size, test_fraction)
        for name, folder in zip(names, folders, strict=True)
    ]


def write_phantom_dataset(
    out_dir: str | Path,
    kind: str,
    n: int = 20,
    seed: int = 0,
    size: int | None = None,
    test_fraction: float = 0.2,
) -> Path:
    """Generate ``n`` cases of ``kind`` and write them as one dataset folder; returns the folder."""
    out_dir = Path(out_dir)
    spec = get_kind(kind)
    size = check_settings(spec, n, seed, size)
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test fraction must be in [0, 1), got {test_fraction}")
    check_output_folder(out_dir, replaces=True)
    _refuse_foreign_folder(out_dir)
    cases = generate(kind, n, seed, size)
    n_test = int(round(n * test_fraction)) if n > 1 else 0
    splits = ["train"] * (n - n_test) + ["test"] * n_test
    settings = {
        "phantom": spec.name,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n": int(n),
        "size": size,
        "test_fraction": test_fraction,
        "modality": spec.modality,
    }
    with atomic_dir(out_dir) as tmp:
        if spec.layout == "video":
            _write_video_dataset(tmp, spec, cases, splits, settings)
        else:
            _write_nnunet_dataset(tmp, spec, cases, splits, settings)
    return out_dir


def _refuse_foreign_folder(out_dir: Path) -> None:
    """Replacing a folder is only safe when it is empty or an earlier phantom dataset."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DatasetError(f"{out_dir}: exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    try:
        meta = json.loads((out_dir / "dataset.json").read_text(encoding="utf-8"))
        if isinstance(meta.get("medsam3"), dict) and "phantom" in meta["medsam3"]:
            return
    except (OSError, ValueError):
        pass
    raise DatasetError(
        f"{out_dir}: folder is not empty and is not a medsam3 phantom dataset; refusing to replace it"
    )


def instance_counts(label: np.ndarray, concepts: dict[str, int]) -> dict[str, int]:
    """Connected components per concept (full connectivity), as a dataset reader will find them."""
    counts = {}
    for name, value in concepts.items():
        _, count = label_components(label == value)
        counts[name] = int(count)
    return counts


def _write_nnunet_dataset(
    root: Path, spec: PhantomKind, cases: list[PhantomCase], splits: list[str], settings: dict[str, Any]
) -> None:
    ending = spec.file_ending
    records = {}
    for case, split in zip(cases, splits, strict=True):
        suffix = "Tr" if split == "train" else "Ts"
        _write_array(
            root / f"images{suffix}" / f"{case.case_id}_0000{ending}", case.image, case.spacing, case.meta
        )
        _write_array(
            root / f"labels{suffix}" / f"{case.case_id}{ending}", case.label, case.spacing, case.meta
        )
        records[case.case_id] = {
            "split": split,
            "shape": list(case.label.shape),
            "spacing": [round(float(v), 4) for v in case.spacing] if case.spacing else None,
            "instances": instance_counts(case.label, spec.concepts),
            **case.meta,
        }
    dataset = {
        "name": f"Phantom_{spec.name}",
        "description": spec.description,
        "reference": "Synthetic images generated by medsam3.data.phantoms; no patient data.",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D" if ending == ".nii.gz" else "2D",
        "channel_names": spec.channel_names,
        "labels": {"background": 0, **spec.concepts},
        "numTraining": splits.count("train"),
        "numTest": splits.count("test"),
        "file_ending": ending,
        "medsam3": {**settings, "cases": records},
    }
    write_json_atomic(root / "dataset.json", dataset)


def _write_array(
    path: Path, array: np.ndarray, spacing: tuple[float, ...] | None, meta: dict[str, Any]
) -> None:
    """One image or label file in the format its ending names, with spacing where the format has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".nii.gz"):
        image = sitk.GetImageFromArray(array)
        if spacing:
            image.SetSpacing([float(v) for v in reversed(spacing)])  # ITK orders x, y, z
        sitk.WriteImage(image, str(path), useCompression=True)
    elif name.endswith(".tif"):
        pixel_um = meta.get("pixel_size_um")
        extra = (
            {"resolution": (1.0 / pixel_um, 1.0 / pixel_um), "resolutionunit": "MICROMETER"}
            if pixel_um
            else {}
        )
        tifffile.imwrite(path, array, photometric="minisblack", **extra)
    elif name.endswith(".png"):
        Image.fromarray(array).save(path)
    else:  # a kind declared a format this writer does not know: a bug, not a user error
        raise ValueError(f"no writer for {path.name}")


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames as H.264 (MPEG-4 Part 2 where libx264 is missing)."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16"} if codec == "libx264" else {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


VIDEO_README = """# {name}

Synthetic colonoscopy clips from medsam3.data.phantoms (no patient data). Layout:

- `videos/<case>.mp4`: the clip, RGB, {fps} frames per second, H.264.
- `labels/<case>/frame_XXXX.png`: one 8-bit label map per frame, numbered from 0000 like the
  decoded frames. Values are object ids: 0 is background, and id k is the same object in every
  frame (for tracking). `dataset.json` -> `medsam3.cases.<case>.objects` names each id's concept.
- `dataset.json`: concepts, fps, and per case its split (train / test), frame count and objects.
"""


def _write_video_dataset(
    root: Path, spec: PhantomKind, cases: list[PhantomCase], splits: list[str], settings: dict[str, Any]
) -> None:
    records = {}
    for case, split in zip(cases, splits, strict=True):
        fps = int(case.meta.get("fps", 8))
        (root / "videos").mkdir(exist_ok=True)
        write_mp4(root / "videos" / f"{case.case_id}.mp4", case.image, fps)
        frame_dir = root / "labels" / case.case_id
        frame_dir.mkdir(parents=True)
        for index, frame_label in enumerate(case.label):
            Image.fromarray(frame_label).save(frame_dir / f"frame_{index:04d}.png")
        present = {
            object_id: int(sum(bool((frame_label == int(object_id)).any()) for frame_label in case.label))
            for object_id in case.meta["objects"]
        }
        records[case.case_id] = {
            "split": split,
            "video": f"videos/{case.case_id}.mp4",
            "labels": f"labels/{case.case_id}",
            "frames_with_object": present,
            **case.meta,
        }
    dataset = {
        "name": f"Phantom_{spec.name}",
        "description": spec.description,
        "reference": "Synthetic clips generated by medsam3.data.phantoms; no patient data.",
        "licence": "CC0-1.0",
        "layout": "medsam3-video",
        "concepts": sorted({c for case in cases for c in case.meta["objects"].values()} or spec.concepts),
        "file_ending": spec.file_ending,
        "numTraining": splits.count("train"),
        "numTest": splits.count("test"),
        "medsam3": {**settings, "cases": records},
    }
    write_json_atomic(root / "dataset.json", dataset)
    write_text_atomic(
        root / "README.md", VIDEO_README.format(name=dataset["name"], fps=int(cases[0].meta["fps"]))
    )
