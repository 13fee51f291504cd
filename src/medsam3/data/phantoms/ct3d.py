"""Small abdominal CT volumes in HU with anisotropic voxels (thick slices), stored as NIfTI.

The same analytic abdomen as the 2D slices (:mod:`medsam3.data.phantoms.abdomen`), rendered on a
stack of planes, so organs and tumours are smooth across slices and come and go along z the way
they do in a real scan (kidneys low, spleen and liver dome high).
"""

from __future__ import annotations

import numpy as np

from medsam3.data.phantoms.abdomen import CONCEPTS, Z_RANGE_MM, render, sample_abdomen
from medsam3.data.phantoms.common import PhantomCase, PhantomKind

DEPTH = 24


def make_ct3d(rng: np.random.Generator, size: int, depth: int = DEPTH) -> PhantomCase:
    """One volume, (depth, size, size) int16 HU; spacing (z, y, x) mm with z much coarser than x, y."""
    abdomen = sample_abdomen(rng, gap_mm=12.0)
    fov = max(abdomen.body_axes) * 2 * rng.uniform(1.08, 1.2)
    pixel = fov / size
    span = Z_RANGE_MM[1] - Z_RANGE_MM[0]
    slice_mm = round(span / depth, 2)
    z = Z_RANGE_MM[0] + (np.arange(depth) + 0.5) * slice_mm
    image, label = render(abdomen, rng, z, (size, size), pixel)
    return PhantomCase(
        case_id="",
        image=image,
        label=label,
        spacing=(slice_mm, pixel, pixel),
        meta={
            "phase": abdomen.phase,
            "tumors_placed": len(abdomen.tumors),
            "window": {"center": 40, "width": 400},
        },
    )


KIND = PhantomKind(
    name="ct3d",
    concepts=CONCEPTS,
    modality="CT",
    channel_names={"0": "CT"},
    file_ending=".nii.gz",
    default_size=96,
    make=make_ct3d,
    description="Abdominal CT volumes in HU (24 slices of 6.25 mm, in-plane ~3.5-4.5 mm at 96 px, LPS): "
    "liver, spleen, kidneys and liver tumours smooth across slices. Liver label excludes tumour pixels.",
)
