"""Vector and run-length annotations turned into pixel masks (COCO polygons and RLE, Aperio XML).

The COCO RLE decoder is our own, written from the format's description: counts alternate
background/foreground runs starting with background, in column-major (Fortran) pixel order; the
compressed string form stores each count in 5-bit groups offset by 48 (ASCII '0'), with a
continuation bit, a sign bit, and every count after the second stored as a difference from the
count two places before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage.draw import polygon as fill_polygon


def decode_rle_string(text: str) -> list[int]:
    """COCO's compressed RLE string -> the list of run lengths."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value = 0
        shift = 0
        while True:
            if pos >= len(text):
                raise ValueError("compressed RLE string ends in the middle of a count")
            chunk = ord(text[pos]) - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"invalid character {text[pos]!r} in compressed RLE string")
            pos += 1
            value |= (chunk & 0x1F) << shift
            shift += 5
            if not chunk & 0x20:
                if chunk & 0x10:
                    value |= -1 << shift  # sign-extend a negative difference
                break
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(counts: Sequence[int] | str | bytes, height: int, width: int) -> np.ndarray:
    """A COCO RLE (uncompressed list or compressed string) -> (H, W) bool mask."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = decode_rle_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    total = height * width
    if any(r < 0 for r in runs):
        raise ValueError("RLE has a negative run length")
    if sum(runs) != total:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels but the mask has {height}x{width} = {total}")
    flat = np.zeros(total, dtype=bool)
    pos = 0
    for i, run in enumerate(runs):
        if i % 2:
            flat[pos : pos + run] = True
        pos += run
    return flat.reshape((height, width), order="F")


def encode_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> uncompressed COCO RLE counts (column-major, starting with background)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


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
