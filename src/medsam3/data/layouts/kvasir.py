"""Kvasir-SEG (Jha et al. 2020) in its download layout.

    Kvasir-SEG/
      images/  cju0qkwl35piu0993l0dewei2.jpg ...
      masks/   cju0qkwl35piu0993l0dewei2.jpg ...   (JPEG masks: thresholded at half range)
      kavsir_bboxes.json                           (the download's own box file; not needed)

Concept "polyp"; the sessile subset (a folder whose name contains "sessile") is "sessile polyp",
the phrase third-party MedSAM3 configurations use for it.
"""

from __future__ import annotations

from pathlib import Path

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, child_dir, search_down
from medsam3.data.layouts.labelmaps import index_label_pair
from medsam3.data.layouts.readers import IMAGE_2D_SUFFIXES, files_with
from medsam3.data.layouts.refs import SampleRef
from medsam3.errors import DatasetError
from medsam3.utils.files import strip_suffix

CONCEPT = "polyp"
SESSILE_CONCEPT = "sessile polyp"


def _is_kvasir(folder: Path) -> bool:
    images, masks = child_dir(folder, "images"), child_dir(folder, "masks")
    if images is None or masks is None:
        return False
    named = "kvasir" in folder.name.lower() or (folder / "kavsir_bboxes.json").is_file()
    return named and any(p.suffix.lower() in (".jpg", ".jpeg") for p in images.iterdir())


class KvasirLayout(Layout):
    name = "kvasir"
    summary = "Kvasir-SEG: Kvasir-SEG/images/*.jpg + masks/*.jpg (kavsir_bboxes.json)"

    def find_root(self, path: Path) -> Path | None:
        return search_down(path, _is_kvasir, depth=2)

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        concept = options.rename(SESSILE_CONCEPT if "sessile" in root.name.lower() else CONCEPT)
        images_dir, masks_dir = child_dir(root, "images"), child_dir(root, "masks")
        assert images_dir is not None and masks_dir is not None
        images = {strip_suffix(p): p for p in files_with(images_dir, IMAGE_2D_SUFFIXES)}
        masks = {strip_suffix(p): p for p in files_with(masks_dir, IMAGE_2D_SUFFIXES)}
        refs: list[SampleRef] = []
        for stem in sorted(set(masks) - set(images)):
            with report.guard(masks[stem]):
                raise DatasetError(f"{masks[stem]}: mask without its image (no {stem}.jpg in {images_dir})")
        for stem, image in images.items():
            with report.guard(image):
                if stem not in masks:
                    raise DatasetError(f"{image}: image without its mask in {masks_dir}")
                refs += index_label_pair(
                    stem, image, masks[stem], {concept: (1,)}, options, binary=True,
                    meta={"layout": self.name, "modality": "endoscopy"},
                )  # fmt: skip
        return refs
