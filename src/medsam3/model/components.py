"""SAM 3's parts, by role, and per-part parameter counts.

MedSAM-3's method is a statement about these parts: the encoders stay frozen, the detector learns.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ENCODER_COMPONENTS = ("vision_encoder", "text_encoder", "text_projection")
# lite only: the trainable neck inside its vision encoder, the trainable head on the semantic map,
# and LiteMedSAM's box-prompted mask decoder.
LITE_COMPONENTS = ("vision_adapter", "semantic_head", "box_decoder")
DETECTOR_COMPONENTS = (
    "geometry_encoder",
    "detr_encoder",
    "detr_decoder",
    "mask_decoder",
    "dot_product_scoring",
)
COMPONENTS = ENCODER_COMPONENTS + LITE_COMPONENTS + DETECTOR_COMPONENTS


def component_of(parameter_name: str) -> str:
    """The top-level SAM 3 part a parameter belongs to (LoRA layers belong to their host)."""
    if parameter_name.startswith("vision_encoder.adapter."):
        return "vision_adapter"
    head = parameter_name.split(".", 1)[0]
    return head if head in COMPONENTS else "other"


@dataclass(frozen=True)
class ComponentCount:
    component: str
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(model: nn.Module) -> list[ComponentCount]:
    """Parameters per component, in SAM 3's order, plus a final ``total`` row."""
    totals: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = totals.setdefault(component_of(name), [0, 0])
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
    order = [c for c in (*COMPONENTS, "other") if c in totals]
    rows = [ComponentCount(c, *totals[c]) for c in order]
    rows.append(ComponentCount("total", sum(r.total for r in rows), sum(r.trainable for r in rows)))
    return rows
