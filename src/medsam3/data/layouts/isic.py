"""ISIC 2018 challenge, task 1 (lesion boundary segmentation), in its download layout.

    ISIC2018_Task1-2_Training_Input/       ISIC_0000000.jpg ...  (+ ATTRIBUTION.txt, LICENSE.txt)
    ISIC2018_Task1_Training_GroundTruth/   ISIC_0000000_segmentation.png ...
    ISIC2018_Task1-2_Validation_Input/     ISIC2018_Task1_Validation_GroundTruth/
    ISIC2018_Task1-2_Test_Input/           ISIC2018_Task1_Test_GroundTruth/

Concept "skin lesion". The official validation and test sets stay the val and test splits; an
input folder without its ground truth is left out with a note.
"""

from __future__ import annotations

import re
from pathlib import Path

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, search_down
from medsam3.data.layouts.labelmaps import index_label_pair
from medsam3.data.layouts.readers import files_with
from medsam3.data.layouts.refs import SampleRef
from medsam3.errors import DatasetError
from medsam3.utils.files import strip_suffix

CONCEPT = "skin lesion"
_INPUT = re.compile(r"^ISIC2018_Task1(?:-2)?_(?P<part>Training|Validation|Test)_Input$", re.IGNORECASE)
_TRUTH = re.compile(r"^ISIC2018_Task1_(?P<part>Training|Validation|Test)_GroundTruth$", re.IGNORECASE)
_SPLIT = {"training": None, "validation": "val", "test": "test"}


def _parts(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    inputs: dict[str, Path] = {}
    truths: dict[str, Path] = {}
    for child in folder.iterdir():
        if not child.is_dir():
            continue
        if match := _INPUT.match(child.name):
            inputs[match["part"].lower()] = child
        elif match := _TRUTH.match(child.name):
            truths[match["part"].lower()] = child
    return inputs, truths


def _is_isic(folder: Path) -> bool:
    inputs, truths = _parts(folder)
    return bool(set(inputs) & set(truths))


class IsicLayout(Layout):
    name = "isic2018"
    summary = "ISIC 2018 task 1: ISIC2018_Task1-2_*_Input/ + ISIC2018_Task1_*_GroundTruth/"

    def find_root(self, path: Path) -> Path | None:
        return search_down(path, _is_isic, depth=2)

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        concept = options.rename(CONCEPT)
        inputs, truths = _parts(root)
        refs: list[SampleRef] = []
        for part, input_dir in sorted(inputs.items()):
            truth_dir = truths.get(part)
            if truth_dir is None:
                report.note(f"{input_dir.name} has no ground-truth folder; left out")
                continue
            images = {p.stem: p for p in files_with(input_dir, (".jpg", ".jpeg", ".png"))}
            masks = {}
            for mask in files_with(truth_dir, (".png",)):
                stem = strip_suffix(mask)
                masks[stem[: -len("_segmentation")] if stem.endswith("_segmentation") else stem] = mask
            for stem in sorted(set(masks) - set(images)):
                with report.guard(masks[stem]):
                    raise DatasetError(
                        f"{masks[stem]}: mask without its image (no {stem}.jpg in {input_dir})"
                    )
            for stem, image in images.items():
                with report.guard(image):
                    if stem not in masks:
                        raise DatasetError(f"{image}: image without its mask (no {stem}_segmentation.png)")
                    refs += index_label_pair(
                        stem, image, masks[stem], {concept: (1,)}, options, split=_SPLIT[part], binary=True,
                        meta={"layout": self.name, "modality": "dermoscopy"},
                    )  # fmt: skip
        return refs
