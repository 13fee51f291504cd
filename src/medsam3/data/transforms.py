"""Training augmentations applied consistently to an image, its instance masks and their boxes.

Geometric transforms (flips, scale + crop/pad, rotation) move the image (bilinear) and the masks
(nearest neighbour, so masks stay binary) through the same pixel mapping; boxes are then
recomputed from the masks, so they always agree, and an instance that leaves the image is dropped
together with its box (``keep`` tells the caller which input instances survive). Without masks,
boxes are moved as geometry (their corners) instead.
Intensity transforms (gamma, noise, brightness/contrast, CT window jitter) touch only the image.

Each transform says whether it is ``geometric`` (a feature cache cannot reuse the features of the
untransformed image) and whether it is a horizontal flip (``hflip``: features can be flipped
instead of recomputed). Randomness comes only from an explicit ``numpy.random.Generator``: the same
seed gives the same augmentations.

Coordinates: boxes are xyxy in pixel-edge coordinates (a mask over columns 3..7 has x0 = 3,
x1 = 8), as in :mod:`medsam3.data.sample`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage as ndi

from medsam3.data.sample import Sample, masks_to_boxes
from medsam3.data.windowing import apply_window


@dataclass
class Annotated:
    """An image with its instances, as the transforms pass it along."""

    image: np.ndarray  # (H, W, C) uint8 or float in [0, 1]; (H, W) raw values (e.g. HU) before windowing
    masks: np.ndarray | None  # (N, H, W) bool, or None when only boxes are known
    boxes: np.ndarray  # (N, 4) float32 xyxy, pixel edges
    keep: np.ndarray  # (N,) int: index of each instance in the original input
    applied: tuple[str, ...] = ()  # names of the transforms that fired, in order

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def annotate(
    image: np.ndarray, masks: np.ndarray | None = None, boxes: np.ndarray | None = None
) -> Annotated:
    """Check shapes and wrap; boxes come from the masks when masks are given (empty masks dropped)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    h, w = image.shape[:2]
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != (h, w):
            raise ValueError(f"masks must be (N, {h}, {w}), got shape {masks.shape}")
        keep = np.flatnonzero(masks.any(axis=(1, 2)))
        masks = masks[keep]
        return Annotated(image, masks, masks_to_boxes(masks), keep)
    if boxes is None:
        boxes = np.zeros((0, 4), dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return Annotated(image, None, boxes, np.arange(len(boxes)))


class Transform:
    """One augmentation, applied with probability ``p``."""

    name: ClassVar[str] = "transform"
    geometric: ClassVar[bool] = False
    hflip: ClassVar[bool] = False

    def __init__(self, p: float = 1.0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        if rng.random() >= self.p:
            return item
        out = self.apply(item, rng)
        return dataclasses.replace(out, applied=item.applied + (self.name,))

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


# --- geometry -------------------------------------------------------------------------------------


def _finish_geometry(item: Annotated, image: np.ndarray, masks: np.ndarray | None, boxes: np.ndarray,
                     min_area: int) -> Annotated:  # fmt: skip
    """Drop instances that left the image; recompute boxes from masks when there are masks."""
    if masks is not None:
        alive = masks.sum(axis=(1, 2)) >= max(min_area, 1)
        masks = masks[alive]
        boxes = masks_to_boxes(masks)
    else:
        alive = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        boxes = boxes[alive]
    return dataclasses.replace(
        item, image=image, masks=masks, boxes=boxes.astype(np.float32), keep=item.keep[alive]
    )


class HorizontalFlip(Transform):
    """Mirror left-right."""

    name = "hflip"
    geometric = True
    hflip = True

    def __init__(self, p: float = 0.5):
        super().__init__(p)

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        w = item.size[1]
        image = np.ascontiguousarray(item.image[:, ::-1])
        masks = None if item.masks is None else np.ascontiguousarray(item.masks[:, :, ::-1])
        boxes = np.stack(
            [w - item.boxes[:, 2], item.boxes[:, 1], w - item.boxes[:, 0], item.boxes[:, 3]], axis=1
        )
        return _finish_geometry(item, image, masks, boxes, 1)


class VerticalFlip(Transform):
    """Mirror top-bottom (fine for microscopy and dermoscopy; not for anatomy with an up)."""

    name = "vflip"
    geometric = True

    def __init__(self, p: float = 0.5):
        super().__init__(p)

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        h = item.size[0]
        image = np.ascontiguousarray(item.image[::-1])
        masks = None if item.masks is None else np.ascontiguousarray(item.masks[:, ::-1])
        boxes = np.stack(
            [item.boxes[:, 0], h - item.boxes[:, 3], item.boxes[:, 2], h - item.boxes[:, 1]], axis=1
        )
        return _finish_geometry(item, image, masks, boxes, 1)


class Rot90(Transform):
    """Turn by a random multiple of 90 degrees (1-3 quarter turns): slices of the same anatomy in
    another view or another scanner convention, and the non-square ones change shape."""

    name = "rot90"
    geometric = True

    def __init__(self, p: float = 0.5):
        super().__init__(p)

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        k = int(rng.integers(1, 4))
        image = np.ascontiguousarray(np.rot90(item.image, k, axes=(0, 1)))
        masks = None if item.masks is None else np.ascontiguousarray(np.rot90(item.masks, k, axes=(1, 2)))
        boxes = item.boxes.copy()
        h, w = item.size
        for _ in range(k):  # one counter-clockwise quarter turn: (x, y) -> (y, w - x)
            boxes = np.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], axis=1)
            h, w = w, h
        return _finish_geometry(item, image, masks, boxes, 1)


def warp(
    item: Annotated, matrix: np.ndarray, out_shape: tuple[int, int], fill: float, min_area: int
) -> Annotated:
    """Resample through ``matrix`` (2x3: output (row, col, 1) -> input (row, col), pixel centres).

    The image is interpolated bilinearly (``fill`` outside), masks by nearest neighbour.
    """
    rows, cols = np.mgrid[0 : out_shape[0], 0 : out_shape[1]].astype(np.float64)
    src_r = matrix[0, 0] * rows + matrix[0, 1] * cols + matrix[0, 2]
    src_c = matrix[1, 0] * rows + matrix[1, 1] * cols + matrix[1, 2]
    h, w = item.size

    # A position samples the image if its nearest pixel lies inside (the same rule as the masks).
    near_r, near_c = np.rint(src_r).astype(np.int64), np.rint(src_c).astype(np.int64)
    inside = (near_r >= 0) & (near_r < h) & (near_c >= 0) & (near_c < w)
    source = item.image.astype(np.float32)
    planes = source[..., None] if source.ndim == 2 else source
    warped = np.stack(
        [
            ndi.map_coordinates(planes[..., k], [src_r, src_c], order=1, mode="nearest")
            for k in range(planes.shape[-1])
        ],
        axis=-1,
    )
    warped = np.where(inside[..., None], warped, np.float32(fill))
    warped = warped[..., 0] if item.image.ndim == 2 else warped
    image = _restore_dtype(warped, item.image.dtype)

    masks = None
    if item.masks is not None:
        gathered = item.masks[:, near_r.clip(0, h - 1), near_c.clip(0, w - 1)]
        masks = gathered & inside[None]
    boxes = _warp_boxes(item.boxes, matrix, out_shape)
    return _finish_geometry(item, image, masks, boxes, min_area)


def _warp_boxes(boxes: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Boxes through the inverse of ``matrix``: the box around the moved corners, clipped."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    forward = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))
    x0, y0, x1, y1 = boxes.T.astype(np.float64)
    # Corners in pixel-centre (row, col) coordinates: an edge at x is the centre coordinate x - 0.5.
    corners_r = np.stack([y0, y0, y1, y1]) - 0.5
    corners_c = np.stack([x0, x1, x0, x1]) - 0.5
    out_r = forward[0, 0] * corners_r + forward[0, 1] * corners_c + forward[0, 2] + 0.5
    out_c = forward[1, 0] * corners_r + forward[1, 1] * corners_c + forward[1, 2] + 0.5
    h, w = out_shape
    return np.stack(
        [out_c.min(0).clip(0, w), out_r.min(0).clip(0, h), out_c.max(0).clip(0, w), out_r.max(0).clip(0, h)],
        axis=1,
    ).astype(np.float32)


def _restore_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


class RandomScaleCrop(Transform):
    """Zoom by a log-uniform factor, then crop or pad (at a random place) to ``size`` (H, W).

    ``size=None`` keeps the input size. ``fill`` pads the image (0 for RGB; -1024 for raw HU).
    """

    name = "scale_crop"
    geometric = True

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.75, 1.33),
        p: float = 1.0,
        fill: float = 0.0,
        min_area: int = 1,
    ):
        super().__init__(p)
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomScaleCrop: scale range must satisfy 0 < low <= high, got {scale}")
        self.size = (size, size) if isinstance(size, int) else size
        self.scale = scale
        self.fill = fill
        self.min_area = min_area

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        h, w = item.size
        out_h, out_w = self.size or (h, w)
        s = float(np.exp(rng.uniform(np.log(self.scale[0]), np.log(self.scale[1]))))
        offsets = []
        for scaled, out in ((h * s, out_h), (w * s, out_w)):
            # Crop: the view starts inside the zoomed image; pad: the zoomed image sits inside the view.
            offsets.append(rng.uniform(0, scaled - out) if scaled >= out else -rng.uniform(0, out - scaled))
        oy, ox = offsets
        # Output (r, c) sits at zoomed (r + oy, c + ox); pixel centres scale about the pixel edges.
        matrix = np.array([[1 / s, 0.0, (oy + 0.5) / s - 0.5], [0.0, 1 / s, (ox + 0.5) / s - 0.5]])
        return warp(item, matrix, (out_h, out_w), self.fill, self.min_area)


class RandomRotation(Transform):
    """Rotate about the image centre by a uniform angle in ``degrees``; corners get ``fill``."""

    name = "rotate"
    geometric = True

    def __init__(
        self,
        degrees: float | tuple[float, float] = 15.0,
        p: float = 0.5,
        fill: float = 0.0,
        min_area: int = 1,
    ):
        super().__init__(p)
        self.degrees = (-abs(degrees), abs(degrees)) if isinstance(degrees, int | float) else tuple(degrees)
        self.fill = fill
        self.min_area = min_area

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        h, w = item.size
        angle = np.deg2rad(rng.uniform(*self.degrees))
        c, s = np.cos(angle), np.sin(angle)
        cr, cc = (h - 1) / 2, (w - 1) / 2
        # Counter-clockwise on screen by ``angle``: the source of output (r, c) is rotated back.
        rot = np.array([[c, s], [-s, c]])
        shift = np.array([cr, cc]) - rot @ np.array([cr, cc])
        matrix = np.hstack([rot, shift[:, None]])
        return warp(item, matrix, (h, w), self.fill, self.min_area)


class RandomShift(Transform):
    """Move the image by up to ``fraction`` of its height and width; uncovered pixels get ``fill``.

    Why: with a few slices of one scan a detector with absolute position encodings learns *where*
    a structure sits in the frame instead of what it looks like (an adapter trained on 8 axial
    slices lost half its Dice when the same slices were moved 40 px); shifting breaks that shortcut.
    """

    name = "shift"
    geometric = True

    def __init__(self, fraction: float = 0.2, p: float = 0.5, fill: float = 0.0, min_area: int = 1):
        super().__init__(p)
        if not 0 <= fraction < 1:
            raise ValueError(f"RandomShift: fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.fill = fill
        self.min_area = min_area

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        h, w = item.size
        dy, dx = (rng.uniform(-self.fraction, self.fraction) * n for n in (h, w))
        # Output (r, c) samples input (r - dy, c - dx): the content moves by (dy, dx).
        matrix = np.array([[1.0, 0.0, -dy], [0.0, 1.0, -dx]])
        return warp(item, matrix, (h, w), self.fill, self.min_area)


# --- intensity ------------------------------------------------------------------------------------


def _to_unit(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32)


def _from_unit(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    values = np.clip(values, 0.0, 1.0)
    if dtype == np.uint8:
        return np.rint(values * 255.0).astype(np.uint8)
    return values.astype(dtype)


class _Intensity(Transform):
    """Base for transforms on an 8-bit image or a float image in [0, 1]."""

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        if item.image.dtype != np.uint8 and not np.issubdtype(item.image.dtype, np.floating):
            raise ValueError(
                f"{type(self).__name__}: needs a uint8 or [0, 1] float image, got {item.image.dtype}"
            )
        unit = self.change(_to_unit(item.image), rng)
        return dataclasses.replace(item, image=_from_unit(unit, item.image.dtype))

    def change(self, unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class Gamma(_Intensity):
    """``x ** gamma`` with a log-uniform gamma: brightens (gamma < 1) or darkens mid-tones."""

    name = "gamma"

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5), p: float = 0.5):
        super().__init__(p)
        self.gamma = gamma

    def change(self, unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))
        return np.clip(unit, 0.0, 1.0) ** g


class GaussianNoise(_Intensity):
    """Additive Gaussian noise, standard deviation uniform in ``std`` (fraction of full scale).

    By default one noise value per pixel, shared by the channels: a grey medical image stored as
    RGB stays grey.
    """

    name = "noise"

    def __init__(self, std: tuple[float, float] = (0.0, 0.04), p: float = 0.5, per_channel: bool = False):
        super().__init__(p)
        self.std = std
        self.per_channel = per_channel

    def change(self, unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = rng.uniform(*self.std)
        shape = unit.shape if (self.per_channel or unit.ndim == 2) else unit.shape[:2] + (1,)
        return unit + rng.normal(0.0, sigma, shape).astype(np.float32)


class BrightnessContrast(_Intensity):
    """Scale contrast about the mean by ``1 +- contrast`` and shift by ``+- brightness``."""

    name = "brightness_contrast"

    def __init__(self, brightness: float = 0.1, contrast: float = 0.2, p: float = 0.5):
        super().__init__(p)
        self.brightness = brightness
        self.contrast = contrast

    def change(self, unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factor = rng.uniform(1 - self.contrast, 1 + self.contrast)
        shift = rng.uniform(-self.brightness, self.brightness)
        mean = float(unit.mean())
        return (unit - mean) * factor + mean + shift


class CTWindowJitter(Transform):
    """Window raw HU into an RGB uint8 image, with a jittered window (level +- ``center_jitter`` HU,
    width times a log-uniform factor in ``width_scale``).

    Put it after any geometric transform on raw HU (with fill -1024) and before the other
    intensity transforms; keep ``p=1``, or the image stays in HU.
    """

    name = "ct_window"

    def __init__(
        self,
        center: float = 40.0,
        width: float = 400.0,
        center_jitter: float = 20.0,
        width_scale: tuple[float, float] = (0.8, 1.25),
        p: float = 1.0,
    ):
        super().__init__(p)
        self.center = center
        self.width = width
        self.center_jitter = center_jitter
        self.width_scale = width_scale

    def window(self, rng: np.random.Generator) -> tuple[float, float]:
        center = self.center + rng.uniform(-self.center_jitter, self.center_jitter)
        width = self.width * float(
            np.exp(rng.uniform(np.log(self.width_scale[0]), np.log(self.width_scale[1])))
        )
        return float(center), float(width)

    def apply(self, item: Annotated, rng: np.random.Generator) -> Annotated:
        raw = item.image
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
        if raw.ndim != 2 or raw.dtype == np.uint8:
            raise ValueError(
                f"CTWindowJitter: needs a raw (H, W) HU image, got {raw.dtype} {item.image.shape}"
            )
        center, width = self.window(rng)
        unit = apply_window(raw.astype(np.float32), center, width)
        rgb = np.repeat(np.rint(unit * 255.0).astype(np.uint8)[..., None], 3, axis=-1)
        return dataclasses.replace(item, image=rgb)


# --- pipeline -------------------------------------------------------------------------------------


class Compose:
    """Transforms in order, drawing from one seeded generator (or one passed per call)."""

    def __init__(self, transforms: Sequence[Transform], seed: int | None = None):
        self.transforms = list(transforms)
        self.rng = np.random.default_rng(seed)

    @property
    def geometric(self) -> bool:
        """True when some transform moves pixels: features of the original image no longer fit."""
        return any(t.geometric for t in self.transforms)

    @property
    def feature_flippable(self) -> bool:
        """True when every geometric transform is a horizontal flip (features can be flipped)."""
        return all(t.hflip for t in self.transforms if t.geometric)

    @property
    def flips_only(self) -> bool:
        """True when every transform is a flip: a finite set of exact pixel views, each cacheable once."""
        return all(isinstance(t, (HorizontalFlip, VerticalFlip)) for t in self.transforms)

    @property
    def cacheable(self) -> bool:
        """Whether a frozen-encoder feature cache can hold every view (only flips: a finite set)."""
        return self.flips_only

    def apply(
        self,
        image: np.ndarray,
        masks: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> Annotated:
        """Transform arrays; returns the image, surviving masks and boxes, and which survived."""
        item = annotate(image, masks, boxes)
        rng = self.rng if rng is None else rng
        for transform in self.transforms:
            item = transform(item, rng)
        return item

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        """Transform a dataset sample (the trainer's ``augment`` hook); concept and ids stay."""
        item = self.apply(sample.image, sample.masks, rng=rng)
        meta = {**sample.meta, "augment": list(item.applied)}
        return dataclasses.replace(sample, image=item.image, masks=item.masks, boxes=item.boxes, meta=meta)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ViewBank:
    """A fixed set of augmented views per image, so a frozen-encoder feature cache stays valid.

    Random augmentation changes the pixels every step, and each new view would need the frozen
    image tower again (0.6 s per lite image on 2 cores, 50 s for SAM 3). A view bank draws view
    ``v`` of an image from a generator seeded by (``seed``, the image's pixels, ``v``): the same
    image always gets the same ``views`` views (view 0 is the image itself), whichever concept or
    epoch asks for it, so each view is encoded once and cached like any image. With ``views`` of
    8-16 a few-shot set of 14 slices is ~100-200 encodings: a minute or two, once.
    """

    cacheable = True  # the trainer's feature cache accepts it

    def __init__(self, pipeline: Compose, views: int = 8, seed: int = 0):
        if views < 1:
            raise ValueError(f"ViewBank: views must be at least 1, got {views}")
        self.pipeline = pipeline
        self.views = int(views)
        self.seed = int(seed)

    def view_rng(self, image: np.ndarray, view: int) -> np.random.Generator:
        import hashlib

        digest = hashlib.sha256(str(np.shape(image)).encode() + np.ascontiguousarray(image).tobytes()).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little"), view])

    def view(self, sample: Sample, index: int) -> Sample:
        """View ``index`` of a sample (0: the sample itself): the same pixels every time it is asked."""
        if index == 0:
            return sample
        out = self.pipeline(sample, self.view_rng(sample.image, index))
        return dataclasses.replace(out, meta={**out.meta, "view": index})

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        """One of the image's views, chosen by ``rng`` (the trainer's per-sample generator)."""
        return self.view(sample, int((rng or np.random.default_rng()).integers(self.views)))

    def __repr__(self) -> str:
        return f"ViewBank({self.pipeline!r}, views={self.views}, seed={self.seed})"


class SampleViews(Sequence):
    """Every sample of ``samples`` under the first ``views`` views of a bank, sample by sample.

    A few-shot validation split is one or two slices: early stopping and the per-concept mask-source
    choice then rest on one image and one framing. Scoring the same held-out slices under the bank's
    views (turned, zoomed, shifted, re-windowed) gives them more to rest on, and prefers weights that
    hold when the structure is not where the training slices had it.
    """

    def __init__(self, samples: Sequence[Sample], bank: ViewBank, views: int):
        if not 1 <= views <= bank.views:
            raise ValueError(f"SampleViews: views must be in [1, {bank.views}], got {views}")
        self.samples, self.bank, self.views = samples, bank, int(views)

    def __len__(self) -> int:
        return len(self.samples) * self.views

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample, view = divmod(index, self.views)
        return self.bank.view(self.samples[sample], view)


def view_augmentation(views: int = 12, seed: int = 0) -> ViewBank:
    """The default fine-tuning augmentation: quarter turns, flips, small rotations, zoom, shift, intensity.

    What each teaches: quarter turns and flips that a structure is the same whichever way the slice
    is shown (another view, another convention); rotation, zoom (0.7-1.4) and shifts (up to 20% of
    a side) that position and size vary, so a few slices of one scan do not teach *where* in the
    frame a structure sits (on the few-shot benchmark they lifted the unseen coronal view most);
    gamma and contrast that the window or scanner varies. A fixed bank of views (see ViewBank) so
    that the feature cache holds: each view is encoded once.
    """
    steps: list[Transform] = [
        Rot90(0.4),
        HorizontalFlip(0.5),
        RandomRotation(15.0, p=0.5),
        RandomScaleCrop(None, (0.7, 1.4), p=0.7),
        RandomShift(0.2, p=0.7),
        Gamma(p=0.4),
        BrightnessContrast(p=0.4),
    ]
    return ViewBank(Compose(steps), views=views, seed=seed)


def default_augmentation(size: int | None = None, ct: bool = False, seed: int | None = None) -> Compose:
    """A sensible training pipeline: flip, zoom/crop, small rotation, mild intensity changes.

    ``size`` (pixels) makes every output that square size; None keeps the input size.

    ``ct=True`` expects raw HU (H, W) input: geometry pads with air, then a jittered abdomen window.
    """
    fill = -1024.0 if ct else 0.0
    steps: list[Transform] = [
        HorizontalFlip(0.5),
        RandomScaleCrop(size, (0.8, 1.25), p=1.0 if size else 0.7, fill=fill),  # a size is a promise
        RandomRotation(10.0, p=0.3, fill=fill),
    ]
    if ct:
        steps.append(CTWindowJitter())
    steps += [Gamma(p=0.3), BrightnessContrast(p=0.3), GaussianNoise(p=0.2)]
    return Compose(steps, seed)


def flip_augmentation(seed: int | None = None, vertical: bool = False) -> Compose:
    """Random flips only: works with the feature cache (2 views per image, 4 with ``vertical``)."""
    return Compose([HorizontalFlip(0.5), *([VerticalFlip(0.5)] if vertical else [])], seed)
