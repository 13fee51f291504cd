"""MoNuSeg (multi-organ nucleus segmentation, Kumar et al.) in its download layout.

    MoNuSeg 2018 Training Data/
      Tissue Images/TCGA-18-5592-01Z-00-DX1.tif
      Annotations/TCGA-18-5592-01Z-00-DX1.xml
    MoNuSegTestData/
      TCGA-2Z-A9J9-01A-01-TS1.tif   TCGA-2Z-A9J9-01A-01-TS1.xml   (image and XML side by side)

The XML is Aperio ImageScope's: Annotations/Annotation/Regions/Region/Vertices/Vertex X= Y=.
Each Region is one nucleus, filled with ``skimage.draw.polygon`` (vertices are pixel positions).
Concept "cell nucleus"; folders whose name contains "test" are the test split.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from medsam3.data.layouts.base import IndexOptions, IndexReport, Layout
from medsam3.data.layouts.readers import image_size_2d
from medsam3.data.layouts.refs import ImageSource, SampleRef, ShapesTarget
from medsam3.data.layouts.shapes import Polygons
from medsam3.errors import DatasetError, InputFileError

CONCEPT = "cell nucleus"
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
_IMAGE_DIRS = ("Tissue Images", "Tissue images", "images", "Images")


def _is_aperio(path: Path) -> bool:
    try:
        with path.open("rb") as stream:
            head = stream.read(512).lstrip()
    except OSError:
        return False
    return b"<Annotations" in head


def _xml_files(root: Path, depth: int = 3) -> list[Path]:
    found: list[Path] = []
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and child.suffix.lower() == ".xml":
            found.append(child)
        elif child.is_dir() and depth > 0:
            found += _xml_files(child, depth - 1)
    return found


def _image_for(xml: Path) -> Path | None:
    folders = [xml.parent] + [xml.parent.parent / name for name in _IMAGE_DIRS]
    for folder in folders:
        for suffix in _IMAGE_SUFFIXES:
            candidate = folder / f"{xml.stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def read_aperio_regions(path: Path) -> list[np.ndarray]:
    """Every Region's vertices as an (K, 2) array of (x, y) pixel positions."""
    try:
        tree = ElementTree.parse(path)
    except (ElementTree.ParseError, OSError) as error:
        raise InputFileError(path, f"not a readable XML annotation ({error})") from None
    root = tree.getroot()
    if root.tag != "Annotations":
        raise InputFileError(
            path, f"not an Aperio annotation file (root element <{root.tag}>, expected <Annotations>)"
        )
    rings = []
    for region in root.iter("Region"):
        points = []
        for vertex in region.iter("Vertex"):
            try:
                points.append((float(vertex.attrib["X"]), float(vertex.attrib["Y"])))
            except (KeyError, ValueError):
                raise InputFileError(
                    path, f"Region {region.attrib.get('Id', '?')} has a Vertex without numeric X/Y"
                ) from None
        if len(points) >= 3:
            rings.append(np.asarray(points, dtype=np.float64))
    return rings


class MoNuSegLayout(Layout):
    name = "monuseg"
    summary = (
        "MoNuSeg: TCGA-*.tif + Aperio XML (Annotations/Region/Vertices), "
        "side by side or Tissue Images/ + Annotations/"
    )

    def find_root(self, path: Path) -> Path | None:
        for xml in _xml_files(path, depth=2):
            if _is_aperio(xml) and _image_for(xml) is not None:
                return path
        return None

    def index(self, root: Path, options: IndexOptions, report: IndexReport) -> list[SampleRef]:
        concept = options.rename(CONCEPT)
        refs: list[SampleRef] = []
        for xml in _xml_files(root):
            if not _is_aperio(xml):
                continue
            with report.guard(xml):
                image = _image_for(xml)
                if image is None:
                    raise DatasetError(
                        f"{xml}: annotation without its image "
                        f"(no {xml.stem}.tif beside it or in Tissue Images/)"
                    )
                height, width = image_size_2d(image)
                rings = read_aperio_regions(xml)
                inside = [
                    r
                    for r in rings
                    if r[:, 0].max() >= 0
                    and r[:, 1].max() >= 0
                    and r[:, 0].min() < width
                    and r[:, 1].min() < height
                ]
                if len(inside) < len(rings):
                    raise InputFileError(
                        xml,
                        f"{len(rings) - len(inside)} region(s) lie outside "
                        f"the {width}x{height} image {image.name}",
                    )
                relative = xml.relative_to(root).parts[:-1]
                split = "test" if any("test" in part.lower() for part in relative) else None
                shapes = tuple(Polygons((ring,)) for ring in rings)
                refs.append(
                    SampleRef(
                        xml.stem,
                        concept,
                        ImageSource(image),
                        ShapesTarget(shapes, height, width, xml),
                        positive=bool(shapes),
                        split=split,
                        meta={"layout": self.name, "modality": "microscopy"},
                    )
                )
        return refs
