"""COVID-QU-Ex (Tahir et al., chest X-rays with lung and infection masks) in its download layout.

    Lung Segmentation Data/Lung Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/
        images/*.png   lung masks/*.png
    Infection Segmentation Data/Infection Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/
        images/*.png   lung masks/*.png   infection masks/*.png

(The doubled folder name is how the archive unpacks; a single level works too.) Concepts "lung"
(from the lung set) and "lung infection" (from the infection set; Normal and Non-COVID images have
empty infection masks and so are negatives). When only the infection set is present its lung
masks give the "lung" samples. The authors' Train/Val/Test folders are kept as the splits; the
two sets keep separate case ids (``lung/...``, ``infection/...``) because the authors split them
separately.
"""

from __future__ import annotations

from pathlib import Path

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, child_dir, search_down
from medsam3.data.layouts.labelmaps import index_label_pair
from medsam3.data.layouts.readers import IMAGE_2D_SUFFIXES, files_with
from medsam3.data.layouts.refs import SampleRef
from medsam3.errors import DatasetError

_CLASSES = ("COVID-19", "Non-COVID", "Normal")
_SETS = {"lung": "Lung Segmentation Data", "infection": "Infection Segmentation Data"}


def _set_dir(root: Path, name: str) -> Path | None:
    """The folder holding Train/Val/Test for one subset, through the archive's doubled folder."""
    outer = child_dir(root, name)
    if outer is None:
        return None
    inner = child_dir(outer, name)
    return inner if inner is not None and child_dir(inner, "Train") is not None else outer


def _is_covidqu(folder: Path) -> bool:
    return any(_set_dir(folder, name) is not None for name in _SETS.values())


class CovidQuExLayout(Layout):
    name = "covidqu"
    summary = (
        "COVID-QU-Ex: 'Lung Segmentation Data'/ and/or 'Infection Segmentation Data'/ "
        "{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/"
    )

    def find_root(self, path: Path) -> Path | None:
        return search_down(path, _is_covidqu, depth=2)

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        lung_set = _set_dir(root, _SETS["lung"])
        infection_set = _set_dir(root, _SETS["infection"])
        jobs: list[tuple[str, Path, dict[str, str]]] = []
        if lung_set is not None:
            jobs.append(("lung", lung_set, {"lung masks": "lung"}))
        if infection_set is not None:
            wanted = {"lung masks": "lung"} if lung_set is None else {}
            wanted["infection masks"] = "lung infection"
            jobs.append(("infection", infection_set, wanted))
        refs: list[SampleRef] = []
        for subset, base, wanted in jobs:
            for split_name in ("Train", "Val", "Test"):
                split_dir = child_dir(base, split_name)
                for cls in _CLASSES if split_dir else ():
                    folder = child_dir(split_dir, cls)
                    if folder is None:
                        continue
                    images_dir = child_dir(folder, "images")
                    images = (
                        {p.name: p for p in files_with(images_dir, IMAGE_2D_SUFFIXES)} if images_dir else {}
                    )
                    for mask_folder, concept in wanted.items():
                        masks_dir = child_dir(folder, mask_folder)
                        if masks_dir is None:
                            if images:
                                report.note(
                                    f"{folder} has no '{mask_folder}' folder; its {concept} samples left out"
                                )
                            continue
                        masks = {p.name: p for p in files_with(masks_dir, IMAGE_2D_SUFFIXES)}
                        for name in sorted(set(masks) - set(images)):
                            with report.guard(masks[name]):
                                raise DatasetError(
                                    f"{masks[name]}: mask without its image in {images_dir or folder}"
                                )
                        for name, image in images.items():
                            with report.guard(image):
                                if name not in masks:
                                    raise DatasetError(f"{image}: image without its mask in {masks_dir}")
                                refs += index_label_pair(
                                    f"{subset}/{cls}/{image.stem}", image, masks[name],
                                    {options.rename(concept): (1,)}, options, split=split_name.lower(),
                                    binary=True, meta={"layout": self.name, "class": cls, "modality": "XR"},
                                )  # fmt: skip
        return refs
