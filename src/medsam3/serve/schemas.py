"""Request bodies of the API (pydantic): shapes and ranges; meaning is checked by the library."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Number = Annotated[float, Field(allow_inf_nan=False)]
BoxIn = Annotated[list[Number], Field(min_length=4, max_length=4, description="X0, Y0, X1, Y1 in image pixels")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class SegmentRequest(BaseModel):
    """Segment a 2D image (or one slice of a volume) by naming concepts."""

    model_config = ConfigDict(extra="forbid")

    concepts: list[str] = Field(description="Concept phrases, e.g. ['liver', 'liver tumor'].", examples=[["liver"]])
    boxes: list[BoxIn] = Field(default_factory=list, description="Positive exemplar boxes (apply to every concept).")
    negative_boxes: list[BoxIn] = Field(default_factory=list, description="Negative exemplar boxes.")
    slice: int | None = Field(default=None, description="Volumes: the slice to segment (along 'axis').")
    axis: int = Field(default=0, ge=0, le=2, description="Volumes: slicing axis of the (Z, Y, X) array.")
    window: str | None = Field(default=None, description="Gray images: CT window preset (abdomen, lung, ...) or 'C,W'.")
    threshold: Fraction | None = Field(default=None, description="Instance score threshold (server default 0.5).")
    mask_threshold: Fraction | None = Field(default=None, description="Mask probability threshold.")
    normalize: bool = Field(
        default=True, description="Map phrases outside the model's vocabulary to its nearest concept."
    )


class KeyBox(BaseModel):
    """A box drawn on one slice of a volume."""

    model_config = ConfigDict(extra="forbid")

    slice: int = Field(ge=0, description="The slice (along 'axis') the box is drawn on.")
    box: BoxIn


class VolumeJobRequest(BaseModel):
    """Segment a whole volume by naming concepts (a background job)."""

    model_config = ConfigDict(extra="forbid")

    concepts: list[str] = Field(examples=[["liver"]])
    method: Literal["auto", "propagate", "slices", "track"] = Field(
        default="auto", description="See medsam3 segment-volume --method (auto: propagate when a box is given)."
    )
    axis: int = Field(default=0, ge=0, le=2)
    box_slice: int | None = Field(default=None, description="The slice 'box' is drawn on.")
    box: BoxIn | None = Field(default=None, description="A box on 'box_slice' (pixels), applied to every concept.")
    key_boxes: list[KeyBox] = Field(
        default_factory=list, description="More boxes, each on its slice (several lesions, several key slices)."
    )
    window: str | None = None
    threshold: Fraction | None = None
    normalize: bool = True
