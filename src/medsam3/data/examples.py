"""Real labelled medical images, fetched by package name from PyPI and written in the nnU-Net layout.

Two Python packages ship real, labelled data inside their distributions:

- ``stardist==0.9.2`` (wheel): ``stardist/data/images/img2d.tif``, a 512x512 16-bit fluorescence
  image from the 2018 Data Science Bowl, with ``mask2d.tif``, one id per nucleus.
- ``pyradiomics==3.0.1`` (sdist only): ``data/{brain1,brain2,breast1,lung1,lung2}_{image,label}.nrrd``,
  MR brain with tumour, MR breast with lesion, CT chest with lung tumour, binary labels on the
  image grid.

``pip download`` fetches the archives (so the user's index, proxy and certificates apply); they
are kept in a cache, so a second call needs no network. Each data file is checked against its
known SHA-256 before use. Output, one nnU-Net dataset per concept under ``out_dir``::

    nuclei_dsb2018/      cell nucleus    2D TIFF; labelsTr semantic, instancesTr one id per nucleus
    brain_tumor_mr/      brain tumor     NIfTI volumes, geometry of the NRRD kept
    breast_lesion_mr/    breast lesion
    lung_tumor_ct/       lung tumor      (HU)
    examples.json        sources, checksums and measured statistics of every case
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from medsam3.data.masks import label_components
from medsam3.errors import DatasetError, InputFileError
from medsam3.utils.files import atomic_dir, write_json_atomic

MARKER = "medsam3_example"


@dataclass(frozen=True)
class Package:
    """A distribution on the package index and the data files inside it."""

    spec: str
    pip_args: tuple[str, ...]
    archive_glob: str
    files: dict[str, str]  # member path inside the archive -> sha256 of its content


STARDIST = Package(
    spec="stardist==0.9.2",
    # The data is the same in every wheel: pin one platform so any machine can fetch it without a
    # compiler (the sdist would need one).
    pip_args=("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"),
    archive_glob="stardist-0.9.2-*.whl",
    files={
        "stardist/data/images/img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
        "stardist/data/images/mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
    },
)

_RADIOMICS_SHA = {
    "brain1_image": "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
    "brain1_label": "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
    "brain2_image": "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
    "brain2_label": "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
    "breast1_image": "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2",
    "breast1_label": "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950",
    "lung1_image": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung1_label": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
    "lung2_image": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    "lung2_label": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
}
PYRADIOMICS = Package(
    spec="pyradiomics==3.0.1",
    # Only the sdist holds data/. Preparing its metadata runs setup.py, which imports numpy: use
    # this environment (which has numpy) instead of an isolated build environment (which has not).
    pip_args=("--no-binary", ":all:", "--no-build-isolation"),
    archive_glob="pyradiomics-3.0.1.tar.gz",
    files={f"pyradiomics-3.0.1/data/{name}.nrrd": sha for name, sha in _RADIOMICS_SHA.items()},
)


@dataclass(frozen=True)
class VolumeDataset:
    """One output dataset built from pyradiomics volumes."""

    folder: str
    concept: str
    channel: str
    cases: tuple[str, ...]
    description: str


VOLUME_DATASETS = (
    VolumeDataset(
        "brain_tumor_mr", "brain tumor", "MR", ("brain1", "brain2"), "MR brain volumes with a tumour"
    ),
    VolumeDataset("breast_lesion_mr", "breast lesion", "MR", ("breast1",), "MR breast volume with a lesion"),
    VolumeDataset(
        "lung_tumor_ct", "lung tumor", "CT", ("lung1", "lung2"), "CT chest volumes (HU) with a tumour"
    ),
)


class ExampleDownloadError(DatasetError):
    """pip could not fetch an example package; ``network`` says whether the index looked unreachable."""

    def __init__(self, spec: str, reason: str, network: bool):
        self.spec = spec
        self.network = network
        super().__init__(f"could not download {spec} with pip: {reason}")


_NETWORK_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeout",
    "ReadTimeout",
    "Connection refused",
    "ProxyError",
    "(from versions: none)",
)


def default_cache_dir() -> Path:
    """``$MEDSAM3_CACHE`` or ``$XDG_CACHE_HOME/medsam3`` or ``~/.cache/medsam3``, plus ``examples``."""
    root = (
        os.environ.get("MEDSAM3_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medsam3"
    )
    return Path(root) / "examples"


def pip_download(package: Package, cache_dir: Path) -> Path:
    """The package's archive in ``cache_dir``, downloaded with ``pip download`` if not cached yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(package.archive_glob))
    if cached:
        return cached[0]
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=cache_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--no-input", "--dest", tmp, *package.pip_args, package.spec]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise ExampleDownloadError(package.spec, "pip took more than 15 minutes", network=True) from None
        found = sorted(Path(tmp).glob(package.archive_glob))
        if done.returncode != 0 or not found:
            raise _download_error(package.spec, done.stdout + done.stderr)
        target = cache_dir / found[0].name
        os.replace(found[0], target)
        return target


def _download_error(spec: str, output: str) -> ExampleDownloadError:
    network = any(sign in output for sign in _NETWORK_SIGNS)
    if network:
        return ExampleDownloadError(spec, "the package index is unreachable (offline? proxy?)", network=True)
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR")]
    last = errors[-1] if errors else (output.strip().splitlines() or ["pip gave no output"])[-1]
    return ExampleDownloadError(spec, last[:300], network=False)


def read_members(package: Package, archive: Path) -> dict[str, bytes]:
    """The package's data files, by member path, each checked against its SHA-256."""
    wanted = set(package.files)
    found: dict[str, bytes] = {}
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                names = set(zf.namelist())
                found = {name: zf.read(name) for name in wanted & names}
        else:
            with tarfile.open(archive, "r:gz") as tf:
                for member in tf:
                    if member.name in wanted and member.isfile():
                        handle = tf.extractfile(member)
                        if handle is not None:
                            found[member.name] = handle.read()
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        archive.unlink(missing_ok=True)  # a broken cache entry: the next call downloads again
        raise InputFileError(
            archive, f"cannot read the cached archive ({exc}); it was removed, run again"
        ) from None
    missing = sorted(wanted - set(found))
    if missing:
        raise InputFileError(archive, f"archive lacks {', '.join(missing)}")
    for name in package.files:  # a fixed order, so the first bad file named is always the same
        digest = hashlib.sha256(found[name]).hexdigest()
        if digest != package.files[name]:
            archive.unlink(missing_ok=True)
            raise InputFileError(
                archive, f"{name} has SHA-256 {digest[:12]}..., expected {package.files[name][:12]}..."
            )
    return found


@dataclass
class _Written:
    """What one output dataset holds, for examples.json."""

    folder: str
    concept: str
    source: str
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)


def fetch_examples(out_dir: str | Path, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Fetch the real example cases and write them under ``out_dir``; returns the examples.json content."""
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir}: exists and is not a folder")
    for name in ("nuclei_dsb2018", *(d.folder for d in VOLUME_DATASETS)):
        _refuse_foreign(out_dir / name)

    stardist = read_members(STARDIST, pip_download(STARDIST, cache))
    radiomics = read_members(PYRADIOMICS, pip_download(PYRADIOMICS, cache))
    written = [write_nuclei_dataset(out_dir / "nuclei_dsb2018", stardist)]
    for dataset in VOLUME_DATASETS:
        written.append(write_volume_dataset(out_dir / dataset.folder, dataset, radiomics))
    index = {
        MARKER: 1,
        "datasets": {w.folder: {"concept": w.concept, "source": w.source, "cases": w.cases} for w in written},
    }
    write_json_atomic(out_dir / "examples.json", index)
    return index


def _refuse_foreign(folder: Path) -> None:
    """Only an absent or empty folder, or one this module wrote, may be replaced."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    try:
        if MARKER in json.loads((folder / "dataset.json").read_text(encoding="utf-8")):
            return
    except (OSError, ValueError):
        pass
    raise DatasetError(f"{folder}: exists and was not written by fetch-examples; refusing to replace it")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_nuclei_dataset(folder: Path, members: dict[str, bytes]) -> _Written:
    """The stardist nuclei image as a 2D nnU-Net dataset with a semantic map and an instance map."""
    image_name, mask_name = "stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"
    image = tifffile.imread(io.BytesIO(members[image_name]))
    instances = tifffile.imread(io.BytesIO(members[mask_name]))
    if image.shape != instances.shape:
        raise InputFileError(
            mask_name, f"mask shape {instances.shape} differs from image shape {image.shape}"
        )
    instances, _, _ = relabel_sequential(instances.astype(np.int32))
    instances = instances.astype(np.uint16)
    semantic = (instances > 0).astype(np.uint8)
    stats = nuclei_statistics(image, instances)
    case = "dsb2018_0000"
    with atomic_dir(folder) as tmp:
        for sub, name, array in (
            ("imagesTr", f"{case}_0000.tif", image),
            ("labelsTr", f"{case}.tif", semantic),
            ("instancesTr", f"{case}.tif", instances),
        ):
            (tmp / sub).mkdir()
            tifffile.imwrite(tmp / sub / name, array, photometric="minisblack")
        write_json_atomic(
            tmp / "dataset.json",
            {
                "name": "DSB2018_nuclei_stardist",
                "description": "Fluorescence image of stained nuclei (2018 Data Science Bowl, stage 1) "
                "with its instance mask, as shipped in the stardist 0.9.2 wheel.",
                "reference": "https://pypi.org/project/stardist/0.9.2/ (stardist/data/images)",
                "licence": "stardist: BSD-3-Clause; image from the 2018 Data Science Bowl (BBBC038)",
                "channel_names": {"0": "fluorescence"},
                "labels": {"background": 0, "cell nucleus": 1},
                "numTraining": 1,
                "file_ending": ".tif",
                "instances": {
                    "folder": "instancesTr",
                    "note": "labelsTr is the semantic map; touching nuclei merge there "
                    f"({stats['semantic_components']} components for {stats['instances']} nuclei). "
                    "instancesTr/<case>.tif holds one id per nucleus (1..N, uint16): use it for instances.",
                },
                MARKER: 1,
                "medsam3": {"cases": {case: stats}},
            },
        )
    digests = {name: _sha(members[name]) for name in (image_name, mask_name)}
    source = {"package": STARDIST.spec, "image": image_name, "mask": mask_name, "sha256": digests}
    return _Written(folder.name, "cell nucleus", STARDIST.spec, {case: {**stats, "source": source}})


def nuclei_statistics(image: np.ndarray, instances: np.ndarray) -> dict[str, Any]:
    """Size and label statistics of an instance-labelled 2D image."""
    areas = np.bincount(instances.ravel())[1:]
    areas = areas[areas > 0]
    # A nucleus touches another when its 3x3 neighbourhood holds a different non-zero id.
    ids = instances.astype(np.int32)
    highest = ndi.maximum_filter(ids, size=3)
    lowest = ndi.minimum_filter(np.where(ids > 0, ids, ids.max() + 1), size=3)
    touches = (ids > 0) & ((highest != ids) | (lowest != ids))
    touching = int(len(np.unique(ids[touches])))
    _, semantic_components = label_components(instances > 0)
    return {
        "shape": list(image.shape),
        "dtype": str(image.dtype),
        "intensity": {
            "min": int(image.min()),
            "max": int(image.max()),
            "median_background": float(np.median(image[instances == 0])),
            "median_nuclei": float(np.median(image[instances > 0])),
        },
        "instances": int(len(areas)),
        "area_px": {"min": int(areas.min()), "median": float(np.median(areas)), "max": int(areas.max())},
        "foreground_fraction": round(float((instances > 0).mean()), 4),
        "touching_instances": touching,
        "semantic_components": int(semantic_components),
    }


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    )


def _read_nrrd(name: str, data: bytes, scratch: Path) -> sitk.Image:
    path = scratch / Path(name).name
    path.write_bytes(data)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputFileError(
            name, f"SimpleITK cannot read it ({str(exc).strip().splitlines()[-1]})"
        ) from None


def write_volume_dataset(folder: Path, dataset: VolumeDataset, members: dict[str, bytes]) -> _Written:
    """pyradiomics volumes as a 3D nnU-Net dataset; the label's one foreground value becomes 1."""
    prefix = "pyradiomics-3.0.1/data/"
    records: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(folder) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case in dataset.cases:
            image_name, label_name = f"{prefix}{case}_image.nrrd", f"{prefix}{case}_label.nrrd"
            image = _read_nrrd(image_name, members[image_name], Path(scratch))
            label = _read_nrrd(label_name, members[label_name], Path(scratch))
            if not _same_grid(image, label):
                raise InputFileError(
                    label_name, "label grid (size, spacing, origin, direction) differs from the image"
                )
            values = np.unique(sitk.GetArrayViewFromImage(label))
            foreground = [int(v) for v in values if v != 0]
            if len(foreground) != 1:
                raise InputFileError(
                    label_name, f"expected one foreground value, found values {values.tolist()}"
                )
            binary = sitk.Cast(sitk.Equal(label, foreground[0]), sitk.sitkUInt8)
            binary.CopyInformation(label)
            sitk.WriteImage(image, str(tmp / "imagesTr" / f"{case}_0000.nii.gz"), useCompression=True)
            sitk.WriteImage(binary, str(tmp / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
            stats = volume_statistics(image, binary)
            stats["source_label_values"] = [int(v) for v in values]
            records[case] = stats
        write_json_atomic(
            tmp / "dataset.json",
            {
                "name": f"pyradiomics_{dataset.folder}",
                "description": f"{dataset.description}, from the pyradiomics 3.0.1 source distribution "
                "(data/*.nrrd), converted to NIfTI with spacing, origin and direction kept.",
                "reference": "https://pypi.org/project/pyradiomics/3.0.1/ (sdist, data/)",
                "licence": "distributed with pyradiomics (BSD-3-Clause)",
                "tensorImageSize": "3D",
                "channel_names": {"0": dataset.channel},
                "labels": {"background": 0, dataset.concept: 1},
                "numTraining": len(dataset.cases),
                "file_ending": ".nii.gz",
                MARKER: 1,
                "medsam3": {"cases": records},
            },
        )
    cases = {
        case: {
            **stats,
            "source": {
                "package": PYRADIOMICS.spec,
                "image": f"data/{case}_image.nrrd",
                "label": f"data/{case}_label.nrrd",
                "sha256": {
                    f"data/{case}_{kind}.nrrd": _sha(members[f"{prefix}{case}_{kind}.nrrd"])
                    for kind in ("image", "label")
                },
            },
        }
        for case, stats in records.items()
    }
    return _Written(folder.name, dataset.concept, PYRADIOMICS.spec, cases)


def volume_statistics(image: sitk.Image, label: sitk.Image) -> dict[str, Any]:
    """Geometry, intensity and lesion statistics of a labelled volume (arrays in z, y, x order)."""
    array = sitk.GetArrayViewFromImage(image)
    mask = sitk.GetArrayViewFromImage(label) > 0
    spacing_zyx = tuple(float(v) for v in reversed(image.GetSpacing()))
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    _, parts = label_components(mask)
    zs, ys, xs = np.nonzero(mask)
    extent = [
        (int(a.max() - a.min() + 1) * s) if len(a) else 0.0
        for a, s in zip((zs, ys, xs), spacing_zyx, strict=True)
    ]
    return {
        "shape_zyx": list(array.shape),
        "spacing_zyx_mm": [round(v, 4) for v in spacing_zyx],
        "origin_xyz_mm": [round(float(v), 3) for v in image.GetOrigin()],
        "direction": [round(float(v), 4) for v in image.GetDirection()],
        "pixel_type": image.GetPixelIDTypeAsString(),
        "intensity": {
            "min": float(array.min()),
            "p1": float(np.percentile(array, 1)),
            "p99": float(np.percentile(array, 99)),
            "max": float(array.max()),
            "median_in_label": float(np.median(array[mask])) if mask.any() else None,
        },
        "label_voxels": int(mask.sum()),
        "label_volume_ml": round(int(mask.sum()) * voxel_ml, 3),
        "label_components": int(parts),
        "slices_with_label": int(mask.any(axis=(1, 2)).sum()),
        "label_extent_zyx_mm": [round(v, 1) for v in extent],
    }


def load_index(out_dir: str | Path) -> dict[str, Any]:
    """The examples.json of a folder written by :func:`fetch_examples`."""
    path = Path(out_dir) / "examples.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(path, "not found: run `medsam3 data fetch-examples --out DIR` first") from None
    except ValueError as exc:
        raise InputFileError(path, f"not valid JSON ({exc})") from None
    if MARKER not in index:
        raise InputFileError(path, "not an examples index written by fetch-examples")
    return index


def describe(index: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """A few printable lines: one per dataset and case, with its size and label statistics."""
    lines = [f"real example cases in {out_dir}:" if out_dir else "real example cases:"]
    for folder, dataset in index["datasets"].items():
        lines.append(f"  {folder}/  concept '{dataset['concept']}'  from {dataset['source']}")
        for case, stats in dataset["cases"].items():
            if "instances" in stats:
                lines.append(
                    f"    {case}: {'x'.join(map(str, stats['shape']))} {stats['dtype']}, "
                    f"{stats['instances']} nuclei (median area {stats['area_px']['median']:g} px)"
                )
            else:
                spacing = "x".join(f"{v:g}" for v in stats["spacing_zyx_mm"])
                lines.append(
                    f"    {case}: {'x'.join(map(str, stats['shape_zyx']))} voxels of {spacing} mm, "
                    f"label {stats['label_volume_ml']:g} mL on {stats['slices_with_label']} slices"
                )
    return "\n".join(lines)
