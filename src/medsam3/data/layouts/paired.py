"""Paired folders: images and label masks with matching names, plus a value -> phrase mapping.

    DATASET/
      concepts.yaml     {1: "liver", 2: "kidney"}   (or .yml / .json; "phrase: value" also works)
      images/   case01.png  case02.nii.gz ...       (optionally images/train, images/val, images/test)
      masks/    case01.png  case02.nii.gz ...       (same stems, same sub-folders)
      instances/  optional instance-id maps, same names as the masks

Masks are integer label maps (2D or 3D). With a single concept on value 1, 0/255 PNG masks and
JPEG masks are read as binary (thresholded at half range), the way most such sets are saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, child_dir, search_down
from medsam3.data.layouts.labelmaps import index_label_pair
from medsam3.data.layouts.nnunet import _SUFFIXES
from medsam3.data.layouts.readers import files_with, read_mask_2d
from medsam3.data.layouts.refs import SampleRef
from medsam3.data.vocabulary import concept_for_label
from medsam3.errors import DatasetError, InputFileError
from medsam3.utils.files import file_suffix, strip_suffix

CONCEPT_FILES = ("concepts.yaml", "concepts.yml", "concepts.json")
# Sub-folders that name a split. A training folder stays unfixed, so a validation split can
# still be hashed out of it when the dataset has no val folder.
_SPLIT_DIRS: dict[str, str | None] = {
    "train": None, "training": None, "val": "val", "valid": "val", "validation": "val", "test": "test",
}  # fmt: skip


def _concept_file(folder: Path) -> Path | None:
    for name in CONCEPT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _is_paired(folder: Path) -> bool:
    return (
        _concept_file(folder) is not None
        and child_dir(folder, "images") is not None
        and child_dir(folder, "masks") is not None
    )


def read_concepts(path: Path) -> dict[int, str]:
    """The mapping file -> {label value: phrase}; either direction is accepted."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # yaml/json raise several types
        raise InputFileError(
            path, f"not valid {path.suffix[1:].upper()} ({' '.join(str(error).split())[:120]})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("concepts"), dict):
        data = data["concepts"]
    if not isinstance(data, dict) or not data:
        raise InputFileError(path, "must map label values to concept phrases, e.g. {1: liver, 2: kidney}")
    mapping: dict[int, str] = {}
    for key, value in data.items():
        number, phrase = (
            (key, value) if not isinstance(value, int) or isinstance(value, bool) else (value, key)
        )
        try:
            number = int(str(number).strip())
        except ValueError:
            raise InputFileError(path, f"'{key}: {value}' is not a label value and a phrase") from None
        if not isinstance(phrase, str) or not phrase.strip():
            raise InputFileError(path, f"label {number} needs a concept phrase, got {phrase!r}")
        if number <= 0:
            raise InputFileError(path, f"label value {number}: 0 is background, concepts need values >= 1")
        mapping[number] = phrase.strip()
    return mapping


class PairedLayout(Layout):
    name = "paired"
    summary = "images/ + masks/ with matching names and concepts.yaml|json mapping mask values to phrases"

    def find_root(self, path: Path) -> Path | None:
        return search_down(path, _is_paired, depth=1)

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        concept_file = _concept_file(root)
        assert concept_file is not None
        mapping = read_concepts(concept_file)
        concepts: dict[str, tuple[int, ...]] = {}
        for value, phrase in mapping.items():
            renamed = options.rename(phrase)
            name = renamed if renamed != phrase else concept_for_label(phrase)
            concepts[name] = tuple(sorted(set(concepts.get(name, ()) + (value,))))
        known = set(mapping) | {0}
        single_one = set(mapping) == {1}
        images_dir, masks_dir = child_dir(root, "images"), child_dir(root, "masks")
        instances_dir = child_dir(root, "instances")
        assert images_dir is not None and masks_dir is not None
        groups: list[tuple[Path, Path, Path | None, str | None]] = []
        for child in sorted(p for p in images_dir.iterdir() if p.is_dir()):
            if child.name.lower() in _SPLIT_DIRS:
                split = _SPLIT_DIRS[child.name.lower()]
                mask_child = child_dir(masks_dir, child.name)
                inst_child = child_dir(instances_dir, child.name) if instances_dir else None
                groups.append((child, mask_child or masks_dir / child.name, inst_child, split))
        groups.append((images_dir, masks_dir, instances_dir, None))
        meta = {"layout": self.name}
        refs: list[SampleRef] = []
        for images, masks, instances, split in groups:
            image_by_stem = {strip_suffix(p): p for p in files_with(images, _SUFFIXES)}
            mask_by_stem = {strip_suffix(p): p for p in files_with(masks, _SUFFIXES)}
            for stem, mask in mask_by_stem.items():
                with report.guard(mask):
                    image = image_by_stem.get(stem)
                    if image is None:
                        raise DatasetError(f"{mask}: mask without its image (no {stem}.* in {images})")
                    binary = (
                        single_one
                        and file_suffix(mask) in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
                        and (
                            file_suffix(mask) in (".jpg", ".jpeg")
                            or set(np.unique(read_mask_2d(mask)).tolist()) <= {0, 255}
                        )
                    )
                    instance = (instances / mask.name) if instances is not None else None
                    refs += index_label_pair(
                        stem, image, mask, concepts, options, split=split, binary=binary,
                        known_values=None if binary else known, named_in=str(concept_file),
                        instance_path=instance if instance is not None and instance.is_file() else None,
                        meta=meta,
                    )  # fmt: skip
            for stem in sorted(set(image_by_stem) - set(mask_by_stem)):
                with report.guard(image_by_stem[stem]):
                    raise DatasetError(f"{image_by_stem[stem]}: image without its mask in {masks}")
        return refs
