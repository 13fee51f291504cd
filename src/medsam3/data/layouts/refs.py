"""Lazy sample references: where a sample's image and annotation live, loaded only on demand.

Indexing a dataset produces one :class:`SampleRef` per (image or slice, concept). A ref is small,
picklable (DataLoader workers get copies) and knows how to load its pixels: the image through
:mod:`medsam3.data.image_io` / :mod:`medsam3.data.volume_io`, the instances through its *target*,
one of a few annotation kinds that the layouts share:

- :class:`LabelMapTarget`: a semantic label map (2D file or one slice of a label volume); the
  concept is a set of label values; optionally an instance-id map alongside.
- :class:`MaskFilesTarget`: one binary mask file per instance (DSB2018 nuclei, BUSI's extra masks).
- :class:`ShapesTarget`: polygons or run-length encodings (COCO, MoNuSeg's XML).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medsam3.data.layouts.readers import read_label_volume, read_mask_2d, read_volume_cached
from medsam3.data.layouts.shapes import Shape
from medsam3.data.sample import (
    InstanceMode,
    Sample,
    binary_to_instances,
    drop_small,
    empty_masks,
    label_map_to_instances,
    make_sample,
)
from medsam3.data.volume_io import take_slice
from medsam3.errors import InputFileError


@dataclass(frozen=True)
class ImageSource:
    """A 2D image file, or one slice of a volume along ``axis`` (0 = Z, 1 = Y, 2 = X)."""

    path: Path
    slice_index: int | None = None
    axis: int = 0

    def describe(self) -> str:
        if self.slice_index is None:
            return str(self.path)
        return f"{self.path} [axis {self.axis}, slice {self.slice_index}]"


class Target(Protocol):
    """Something that yields the (N, H, W) instance masks of one concept in one image."""

    def load(self, instances: InstanceMode, min_area: int) -> np.ndarray: ...

    def files(self) -> tuple[Path, ...]: ...


def _label_plane(path: Path, slice_index: int | None, axis: int, binary: bool) -> np.ndarray:
    if slice_index is None:
        return read_mask_2d(path, binary=binary)
    return take_slice(read_label_volume(path), slice_index, axis, path)


@dataclass(frozen=True)
class LabelMapTarget:
    """The concept = the pixels of a label map whose value is in ``values``.

    ``binary`` thresholds 8-bit masks (0/255 PNG, JPEG) to 0/1 first. With ``instance_path`` the
    instances are the ids of that instance map inside the concept's region (touching objects stay
    apart); with ``instance_map`` the label map itself holds one id per object.
    """

    path: Path
    values: tuple[int, ...]
    slice_index: int | None = None
    axis: int = 0
    binary: bool = False
    instance_path: Path | None = None
    instance_map: bool = False

    def load(self, instances: InstanceMode, min_area: int) -> np.ndarray:
        labels = _label_plane(self.path, self.slice_index, self.axis, self.binary)
        region = labels != 0 if self.instance_map else np.isin(labels, self.values)
        if instances == "semantic":
            return binary_to_instances(region, "semantic", min_area)
        if self.instance_map:
            return label_map_to_instances(np.where(region, labels, 0), min_area)
        if self.instance_path is not None:
            ids = _label_plane(self.instance_path, self.slice_index, self.axis, False)
            if ids.shape != labels.shape:
                raise InputFileError(
                    self.instance_path,
                    f"instance map size {ids.shape} differs from its label map {labels.shape}",
                )
            return label_map_to_instances(np.where(region, ids, 0), min_area)
        return binary_to_instances(region, instances, min_area)

    def files(self) -> tuple[Path, ...]:
        return (self.path,) + ((self.instance_path,) if self.instance_path else ())


@dataclass(frozen=True)
class MaskFilesTarget:
    """One binary mask file per instance (all files the same size). No files: a negative."""

    paths: tuple[Path, ...]
    height: int | None = None
    width: int | None = None

    def load(self, instances: InstanceMode, min_area: int) -> np.ndarray:
        if not self.paths:
            if self.height is None or self.width is None:
                raise ValueError("MaskFilesTarget without files needs the image size")
            return empty_masks(self.height, self.width)
        planes = []
        for path in self.paths:
            plane = read_mask_2d(path, binary=True).astype(bool)
            if planes and plane.shape != planes[0].shape:
                raise InputFileError(
                    path, f"mask size {plane.shape} differs from {self.paths[0].name} {planes[0].shape}"
                )
            planes.append(plane)
        masks = np.stack(planes)
        if instances == "semantic":
            return binary_to_instances(masks.any(axis=0), "semantic", min_area)
        return drop_small(masks, min_area)

    def files(self) -> tuple[Path, ...]:
        return self.paths


@dataclass(frozen=True, eq=False)
class ShapesTarget:
    """Instances drawn as polygons or run-length encodings on an image of known size."""

    shapes: tuple[Shape, ...]
    height: int
    width: int
    source: Path

    def load(self, instances: InstanceMode, min_area: int) -> np.ndarray:
        if not self.shapes:
            return empty_masks(self.height, self.width)
        try:
            masks = np.stack([s.rasterize(self.height, self.width) for s in self.shapes])
        except ValueError as error:
            raise InputFileError(self.source, f"bad annotation shape ({error})") from None
        if instances == "semantic":
            return binary_to_instances(masks.any(axis=0), "semantic", min_area)
        return drop_small(masks, min_area)

    def files(self) -> tuple[Path, ...]:
        return (self.source,)


@dataclass(frozen=True, eq=False)
class SampleRef:
    """Where one sample lives. ``positive`` is known at indexing for most layouts (None if not)."""

    case_id: str
    concept: str
    image: ImageSource
    target: Target
    positive: bool | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.image.describe()

    def load_masks(self, instances: InstanceMode = "components", min_area: int = 0) -> np.ndarray:
        """The instance masks only, without decoding the image (cheap counting for inspection)."""
        return self.target.load(instances, min_area)

    def load(self, instances: InstanceMode = "components", min_area: int = 0, window: Any = None) -> Sample:
        """Decode image and masks into a :class:`Sample`; a size mismatch names both files."""
        rgb, spacing, modality = load_image(self.image, window)
        masks = self.target.load(instances, min_area)
        if masks.shape[1:] != rgb.shape[:2]:
            label = self.target.files()[0] if self.target.files() else self.image.path
            raise InputFileError(
                label,
                f"mask is {masks.shape[2]}x{masks.shape[1]} but its image {self.image.describe()} is "
                f"{rgb.shape[1]}x{rgb.shape[0]} (width x height)",
            )
        meta = dict(self.meta)
        modality = modality or meta.get("modality")
        meta["split"] = self.split
        if self.image.slice_index is not None:
            meta.setdefault("slice_index", self.image.slice_index)
            meta.setdefault("axis", self.image.axis)
        return make_sample(
            rgb,
            self.concept,
            masks,
            self.case_id,
            modality=modality,
            spacing=spacing,
            source=self.source,
            meta=meta,
        )


def load_image(
    source: ImageSource, window: Any = None
) -> tuple[np.ndarray, tuple[float, float] | None, str | None]:
    """(rgb (H, W, 3) uint8, spacing (row, col) mm or None, modality or None) of an image source."""
    if source.slice_index is None:
        from medsam3.data.image_io import read_image

        image = read_image(source.path, window=window)
        spacing = tuple(float(v) for v in image.spacing[-2:]) if image.spacing is not None else None
        return image.rgb, spacing, image.modality  # type: ignore[return-value]
    from medsam3.data.volume_io import slice_rgb

    volume = read_volume_cached(source.path)
    rgb = slice_rgb(volume, source.slice_index, source.axis, window)
    return rgb, volume.slice_spacing(source.axis), volume.modality
