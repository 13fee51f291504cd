"""Synthetic, labelled, medical-looking images for tests, demos and training the default model.

Kinds: ``nuclei`` (fluorescence), ``ultrasound`` (breast B-mode), ``ct`` (abdominal slices, HU),
``endoscopy`` (colonoscopy), ``dermoscopy``, ``ct3d`` (abdominal volumes, HU) and ``video``
(colonoscopy clips). Every case is deterministic in (kind, seed, index, size).

    cases = generate("ultrasound", n=20, seed=0)
    write_phantom_dataset("phantoms/ultrasound", "ultrasound", n=20, seed=0)
"""

from medsam3.data.phantoms.common import PhantomCase, PhantomKind
from medsam3.data.phantoms.registry import KINDS, generate, get_kind
from medsam3.data.phantoms.writer import instance_counts, write_phantom_dataset, write_phantoms

__all__ = [
    "KINDS",
    "PhantomCase",
    "PhantomKind",
    "generate",
    "get_kind",
    "instance_counts",
    "write_phantom_dataset",
    "write_phantoms",
]
