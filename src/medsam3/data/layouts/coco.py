"""COCO instance-segmentation JSON, the format MedSAM3's released training code reads.

    DATASET/
      annotations/instances_train.json    (or train.json, train/_annotations.coco.json, ...)
      images/ or train/ ...                image files named by ``file_name``

Each category name is a concept phrase. Segmentations may be polygons (lists of x, y in pixel-edge
coordinates) or RLE (uncompressed counts or the compressed string; decoded by pycocotools).
An image without annotations of a category is a negative sample for it. The JSON's name or folder
decides the split when it says train/val/test.
"""

from __future__ import annotations

import json
from pathlib import Path

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout
from medsam3.data.layouts.readers import image_size_2d
from medsam3.data.layouts.refs import ImageSource, SampleRef, ShapesTarget
from medsam3.data.layouts.shapes import Polygons, RunLength, flat_to_ring
from medsam3.data.vocabulary import concept_for_label
from medsam3.errors import DatasetError, InputFileError

_EXCLUDE = {"dataset.json", "package.json"}


def _json_candidates(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += sorted(
            p
            for p in folder.glob("*.json")
            if p.is_file() and p.name.lower() not in _EXCLUDE and not p.name.startswith(".")
        )
    return found


def _looks_coco(path: Path) -> bool:
    try:
        with path.open("rb") as stream:
            head = stream.read(1 << 20)
    except OSError:
        return False
    return (
        head.lstrip().startswith(b"{")
        and b'"images"' in head
        and (b'"annotations"' in head or b'"categories"' in head)
    )


def _split_of(path: Path) -> str | None:
    text = f"{path.parent.name} {path.stem}".lower()
    if "test" in text:
        return "test"
    if "val" in text:
        return "val"
    return None


def _image_path(root: Path, json_path: Path, file_name: str) -> Path | None:
    base = json_path.stem
    for prefix in ("instances_", "annotations_"):
        base = base[len(prefix) :] if base.startswith(prefix) else base
    folders = [
        json_path.parent,
        json_path.parent.parent,
        root,
        root / "images",
        json_path.parent / "images",
        root / base,
    ]
    for folder in folders:
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


def _shape(segmentation: object, height: int, width: int) -> tuple:
    if isinstance(segmentation, list):
        rings = tuple(
            flat_to_ring(ring) for ring in segmentation if isinstance(ring, list) and len(ring) >= 6
        )
        if not rings:
            raise ValueError("polygon segmentation with no ring of 3 or more points")
        return (Polygons(rings, offset=0.5),)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size") or [height, width]
        counts = segmentation["counts"]
        return (
            RunLength(
                counts if isinstance(counts, str) else tuple(int(c) for c in counts),
                int(size[0]),
                int(size[1]),
            ),
        )
    raise ValueError("segmentation is neither polygons nor RLE (box-only annotations cannot give masks)")


class CocoLayout(Layout):
    name = "coco"
    summary = "COCO JSON (images/annotations/categories; polygons or RLE), category name = concept phrase"

    def find_root(self, path: Path) -> Path | None:
        if not path.is_dir():
            return None
        return path if any(_looks_coco(p) for p in _json_candidates(path)) else None

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        refs: list[SampleRef] = []
        for json_path in [p for p in _json_candidates(root) if _looks_coco(p)]:
            with report.guard(json_path):
                refs += self._index_file(root, json_path, options, report)
        return refs

    def _index_file(
        self, root: Path, json_path: Path, options: IndexOptions, report: IndexReport
    ) -> list[SampleRef]:
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
            images = {int(im["id"]): im for im in data["images"]}
            categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
            annotations = list(data.get("annotations", []))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise InputFileError(
                json_path, f"not a valid COCO JSON ({type(error).__name__}: {error})"
            ) from None
        if not categories:
            raise InputFileError(json_path, "has no categories (each category name is a concept phrase)")
        concept_of = {
            cid: options.rename(name) if options.rename(name) != name else concept_for_label(name)
            for cid, name in categories.items()
        }
        by_image: dict[int, dict[int, list[dict]]] = {}
        for ann in annotations:
            try:
                image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
            except (KeyError, TypeError, ValueError):
                raise InputFileError(
                    json_path, f"annotation {ann.get('id', '?')} lacks image_id/category_id"
                ) from None
            if image_id not in images:
                raise InputFileError(
                    json_path, f"annotation {ann.get('id', '?')} refers to unknown image id {image_id}"
                )
            if category_id not in categories:
                raise InputFileError(
                    json_path,
                    f"annotation {ann.get('id', '?')} has category {category_id}, "
                    "which 'categories' does not name",
                )
            by_image.setdefault(image_id, {}).setdefault(category_id, []).append(ann)
        split = _split_of(json_path)
        refs: list[SampleRef] = []
        for image_id, info in images.items():
            file_name = str(info.get("file_name", ""))
            image = _image_path(root, json_path, file_name)
            where = image or json_path
            with report.guard(where):
                if image is None:
                    raise DatasetError(
                        f"{json_path}: image '{file_name}' (id {image_id}) not found "
                        "next to the JSON or in images/"
                    )
                height, width = image_size_2d(image)
                if (int(info.get("height", height)), int(info.get("width", width))) != (height, width):
                    raise InputFileError(
                        image,
                        f"is {width}x{height} but {json_path.name} says "
                        f"{info.get('width')}x{info.get('height')}",
                    )
                case = str(Path(file_name).with_suffix(""))
                anns = by_image.get(image_id, {})
                merged: dict[str, list] = {}
                for category_id, phrase in concept_of.items():
                    shapes = merged.setdefault(phrase, [])
                    for ann in anns.get(category_id, []):
                        try:
                            shapes.extend(_shape(ann.get("segmentation"), height, width))
                        except ValueError as error:
                            raise InputFileError(
                                json_path, f"annotation {ann.get('id', '?')}: {error}"
                            ) from None
                for phrase, shapes in merged.items():
                    if not shapes and not options.negatives_2d:
                        continue
                    refs.append(
                        SampleRef(
                            case,
                            phrase,
                            ImageSource(image),
                            ShapesTarget(tuple(shapes), height, width, json_path),
                            positive=bool(shapes),
                            split=split,
                            meta={"layout": self.name, "image_id": image_id},
                        )
                    )
        return refs
