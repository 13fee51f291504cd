"""The real tumour test slices under each intensity window a user may pick: a window-robustness test.

``radiomics-tumor`` maps each volume to 8 bits once (CT: the lung window; MR: the volume's 0.5-99.5
percentiles). A viewer user picks another window. ``build_window_sets(out)`` writes the same test
slices (the benchmark's ``z0 + 4k + 2`` rule and its negatives) once per window, one test-only
nnU-Net folder each: CT under every viewer preset, MR under several percentile windows. A model is
robust to windowing when its Dice on each folder stays near the default one's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from medsam3.data import real_sets as rsets
from medsam3.data.dense_sets import ct_mappings, mr_mappings
from medsam3.data.examples import PYRADIOMICS, default_cache_dir
from medsam3.data.real_sets import (
    RADIOMICS_CASES,
    SetSpec,
    Slice2D,
    _slice_info,
    axial,
    radiomics_raw,
    tumour_slices,
    write_set,
)

#: The CT windows tested (the viewer's presets) and the MR percentile windows; the first is each
#: modality's default in ``radiomics-tumor``.
CT_TEST_WINDOWS = ("lung", "abdomen", "soft_tissue", "mediastinum", "bone", "brain")
MR_TEST_PERCENTILES = ((0.5, 99.5), (1.0, 99.0), (2.0, 98.0), (0.0, 100.0))


def window_names() -> list[str]:
    """One name per window folder, in order: CT presets, then MR percentile windows."""
    return [f"ct-{w}" for w in CT_TEST_WINDOWS] + [f"mr-p{a:g}-{b:g}" for a, b in MR_TEST_PERCENTILES]


def build_window_sets(out_dir: str | Path, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Write one test-only folder per window under ``out_dir``; returns window name -> folder."""
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = rsets.fetch_sources(cache)
    concepts = {concept: value for concept, value, _ in RADIOMICS_CASES.values()}
    specs = {
        name: SetSpec(
            f"window-{name}",
            concepts,
            "MR/CT",
            description=f"radiomics-tumor's test slices under the window {name} (see medsam3.data.window_sets)",
            reference="https://pypi.org/project/pyradiomics/3.0.1/ (sdist, data/*.nrrd)",
            licence="distributed with pyradiomics (BSD-3-Clause)",
            split_rule="test only: radiomics-tumor's test slices and negatives",
        )
        for name in window_names()
    }
    with tempfile.TemporaryDirectory(prefix="medsam3-windows-") as scratch:
        for case, (_, value, modality) in RADIOMICS_CASES.items():
            image, raw, mask = radiomics_raw(case, sources.members[PYRADIOMICS.spec], Path(scratch))
            positives, negatives = tumour_slices(mask)
            labels = mask.astype("uint8") * value
            if modality == "CT":
                mapped = {f"ct-{w}": pixels for w, pixels in ct_mappings(raw, CT_TEST_WINDOWS).items()}
            else:
                mapped = {f"mr-{w}": pixels for w, pixels in mr_mappings(raw, MR_TEST_PERCENTILES).items()}
            modality_names = list(mapped)
            for name in modality_names:
                for z in sorted(positives["test"] + negatives["test"]):
                    info = _slice_info(f"data/{case}_image.nrrd", "axial", z, image) | {"modality": modality}
                    specs[name].slices.append(
                        Slice2D(f"{case}_z{z:03d}", "test", axial(mapped[name], z), axial(labels, z), info)
                    )
    return {name: write_set(out, spec) for name, spec in specs.items()}
