"""Axial abdominal CT slices in Hounsfield units (int16), stored as NIfTI with their pixel spacing.

A slice is one plane through a random abdomen (see :mod:`medsam3.data.phantoms.abdomen`) at a
random level between the kidneys' lower poles and the liver dome, so organs come and go between
cases (some slices have no kidney, some no spleen: negatives for those concepts). Liver tumours
are placed across the chosen plane in about two thirds of the cases.
"""

from __future__ import annotations

import numpy as np

from medsam3.data.phantoms.abdomen import CONCEPTS, render, sample_abdomen
from medsam3.data.phantoms.common import PhantomCase, PhantomKind

SLICE_THICKNESS_MM = 5.0


def make_ct(rng: np.random.Generator, size: int) -> PhantomCase:
    """One axial slice, (1, size, size) int16 HU; spacing (thickness, pixel, pixel) mm."""
    level = float(rng.uniform(30.0, 135.0))
    abdomen = sample_abdomen(rng, tumor_z=level, gap_mm=8.0)
    fov = max(abdomen.body_axes) * 2 * rng.uniform(1.08, 1.2)  # reconstruction field of view
    pixel = fov / size
    image, label = render(abdomen, rng, np.array([level]), (size, size), pixel)
    return PhantomCase(
        case_id="",
        image=image,
        label=label,
        spacing=(SLICE_THICKNESS_MM, pixel, pixel),
        meta={"phase": abdomen.phase, "z_mm": round(level, 1), "window": {"center": 40, "width": 400}},
    )


KIND = PhantomKind(
    name="ct",
    concepts=CONCEPTS,
    modality="CT",
    channel_names={"0": "CT"},
    file_ending=".nii.gz",
    default_size=128,
    make=make_ct,
    description="Axial abdominal CT slices in HU (one slice per NIfTI, shape 1xHxW, LPS): body wall, "
    "liver, spleen, kidneys, spine, vessels, bowel gas; hypodense liver tumours. "
    "Liver label excludes tumour pixels.",
)
