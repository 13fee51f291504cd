"""RIM-ONE DL (Fumero et al. 2020, the unified release of RIM-ONE) in its download layout.

Assumed from the release's published folder names (we could not download it here):

    RIM-ONE_DL_images/
      partitioned_by_hospital/{training_set,test_set}/{glaucoma,normal}/<id>.png
      partitioned_randomly/{training_set,test_set}/{glaucoma,normal}/<id>.png
    RIM-ONE_DL_reference_segmentations/
      {glaucoma,normal}/<id>-<k>-Cup-T.png   <id>-<k>-Disc-T.png     (k = 1 in the release)

Both partitions hold the same images, so only one is read: by hospital (the release's
recommended, harder split) unless only the random one is present. Concepts "optic cup" and
"optic disc", one binary mask file each; the glaucoma/normal class goes to ``meta["class"]``.
"""

from __future__ import annotations

import re
from pathlib import Path

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout, child_dir, search_down
from medsam3.data.layouts.labelmaps import index_label_pair
from medsam3.data.layouts.readers import files_with
from medsam3.data.layouts.refs import SampleRef
from medsam3.errors import DatasetError

CONCEPTS = {"Cup": "optic cup", "Disc": "optic disc"}
_MASK = re.compile(r"^(?P<id>.+)-(?P<k>\d+)-(?P<part>Cup|Disc)-T$", re.IGNORECASE)
_PARTITIONS = ("partitioned_by_hospital", "partitioned_randomly")
_SPLITS = {"training_set": None, "test_set": "test"}
_CLASSES = ("glaucoma", "normal")


def _is_rimone(folder: Path) -> bool:
    return child_dir(folder, "RIM-ONE_DL_images") is not None and (
        child_dir(folder, "RIM-ONE_DL_reference_segmentations") is not None
    )


class RimOneLayout(Layout):
    name = "rimone"
    summary = (
        "RIM-ONE DL: RIM-ONE_DL_images/partitioned_*/ + "
        "RIM-ONE_DL_reference_segmentations/<id>-1-{Cup,Disc}-T.png"
    )

    def find_root(self, path: Path) -> Path | None:
        return search_down(path, _is_rimone, depth=2)

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        images_root = child_dir(root, "RIM-ONE_DL_images")
        seg_root = child_dir(root, "RIM-ONE_DL_reference_segmentations")
        assert images_root is not None and seg_root is not None
        partition = next((p for name in _PARTITIONS if (p := child_dir(images_root, name)) is not None), None)
        if partition is None:
            raise DatasetError(f"{images_root}: no {' or '.join(_PARTITIONS)} folder")
        report.note(f"RIM-ONE DL split: {partition.name}")
        masks: dict[str, dict[str, tuple[int, Path]]] = {}
        for cls in _CLASSES:
            folder = child_dir(seg_root, cls)
            for path in files_with(folder, (".png",)) if folder else []:
                match = _MASK.match(path.stem)
                if not match:
                    continue
                part = match["part"].capitalize()
                previous = masks.setdefault(match["id"], {}).get(part)
                if previous is None or int(match["k"]) < previous[0]:
                    masks[match["id"]][part] = (int(match["k"]), path)
        refs: list[SampleRef] = []
        seen: set[str] = set()
        for split_dir, split in _SPLITS.items():
            for cls in _CLASSES:
                folder = child_dir(partition, split_dir)
                folder = child_dir(folder, cls) if folder else None
                for image in files_with(folder, (".png", ".jpg")) if folder else []:
                    case = image.stem
                    seen.add(case)
                    with report.guard(image):
                        found = masks.get(case, {})
                        missing = [p for p in CONCEPTS if p not in found]
                        if missing:
                            raise DatasetError(
                                f"{image}: image without its {' and '.join(missing)} mask in {seg_root / cls}"
                            )
                        for part, concept in CONCEPTS.items():
                            refs += index_label_pair(
                                case, image, found[part][1], {options.rename(concept): (1,)}, options,
                                split=split,
                                binary=True, meta={"layout": self.name, "class": cls, "modality": "fundus"},
                            )  # fmt: skip
        for case in sorted(set(masks) - seen):
            path = next(iter(masks[case].values()))[1]
            with report.guard(path):
                raise DatasetError(f"{path}: mask without its image in {partition}")
        return refs
