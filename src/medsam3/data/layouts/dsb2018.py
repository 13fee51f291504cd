"""Data Science Bowl 2018 (nuclei) in its download layout.

    stage1_train/<id>/images/<id>.png      (RGBA or grey PNG)
    stage1_train/<id>/masks/<mask id>.png  one binary PNG per nucleus
    stage1_test/<id>/images/<id>.png       test images; their masks only come as run lengths in
    stage1_solution.csv                    (ImageId, EncodedPixels, Height, Width[, Usage])

Concept "cell nucleus"; every mask file (or solution row) is one instance. The solution's run
lengths number pixels from 1, top to bottom then left to right, as "start length" pairs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, child_dir, search_down
from medsam3.data.layouts.readers import IMAGE_2D_SUFFIXES, files_with, image_size_2d
from medsam3.data.layouts.refs import ImageSource, MaskFilesTarget, SampleRef, ShapesTarget
from medsam3.errors import DatasetError, InputFileError

CONCEPT = "cell nucleus"


def decode_dsb_rle(encoded: str, height: int, width: int) -> np.ndarray:
    """DSB2018 'start length ...' (1-based, column-major) -> (H, W) bool mask."""
    numbers = [int(v) for v in encoded.split()]
    if len(numbers) % 2:
        raise ValueError("run-length string has an odd number of values")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(numbers[0::2], numbers[1::2], strict=True):
        if start < 1 or length < 0 or start - 1 + length > flat.size:
            raise ValueError(f"run {start} {length} lies outside the {height}x{width} image")
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape((height, width), order="F")


@dataclass(frozen=True)
class DsbRunLength:
    """One nucleus from stage1_solution.csv."""

    encoded: str
    height: int
    width: int

    def rasterize(self, height: int, width: int) -> np.ndarray:
        if (height, width) != (self.height, self.width):
            raise ValueError(f"run length is for {self.height}x{self.width}, the image is {height}x{width}")
        return decode_dsb_rle(self.encoded, height, width)


def _is_stage_dir(folder: Path) -> bool:
    """A stage folder: sub-folders shaped <id>/images/<id>.png."""
    for child in sorted(folder.iterdir())[:5] if folder.is_dir() else []:
        if child.is_dir() and (child / "images" / f"{child.name}.png").is_file():
            return True
    return False


def _is_dsb(folder: Path) -> bool:
    train = child_dir(folder, "stage1_train")
    return train is not None and _is_stage_dir(train)


def read_solution(path: Path) -> dict[str, list[DsbRunLength]]:
    """stage1_solution.csv -> image id -> nuclei."""
    out: dict[str, list[DsbRunLength]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                encoded = (row.get("EncodedPixels") or "").strip()
                out.setdefault(row["ImageId"], [])
                if encoded:
                    out[row["ImageId"]].append(DsbRunLength(encoded, int(row["Height"]), int(row["Width"])))
    except (KeyError, ValueError, TypeError, csv.Error) as error:
        raise InputFileError(
            path, f"not a DSB2018 solution CSV (ImageId, EncodedPixels, Height, Width): {error}"
        ) from None
    return out


class Dsb2018Layout(Layout):
    name = "dsb2018"
    summary = "DSB2018: stage1_train/<id>/images/<id>.png + masks/*.png (one per nucleus)"

    def find_root(self, path: Path) -> Path | None:
        found = search_down(path, _is_dsb, depth=2)
        if found is None and path.is_dir() and path.name.lower() == "stage1_train" and _is_stage_dir(path):
            return path.parent
        return found

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        concept = options.rename(CONCEPT)
        meta = {"layout": self.name, "modality": "microscopy"}
        refs: list[SampleRef] = []
        train = child_dir(root, "stage1_train")
        for case in sorted(p for p in train.iterdir() if p.is_dir()) if train else []:
            image = case / "images" / f"{case.name}.png"
            with report.guard(case):
                if not image.is_file():
                    raise DatasetError(f"{case}: no image {image.name} in {case / 'images'}")
                height, width = image_size_2d(image)
                masks = tuple(files_with(case / "masks", IMAGE_2D_SUFFIXES))
                if not masks:
                    raise DatasetError(f"{case / 'masks'}: no nucleus masks for image {image.name}")
                for mask in masks:
                    if image_size_2d(mask) != (height, width):
                        raise InputFileError(
                            mask, f"mask size differs from its image {image.name} ({width}x{height})"
                        )
                refs.append(
                    SampleRef(
                        case.name,
                        concept,
                        ImageSource(image),
                        MaskFilesTarget(masks, height, width),
                        positive=True,
                        meta=dict(meta),
                    )
                )
        test = child_dir(root, "stage1_test")
        solution = root / "stage1_solution.csv"
        if test is not None and not solution.is_file():
            report.note("stage1_test has no stage1_solution.csv; test images left out")
        elif test is not None:
            nuclei = read_solution(solution)
            for case in sorted(p for p in test.iterdir() if p.is_dir()):
                image = case / "images" / f"{case.name}.png"
                with report.guard(image):
                    if case.name not in nuclei:
                        raise DatasetError(f"{image}: image without its run lengths in {solution}")
                    height, width = image_size_2d(image)
                    shapes = tuple(nuclei[case.name])
                    for shape in shapes:
                        if (shape.height, shape.width) != (height, width):
                            raise InputFileError(
                                solution,
                                f"{case.name}: run lengths for {shape.width}x{shape.height}, "
                                f"image is {width}x{height}",
                            )
                    target = ShapesTarget(shapes, height, width, solution)  # type: ignore[arg-type]
                    refs.append(
                        SampleRef(
                            case.name,
                            concept,
                            ImageSource(image),
                            target,
                            positive=bool(shapes),
                            split="test",
                            meta=dict(meta),
                        )
                    )
        return refs
