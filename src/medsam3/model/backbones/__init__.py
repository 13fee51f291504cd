"""Backbone registry: a new backbone is one module here plus one entry in ``BACKBONES``.

A model says which backbone it has through its config (``config.medsam3_backbone["name"]``);
plain SAM 3 configs have none and get SAM 3's own towers.
"""

from __future__ import annotations

from medsam3.model.backbones.base import Backbone
from medsam3.model.backbones.lite import LiteBackbone
from medsam3.model.backbones.sam3 import Sam3Backbone

BACKBONES: dict[str, type[Backbone]] = {"sam3": Sam3Backbone, "lite": LiteBackbone}


def backbone_name(config) -> str:
    return (getattr(config, "medsam3_backbone", None) or {}).get("name", "sam3")


def backbone_for(model, processor=None) -> Backbone:
    """The backbone object for a loaded model (SAM 3's needs its processor)."""
    name = backbone_name(model.config)
    if name == "sam3":
        if processor is None:
            raise ValueError("a SAM 3 backbone needs its Sam3Processor")
        return Sam3Backbone(processor)
    return BACKBONES[name]()


__all__ = ["BACKBONES", "Backbone", "backbone_for", "backbone_name"]
