"""Dense training sets for the bundled model: every slice the real sets' test splits leave free.

The benchmark sets of :mod:`medsam3.data.real_sets` train on every 4th slice so that their test
slices sit 2 slices from any training slice. Pretraining the bundled ``lite`` wants all the
labelled data it may have: here every slice of the same source volumes that is **not** a test slice
(nor a reserved file) is a training slice, under the intensity mappings a user meets:

- MNI T1 (tissue and tracts): axial slices of each set's range except its test slices, plus sagittal
  slices (a third view; the coronal test view stays untrained), each as stored and contrast-stretched
  to the brain's 1-99th percentiles (what an automatic MR window gives);
- pyradiomics tumours: every non-test slice from 3 slices below the tumour to 3 above; CT under
  every viewer window preset, MR under four percentile windows (min-max included).

Because every view and every mapping of a slice is a different picture, each is its own case and
its own feature-cache entry. The test splits of the benchmark sets never appear here; test slices
have train slices 1 slice away here (not 2), which makes the axial test scores of a model trained
on these sets optimistic: the coronal sets, the other-patient tumour set and the held-out concept
stay the honest measures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from medsam3.data import real_sources as rs
from medsam3.data.examples import PYRADIOMICS, default_cache_dir
from medsam3.data.real_sets import (
    OFFSET,
    RADIOMICS_CASES,
    STEP,
    TISSUE,
    TRACTS,
    SetSpec,
    Slice2D,
    _extent,
    _slice_info,
    axial,
    fetch_sources,
    interleave,
    middle_range,
    mni_volumes,
    radiomics_raw,
    to_uint8,
    tumour_slices,
    write_set,
)
from medsam3.data.windowing import WINDOW_PRESETS

#: CT windows each CT training slice is written under: every viewer preset ("abdomen" is its default),
#: so that a user's window choice does not change the answer.
CT_WINDOWS = ("lung", "abdomen", "bone", "brain", "soft_tissue", "mediastinum", "liver")
#: MR percentile windows each MR tumour slice is written under; 0-100 is a plain min-max export, the
#: mapping a naive PNG conversion gives (stage 4, never trained on it, lost the breast lesion there).
MR_PERCENTILES = ((0.5, 99.5), (2.0, 98.0), (0.0, 100.0), (1.0, 99.0))
TUMOUR_MARGIN = 3  # slices beyond the tumour's ends kept as negatives
SAGITTAL_STEP = 3
DENSE_FOLDERS = ("dense-mni-tissue", "dense-mni-tracts", "dense-radiomics-tumor")


def sagittal(volume: np.ndarray, x: int) -> np.ndarray:
    """Superior at the top, anterior on the left."""
    return np.ascontiguousarray(volume[::-1, :, x])


def free_slices(start: int, stop: int) -> list[int]:
    """Every slice of [start, stop) that the benchmark's test rule (start + 4k + 2) does not take."""
    _, test = interleave(start, stop)
    taken = set(test)
    return [z for z in range(start, stop) if z not in taken]


def _stretch(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    low, high = (float(v) for v in np.percentile(t1[brain], [1.0, 99.0]))
    return to_uint8(t1, low, high)


def _mni_spec(
    name: str,
    volumes,
    labels: np.ndarray,
    concepts: dict[str, int],
    z_range: tuple[int, int],
    x_range: tuple[int, int],
) -> SetSpec:
    brain = volumes.t1 > 0
    mappings = {"stored": volumes.t1, "p1-99": _stretch(volumes.t1, brain)}
    spec = SetSpec(
        name,
        concepts,
        "MR",
        description="Dense training slices of the MNI152 2009a T1 template (see medsam3.data.dense_sets).",
        reference="nilearn 0.14.1; Debian mricron-data (JHU labels)",
        licence="nilearn BSD-3-Clause; mricron-data: see its debian/copyright",
        split_rule=(
            f"train only: axial z in [{z_range[0]}, {z_range[1]}) except the benchmark's test slices "
            f"(z = {z_range[0]} + {STEP}k + {OFFSET}); sagittal x = {x_range[0]} + {SAGITTAL_STEP}k below "
            f"{x_range[1]}; each as stored and stretched to the brain's 1-99th percentiles"
        ),
    )
    source = rs.NILEARN_T1.rsplit("/", 1)[-1]
    for tag, pixels in mappings.items():
        for z in free_slices(*z_range):
            info = _slice_info(source, "axial", z, volumes.t1_lps) | {"intensity": tag}
            spec.slices.append(Slice2D(f"mni_{tag}_axial_z{z:03d}", "train", axial(pixels, z), axial(labels, z), info))
        for x in range(x_range[0], x_range[1], SAGITTAL_STEP):
            if not labels[:, :, x].any():
                continue
            info = {"source": source, "view": "sagittal", "index": int(x), "intensity": tag}
            spec.slices.append(
                Slice2D(f"mni_{tag}_sagittal_x{x:03d}", "train", sagittal(pixels, x), sagittal(labels, x), info)
            )
    return spec


def dense_mni_specs(volumes) -> list[SetSpec]:
    """Tissue and tracts, with the same slice ranges as the benchmark sets (so their test slices stay out)."""
    brain = volumes.t1 > 0
    z_tissue = middle_range(*_extent(brain.any(axis=(1, 2))), 0.6)
    x_brain = middle_range(*_extent(brain.any(axis=(0, 1))), 0.6)
    tracts = volumes.tracts > 0
    z_first, z_last = _extent(tracts.any(axis=(1, 2)))
    z_tracts = (max(0, z_first - 4), min(volumes.t1.shape[0], z_last + 5))
    return [
        _mni_spec("dense-mni-tissue", volumes, volumes.tissue, dict(TISSUE), z_tissue, x_brain),
        _mni_spec(
            "dense-mni-tracts", volumes, volumes.tracts, {c: v for c, (v, _) in TRACTS.items()}, z_tracts, x_brain
        ),
    ]


def ct_mappings(raw: np.ndarray, windows: tuple[str, ...] = CT_WINDOWS) -> dict[str, np.ndarray]:
    """HU -> 8 bits under each named window preset: preset name -> pixels."""
    out = {}
    for name in windows:
        center, width = WINDOW_PRESETS[name]
        out[name] = to_uint8(raw, center - width / 2, center + width / 2)
    return out


def mr_mappings(
    raw: np.ndarray, percentiles: tuple[tuple[float, float], ...] = MR_PERCENTILES
) -> dict[str, np.ndarray]:
    """MR -> 8 bits between each pair of the volume's percentiles: "pLOW-HIGH" -> pixels."""
    return {
        f"p{low:g}-{high:g}": to_uint8(raw, *(float(v) for v in np.percentile(raw, [low, high])))
        for low, high in percentiles
    }


def dense_tumour_spec(members: dict[str, bytes], scratch: Path) -> SetSpec:
    concepts = {concept: value for concept, value, _ in RADIOMICS_CASES.values()}
    spec = SetSpec(
        "dense-radiomics-tumor",
        concepts,
        "MR/CT",
        description="Dense training slices of the pyradiomics 3.0.1 tumour volumes (see medsam3.data.dense_sets).",
        reference="https://pypi.org/project/pyradiomics/3.0.1/ (sdist, data/*.nrrd)",
        licence="distributed with pyradiomics (BSD-3-Clause)",
        split_rule=(
            f"train only: per case every slice from {TUMOUR_MARGIN} below the first tumour slice z0 to "
            f"{TUMOUR_MARGIN} above the last, except the benchmark's test slices (z0 + {STEP}k + {OFFSET} "
            f"and its negatives); CT under the windows {', '.join(CT_WINDOWS)}, MR under percentile windows "
            f"{', '.join(f'{a:g}-{b:g}' for a, b in MR_PERCENTILES)}"
        ),
    )
    for case, (_, value, modality) in RADIOMICS_CASES.items():
        image, raw, mask = radiomics_raw(case, members, scratch)
        positives, negatives = tumour_slices(mask)
        taken = set(positives["test"]) | set(negatives["test"])
        first, last = _extent(mask.any(axis=(1, 2)))
        chosen = [
            z for z in range(max(0, first - TUMOUR_MARGIN), min(len(mask), last + TUMOUR_MARGIN + 1)) if z not in taken
        ]
        labels = mask.astype(np.uint8) * value
        mappings = ct_mappings(raw) if modality == "CT" else mr_mappings(raw)
        for tag, pixels in mappings.items():
            for z in chosen:
                info = _slice_info(f"data/{case}_image.nrrd", "axial", z, image) | {
                    "modality": modality,
                    "intensity": tag,
                }
                spec.slices.append(
                    Slice2D(f"{case}_{tag}_z{z:03d}", "train", axial(pixels, z), axial(labels, z), info)
                )
    return spec


def build_dense_train_sets(out_dir: str | Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Write the dense training sets (nnU-Net 2D layout, ``imagesTr`` only) under ``out_dir``."""
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = fetch_sources(cache)
    with tempfile.TemporaryDirectory(prefix="medsam3-dense-") as scratch:
        volumes = mni_volumes(sources.members[rs.NILEARN.spec], sources.jhu, Path(scratch))
        specs = dense_mni_specs(volumes)
        specs.append(dense_tumour_spec(sources.members[PYRADIOMICS.spec], Path(scratch)))
    for spec in specs:
        spec.extra = {"sources": list(sources.provenance)}
    return [write_set(out, spec) for spec in specs]
