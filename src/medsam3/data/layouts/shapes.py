"""Vector and run-length annotations turned into pixel masks (COCO polygons and RLE, Aperio XML).

COCO RLE (uncompressed counts or the compressed string) is decoded by pycocotools, the format's
reference implementation: counts alternate background/foreground runs starting with background,
in column-major (Fortran) pixel order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage.draw import polygon as fill_polygon


def decode_rle(counts: Sequence[int] | str | bytes, height: int, width: int) -> np.ndarray:
    """A COCO RLE (uncompressed list or compressed string) -> (H, W) bool mask, decoded by pycocotools.

    Uncompressed counts must cover the mask exactly (pycocotools would silently accept fewer).
    """
    from pycocotools import mask as coco_mask

    if isinstance(counts, (str, bytes)):
        text = counts.encode("ascii") if isinstance(counts, str) else counts
        rle = {"size": [int(height), int(width)], "counts": text}
    else:
        runs = [int(c) for c in counts]
        if any(r < 0 for r in runs):
            raise ValueError("RLE has a negative run length")
        total = height * width
        if sum(runs) != total:
            raise ValueError(f"RLE runs cover {sum(runs)} pixels but the mask has {height}x{width} = {total}")
        rle = coco_mask.frPyObjects({"size": [int(height), int(width)], "counts": runs}, int(height), int(width))
    try:
        with warnings.catch_warnings():  # pycocotools' __array__ predates NumPy 2's copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            return coco_mask.decode(rle).astype(bool)
    except ValueError as error:
        raise ValueError(f"invalid compressed RLE string ({error})") from None


@dataclass(frozen=True, eq=False)
class Polygons:
    """One instance drawn as one or more closed rings of (x, y) vertices.

    ``offset`` is subtracted from the coordinates before filling pixel centres: 0.5 for COCO,
    whose coordinates measure pixel edges (a square 0..10 covers pixels 0..9); 0 for formats that
    give pixel positions (Aperio XML).
    """

    rings: tuple[np.ndarray, ...]  # each (K, 2) float, x then y
    offset: float = 0.0

    def rasterize(self, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        for ring in self.rings:
            if len(ring) < 3:
                continue
            rows, cols = fill_polygon(
                ring[:, 1] - self.offset, ring[:, 0] - self.offset, shape=(height, width)
            )
            mask[rows, cols] = True
        return mask


@dataclass(frozen=True, eq=False)
class RunLength:
    """One instance as a COCO RLE: uncompressed counts or the compressed string."""

    counts: tuple[int, ...] | str
    height: int
    width: int

    def rasterize(self, height: int, width: int) -> np.ndarray:
        if (height, width) != (self.height, self.width):
            raise ValueError(f"RLE size {self.height}x{self.width} differs from the image {height}x{width}")
        return decode_rle(self.counts, height, width)


Shape = Polygons | RunLength


def flat_to_ring(coords: Sequence[float]) -> np.ndarray:
    """COCO's flat [x0, y0, x1, y1, ...] list -> (K, 2) array."""
    values = np.asarray(coords, dtype=np.float64)
    if values.size % 2:
        raise ValueError(f"polygon has an odd number of coordinates ({values.size})")
    return values.reshape(-1, 2)
