"""Few-shot fine-tuning tasks on real MR: concepts the bundled model never saw, <= 16 training slices.

``build_fewshot_sets(out_dir)`` writes, per task, an nnU-Net v2 2D folder ``fewshot-<slug>``
(axial ``imagesTr`` / ``imagesTs``) and ``fewshot-<slug>-coronal`` (test only: the view training
never shows). Image: the MNI152 2009a symmetric T1 template (nilearn 0.14.1). Labels: atlases in
FSL's MNI152 space from Debian's ``mricron-data``, put on the template grid through the affines,
nearest neighbour, as :mod:`medsam3.data.real_sets` does for the JHU tracts (the two MNI templates
are different averages and differ by a few mm: the labels are a few mm off in places), then kept
inside the template's brain (:func:`inside_brain`).

Tasks (none is in the bundled ``lite``'s vocabulary, none is a reserved concept):
- "external capsule", "superior longitudinal fasciculus": JHU ICBM-DTI-81 white-matter labels (names from the
  atlas' ``.nii.txt``, both sides);
- "insular cortex", "precentral gyrus": Harvard-Oxford cortical maximum-probability atlas (thr0,
  1 mm). The package ships no name list for it; the label values follow FSL's published order
  (1 = frontal pole ... 48 = occipital pole), which ``check_harvard_oxford_order`` verifies on the
  volume itself (frontal pole most anterior, occipital pole most posterior, precentral gyrus in
  front of postcentral gyrus, insula centred left-right) before anything is written. Its header in
  this package lacks the grid's origin (origin (-90, 0, 0)); it is FSL's 182x218x182 1 mm MNI152
  grid like the JHU atlas beside it, so the JHU file's geometry is used for it.

Splits per task, along the concept's own inferior-superior extent ``[z0, z1]`` (the slices where
it covers at least 10% of its largest cross-section, so no slice shows only a sliver): train = 16 (or
fewer) evenly spaced slices, test = the slices halfway between neighbouring train slices (at least
2 mm from any train slice), unseen view = up to 16 evenly spaced coronal slices over the concept's
anterior-posterior extent. Every slice holds the concept (a few-shot user labels what they see).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medsam3.data import real_sources as rs
from medsam3.data.examples import default_cache_dir, pip_download, read_members
from medsam3.data.real_sets import (
    SetSpec,
    Slice2D,
    _read_image,
    _slice_info,
    axial,
    coronal,
    lps_array,
    write_set,
)
from medsam3.errors import DatasetError

HARVARD_OXFORD = rs._TEMPLATES + "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz"
ATLASES = rs.DebPackage(
    name=rs.MRICRON_DATA.name,
    version=rs.MRICRON_DATA.version,
    sha256=rs.MRICRON_DATA.sha256,
    files={
        **rs.MRICRON_DATA.files,
        HARVARD_OXFORD: "12f6298b07ec9a7cc70b9ad88f944aedef714fb46ca057a4fa4284c8e6d8f179",
    },
)
#: FSL's Harvard-Oxford cortical labels used here (value in the maxprob volume -> name).
HO_LABELS = {
    1: "frontal pole",
    2: "insular cortex",
    7: "precentral gyrus",
    17: "postcentral gyrus",
    48: "occipital pole",
}
MAX_TRAIN = 16
MAX_CORONAL = 16


@dataclass(frozen=True)
class FewShotTask:
    concept: str
    atlas: str  # "jhu" or "ho"
    words: str  # JHU: words of the label names; HO: unused
    values: tuple[int, ...] = ()  # HO label values

    @property
    def slug(self) -> str:
        return self.concept.replace(" ", "-")


TASKS = (
    FewShotTask("external capsule", "jhu", "external_capsule"),
    FewShotTask("superior longitudinal fasciculus", "jhu", "superior_longitudinal_fasciculus"),
    FewShotTask("insular cortex", "ho", "", (2,)),
    FewShotTask("precentral gyrus", "ho", "", (7,)),
)


def check_harvard_oxford_order(ho: np.ndarray) -> None:
    """Refuse a Harvard-Oxford volume whose label values do not follow FSL's order (LPS array:
    axis 1 runs anterior -> posterior, axis 2 right -> left)."""

    def centre(value: int) -> np.ndarray:
        where = np.argwhere(ho == value)
        if where.size == 0:
            raise DatasetError(f"{HARVARD_OXFORD}: label {value} ({HO_LABELS[value]}) is missing")
        return where.mean(axis=0)

    c = {v: centre(v) for v in HO_LABELS}
    y = {v: c[v][1] for v in c}
    checks = [
        (y[1] == min(y.values()), "frontal pole (1) is not the most anterior label"),
        (y[48] == max(y.values()), "occipital pole (48) is not the most posterior label"),
        (y[7] < y[17], "precentral gyrus (7) is not in front of postcentral gyrus (17)"),
        (abs(c[2][2] - ho.shape[2] / 2) < 0.1 * ho.shape[2], "insular cortex (2) is not centred left-right"),
    ]
    for ok, problem in checks:
        if not ok:
            raise DatasetError(f"{HARVARD_OXFORD}: label order is not FSL's: {problem}")


def _even(first: int, last: int, count: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(first, last, count)})


def inside_brain(labels: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """The label voxels where the template shows brain.

    nilearn's template is brain-extracted (exactly 0 outside the brain), and an atlas drawn on
    another MNI average overhangs it by a few mm at the cortex: before this, 11% of the precentral
    gyrus's label voxels (78% on its topmost test slice, all of one training slice that shows no
    brain at all) lay on black background, where no image evidence can place them. The white-matter
    tracts and the insular cortex lie inside the brain and are unchanged.
    """
    return (labels.astype(bool) & (t1 > 0)).astype(np.uint8)


def task_sets(task: FewShotTask, t1_lps: sitk.Image, t1: np.ndarray, labels: np.ndarray) -> tuple[SetSpec, SetSpec]:
    """The axial train/test set and the coronal test set of one task (``labels``: 1 = the concept),
    labels kept inside the template's brain (:func:`inside_brain`)."""
    labels = inside_brain(labels, t1)
    z_area, y_area = labels.sum(axis=(1, 2)), labels.sum(axis=(0, 2))
    z_any = np.flatnonzero(z_area >= 0.1 * z_area.max())  # slices that show more than a sliver of it
    y_any = np.flatnonzero(y_area >= 0.1 * y_area.max())
    if z_any.size < 4:
        raise DatasetError(f"few-shot task '{task.concept}': the label spans {z_any.size} axial slices")
    z0, z1 = int(z_any[0]), int(z_any[-1])
    train = _even(z0 + 1, z1 - 1, min(MAX_TRAIN, (z1 - z0) // 4 + 1))
    test = sorted({(a + b) // 2 for a, b in zip(train, train[1:]) if b - a >= 4})
    coronal_y = _even(int(y_any[0]) + 1, int(y_any[-1]) - 1, MAX_CORONAL)
    source = rs.NILEARN_T1.rsplit("/", 1)[-1]
    common = dict(
        description=f"MNI152 2009a T1 template (nilearn) with '{task.concept}' from "
        + ("the JHU ICBM-DTI-81 labels" if task.atlas == "jhu" else "the Harvard-Oxford cortical atlas")
        + " (Debian mricron-data), placed through the affines, nearest neighbour; the two MNI templates "
        "differ by a few mm; labels kept inside the template's brain (nonzero voxels).",
        reference=f"{rs.NILEARN.spec}; {rs.MRICRON_DATA.spec}",
        licence="nilearn BSD-3-Clause; mricron-data: see its debian/copyright",
        extra={"sources": [rs.NILEARN.spec, rs.MRICRON_DATA.spec], "task": task.concept},
    )
    concepts = {task.concept: 1}
    axial_set = SetSpec(
        f"fewshot-{task.slug}",
        concepts,
        "MR",
        split_rule=f"axial: the concept spans z {z0}..{z1}; train {len(train)} evenly spaced slices {train}, "
        f"test the slices halfway between ({len(test)})",
        **common,
    )
    for split, indices in (("train", train), ("test", test)):
        for z in indices:
            axial_set.slices.append(
                Slice2D(f"z{z:03d}", split, axial(t1, z), axial(labels, z), _slice_info(source, "axial", z, t1_lps))
            )
    coronal_set = SetSpec(
        f"fewshot-{task.slug}-coronal",
        concepts,
        "MR",
        split_rule=f"test only: {len(coronal_y)} coronal slices over the concept's anterior-posterior extent",
        **common,
    )
    for y in coronal_y:
        coronal_set.slices.append(
            Slice2D(f"y{y:03d}", "test", coronal(t1, y), coronal(labels, y), _slice_info(source, "coronal", y, t1_lps))
        )
    return axial_set, coronal_set


def build_fewshot_sets(out_dir: str | Path, cache_dir: str | Path | None = None) -> dict[str, dict[str, Path]]:
    """Write every task's folders; returns {concept: {"axial": folder, "coronal": folder}}."""
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    nilearn = read_members(rs.NILEARN, pip_download(rs.NILEARN, cache))
    atlases = rs.read_deb_members(ATLASES, rs.apt_download(ATLASES, cache))
    written: dict[str, dict[str, Path]] = {}
    with tempfile.TemporaryDirectory(prefix="medsam3-fewshot-") as scratch:
        t1_image = _read_image(rs.NILEARN_T1, nilearn[rs.NILEARN_T1], Path(scratch))
        t1_lps = sitk.DICOMOrient(t1_image, "LPS")
        t1 = sitk.GetArrayFromImage(t1_lps)

        def on_t1(member: str, like: sitk.Image | None = None) -> np.ndarray:
            image = _read_image(member, atlases[member], Path(scratch))
            if like is not None:  # the same FSL 1 mm grid, with a header that lacks its geometry
                if image.GetSize() != like.GetSize():
                    raise DatasetError(f"{member}: grid {image.GetSize()} is not FSL's {like.GetSize()}")
                image.CopyInformation(like)
            moved = sitk.Resample(image, t1_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
            return lps_array(moved)

        jhu_image = _read_image(rs.JHU_LABELS, atlases[rs.JHU_LABELS], Path(scratch))
        jhu, ho = on_t1(rs.JHU_LABELS), on_t1(HARVARD_OXFORD, like=jhu_image)
        check_harvard_oxford_order(ho)
        names = rs.parse_label_names(atlases[rs.JHU_NAMES].decode("utf-8"))
        for task in TASKS:
            if task.atlas == "jhu":
                values = tuple(v for v, n in names.items() if task.words in n.lower().split("_(")[0])
                if not values:
                    raise DatasetError(f"{rs.JHU_NAMES}: no label named like '{task.words}'")
                labels = np.isin(jhu, values).astype(np.uint8)
            else:
                labels = np.isin(ho, task.values).astype(np.uint8)
            axial_set, coronal_set = task_sets(task, t1_lps, t1, labels)
            written[task.concept] = {"axial": write_set(out, axial_set), "coronal": write_set(out, coronal_set)}
    return written
