"""BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020) in its download layout.

    Dataset_BUSI_with_GT/
      benign/     benign (1).png   benign (1)_mask.png   benign (1)_mask_1.png ...
      malignant/  malignant (1).png  malignant (1)_mask.png
      normal/     normal (1).png   normal (1)_mask.png   (all-black masks: no tumour)

Concept "breast tumor" for benign and malignant alike (the class goes to ``meta["class"]``).
Each mask file is one tumour: an image with ``_mask`` and ``_mask_1`` has two instances.
Normal images are negatives.
"""

from __future__ import annotations

import re
from pathlib import Path

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, child_dir, search_down
from medsam3.data.layouts.readers import image_size_2d, read_mask_2d
from medsam3.data.layouts.refs import ImageSource, MaskFilesTarget, SampleRef
from medsam3.errors import DatasetError, InputFileError

CLASSES = ("benign", "malignant", "normal")
CONCEPT = "breast tumor"
_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)


def _is_busi(folder: Path) -> bool:
    found = [child_dir(folder, name) for name in CLASSES]
    return sum(f is not None for f in found) >= 2 and any(
        p.name.lower().endswith("_mask.png") for f in found if f is not None for p in f.iterdir()
    )


class BusiLayout(Layout):
    name = "busi"
    summary = "BUSI: benign/ malignant/ normal/ with 'NAME (k).png' and 'NAME (k)_mask[_j].png'"

    def find_root(self, path: Path) -> Path | None:
        return search_down(path, _is_busi, depth=2)

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        concept = options.rename(CONCEPT)
        refs: list[SampleRef] = []
        for cls in CLASSES:
            folder = child_dir(root, cls)
            if folder is None:
                continue
            images: dict[str, Path] = {}
            masks: dict[str, list[tuple[int, Path]]] = {}
            for path in sorted(folder.iterdir()):
                if not path.is_file() or path.suffix.lower() != ".png" or path.name.startswith("."):
                    continue
                match = _MASK.match(path.stem)
                if match:
                    masks.setdefault(match["stem"], []).append((int(match["k"] or 0), path))
                else:
                    images[path.stem] = path
            for stem in sorted(set(masks) - set(images)):
                with report.guard(masks[stem][0][1]):
                    raise DatasetError(
                        f"{masks[stem][0][1]}: mask without its image (no '{stem}.png' in {folder})"
                    )
            for stem, image in images.items():
                with report.guard(image):
                    files = tuple(p for _, p in sorted(masks.get(stem, [])))
                    if not files:
                        raise DatasetError(f"{image}: image without its mask (no '{stem}_mask.png')")
                    height, width = image_size_2d(image)
                    positive = False
                    for mask in files:
                        plane = read_mask_2d(mask, binary=True)
                        if plane.shape != (height, width):
                            raise InputFileError(
                                mask,
                                f"mask is {plane.shape[1]}x{plane.shape[0]} "
                                f"but {image.name} is {width}x{height}",
                            )
                        positive = positive or bool(plane.any())
                    target = MaskFilesTarget(files, height, width)
                    refs.append(
                        SampleRef(
                            f"{cls}/{stem}",
                            concept,
                            ImageSource(image),
                            target,
                            positive=positive,
                            meta={"layout": self.name, "class": cls, "modality": "US"},
                        )  # fmt: skip
                    )
        return refs
