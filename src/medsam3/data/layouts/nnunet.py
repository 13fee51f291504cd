"""nnU-Net v2 and Medical Segmentation Decathlon layout.

    DATASET/
      dataset.json        labels: {"background": 0, "liver": 1, ...}   (nnU-Net v2)
                          or      {"0": "background", "1": "liver"}    (MSD)
      imagesTr/  CASE_0000.nii.gz (v2: channel suffix)  or  CASE.nii.gz (MSD)
      labelsTr/  CASE.nii.gz
      imagesTs/, labelsTs/   optional; a labelled test set stays the test split
      instancesTr/, instancesTs/  optional (medsam3 extension): instance-id maps, same names as
                          the labels, so touching objects of one concept stay separate instances

nnU-Net v2 region labels (``"whole tumor": [1, 2, 3]``) become one concept over those values; a
label named "ignore" is neither a concept nor an error. Label names become concept phrases through
the vocabulary (MSD Liver's "cancer" -> "liver tumor"), unless ``concept_map`` says otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, child_dir, search_down
from medsam3.data.layouts.labelmaps import index_label_pair
from medsam3.data.layouts.readers import IMAGE_2D_SUFFIXES, files_with
from medsam3.data.layouts.refs import SampleRef
from medsam3.data.vocabulary import concept_for_label
from medsam3.data.volume_io import VOLUME_SUFFIXES
from medsam3.errors import DatasetError, InputFileError
from medsam3.utils.files import file_suffix, strip_suffix

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SUFFIXES = tuple(VOLUME_SUFFIXES) + IMAGE_2D_SUFFIXES


def _is_nnunet(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() and child_dir(folder, "imagesTr") is not None


def read_dataset_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputFileError(path, f"not valid JSON ({' '.join(str(error).split())[:120]})") from None
    if not isinstance(data, dict):
        raise InputFileError(path, "must hold a JSON object")
    return data


def parse_labels(data: dict, path: Path) -> tuple[dict[str, tuple[int, ...]], set[int]]:
    """dataset.json ``labels`` (either form) -> ({label name: values}, every named value)."""
    labels = data.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputFileError(path, 'has no \'labels\' mapping (e.g. {"background": 0, "liver": 1})')
    named: dict[str, tuple[int, ...]] = {}
    try:
        if all(re.fullmatch(r"\d+", str(k).strip()) for k in labels):  # MSD: value -> name
            for value, name in labels.items():
                named.setdefault(str(name), ())
                named[str(name)] += (int(value),)
        else:  # nnU-Net v2: name -> value or region list
            for name, value in labels.items():
                values = value if isinstance(value, (list, tuple)) else [value]
                named[str(name)] = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise InputFileError(path, "'labels' values must be integers (or lists of integers)") from None
    known = {v for values in named.values() for v in values}
    known.add(0)
    return named, known


class NnUNetLayout(Layout):
    name = "nnunet"
    summary = "nnU-Net v2 / MSD: dataset.json, imagesTr/ labelsTr/ (imagesTs/ labelsTs/), 2D or 3D files"

    def find_root(self, path: Path) -> Path | None:
        return search_down(path, _is_nnunet, depth=1)

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        json_path = root / "dataset.json"
        data = read_dataset_json(json_path)
        named, known = parse_labels(data, json_path)
        dataset_name = str(data.get("name") or root.name)
        concepts: dict[str, tuple[int, ...]] = {}
        for label_name, values in named.items():
            if label_name.strip().lower() in ("background", "ignore") or values == (0,):
                continue
            renamed = options.rename(label_name)
            phrase = renamed if renamed != label_name else concept_for_label(label_name, dataset_name)
            concepts[phrase] = tuple(sorted(set(concepts.get(phrase, ()) + values)))
        if not concepts:
            raise InputFileError(json_path, "names no label other than background")
        ending = data.get("file_ending")
        modality = None
        channels = data.get("channel_names") or data.get("modality") or {}
        if isinstance(channels, dict):
            modality = channels.get(str(options.channel)) or channels.get(options.channel)
        meta = {"layout": self.name, "modality": modality}
        refs: list[SampleRef] = []
        for images_name, labels_name, instances_name, split in (
            ("imagesTr", "labelsTr", "instancesTr", None),
            ("imagesTs", "labelsTs", "instancesTs", "test"),
        ):
            images = child_dir(root, images_name)
            labels = child_dir(root, labels_name)
            if images is None and labels is None:
                continue
            refs += self._index_folder(
                root, images, labels, child_dir(root, instances_name), split, ending, concepts, known,
                options, report, meta,
            )  # fmt: skip
        return refs

    def _index_folder(
        self,
        root: Path,
        images: Path | None,
        labels: Path | None,
        instances: Path | None,
        split: str | None,
        ending: str | None,
        concepts: dict[str, tuple[int, ...]],
        known: set[int],
        options: IndexOptions,
        report: IndexReport,
        meta: dict,
    ) -> list[SampleRef]:
        suffixes = (ending.lower(),) if isinstance(ending, str) and ending else _SUFFIXES
        image_files = files_with(images, suffixes) if images else []
        by_stem = {strip_suffix(p): p for p in image_files}
        by_case: dict[str, dict[int, Path]] = {}
        for stem, path in by_stem.items():
            match = _CHANNEL.match(stem)
            if match:
                by_case.setdefault(match["case"], {})[int(match["channel"])] = path
        label_files = files_with(labels, suffixes) if labels else []
        labelled = {strip_suffix(p): p for p in label_files}
        refs: list[SampleRef] = []
        for case, label in labelled.items():
            with report.guard(label):
                # nnU-Net v2 names images CASE_0000; MSD names them like the label.
                image = by_case.get(case, {}).get(options.channel) or by_stem.get(case)
                if image is None:
                    where = images or root / ("imagesTs" if split else "imagesTr")
                    raise DatasetError(
                        f"{label}: label without its image "
                        f"(no {case}_{options.channel:04d}{file_suffix(label)} "
                        f"in {where})"
                    )
                instance = None
                if instances is not None:
                    candidate = instances / label.name
                    instance = candidate if candidate.is_file() else None
                refs += index_label_pair(
                    case, image, label, concepts, options, split=split, known_values=known,
                    named_in=str(root / "dataset.json"), instance_path=instance, meta=meta,
                )  # fmt: skip
        unlabelled = [
            path
            for stem, path in by_stem.items()
            if stem not in labelled and not ((m := _CHANNEL.match(stem)) and m["case"] in labelled)
        ]  # fmt: skip
        if unlabelled and split is None:
            for path in unlabelled:
                with report.guard(path):
                    raise DatasetError(f"{path}: image without its label in {labels or root / 'labelsTr'}")
        elif unlabelled:
            report.note(f"{len(unlabelled)} test image file(s) without labels were left out ({images})")
        return refs
