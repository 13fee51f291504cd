"""Which layout a folder is in: the registry of readers and automatic detection.

Detection tries the most specific layouts first (a file or folder name only that dataset uses),
the generic ones (COCO JSON, paired folders) last, so a Kvasir-SEG download is read as Kvasir even
though it is also an images/ + masks/ pair.
"""

from __future__ import annotations

from pathlib import Path

from medsam3.data.layouts.base import Layout
from medsam3.data.layouts.busi import BusiLayout
from medsam3.data.layouts.coco import CocoLayout
from medsam3.data.layouts.covidqu import CovidQuExLayout
from medsam3.data.layouts.dsb2018 import Dsb2018Layout
from medsam3.data.layouts.isic import IsicLayout
from medsam3.data.layouts.kvasir import KvasirLayout
from medsam3.data.layouts.monuseg import MoNuSegLayout
from medsam3.data.layouts.nnunet import NnUNetLayout
from medsam3.data.layouts.paired import PairedLayout
from medsam3.data.layouts.rimone import RimOneLayout
from medsam3.errors import DatasetError

#: Readers in detection order.
LAYOUTS: tuple[Layout, ...] = (
    NnUNetLayout(),
    Dsb2018Layout(),
    MoNuSegLayout(),
    RimOneLayout(),
    CovidQuExLayout(),
    IsicLayout(),
    BusiLayout(),
    KvasirLayout(),
    CocoLayout(),
    PairedLayout(),
)


def layout_names() -> list[str]:
    return [layout.name for layout in LAYOUTS]


def get_layout(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name.strip().lower():
            return layout
    raise DatasetError(f"unknown layout '{name}'; known layouts: {', '.join(layout_names())}")


def resolve_layout(path: str | Path, layout: str = "auto") -> tuple[Layout, Path]:
    """The reader and the folder it reads: detected for "auto", else checked against ``layout``."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset folder")
    if layout != "auto":
        reader = get_layout(layout)
        root = reader.find_root(path)
        if root is None:
            raise DatasetError(f"{path}: does not look like a {reader.name} dataset ({reader.summary})")
        return reader, root
    for reader in LAYOUTS:
        root = reader.find_root(path)
        if root is not None:
            return reader, root
    raise DatasetError(
        f"{path}: unknown dataset layout; known layouts: "
        + "; ".join(f"{layout.name} ({layout.summary})" for layout in LAYOUTS)
    )


def detect_layout(path: str | Path) -> str:
    """The name of the layout ``path`` is in; :class:`DatasetError` listing the known ones if none."""
    return resolve_layout(path, "auto")[0].name
