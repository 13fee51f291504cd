"""Dataset layout readers (nnU-Net/MSD, COCO, paired folders, and the paper's public datasets)."""

from medsam3.data.layouts.detection import LAYOUTS, detect_layout, get_layout, layout_names, resolve_layout

__all__ = ["LAYOUTS", "detect_layout", "get_layout", "layout_names", "resolve_layout"]
