"""Every dataset layout, read from a miniature replica written in the real file formats.

Each test builds the layout's folder tree in tmp_path (NIfTI via SimpleITK, PNG/JPEG via PIL, TIFF
via tifffile, COCO JSON, Aperio XML, DSB2018 CSV), opens it with ``open_dataset`` and checks the
samples: concepts, instance masks against the pixels written, boxes, negatives and splits.
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from medsam3.data.dataset import open_dataset
from medsam3.data.layouts import detect_layout, layout_names
from medsam3.data.layouts.readers import clear_caches
from medsam3.data.layouts.shapes import decode_rle
from medsam3.data.masks import masks_to_boxes
from medsam3.data.sample import binary_to_instances, label_map_to_instances
from medsam3.errors import DatasetError, InputFileError

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


def encode_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> uncompressed COCO RLE counts (column-major, starting with background)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs



def png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)


def jpg(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path, quality=90)


def write_volume(path, array, spacing=(0.8, 0.7, 2.5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def gray(h=24, w=32) -> np.ndarray:
    return RNG.integers(20, 200, (h, w), dtype=np.uint8)


def rgb(h=24, w=32) -> np.ndarray:
    return RNG.integers(20, 200, (h, w, 3), dtype=np.uint8)


def by_key(ds):
    """(case, concept, slice) -> index."""
    return {(r.case_id, r.concept, r.image.slice_index): i for i, r in enumerate(ds.refs)}


# ----------------------------------------------------------------------------- sample helpers


def test_components_instances_and_boxes():
    binary = np.zeros((10, 12), bool)
    binary[1:4, 1:5] = True  # 12 px
    binary[6:9, 7:11] = True  # 12 px
    binary[9, 0] = True  # 1 px speck
    binary[4, 5] = True  # touches the first blob at a corner: 8-connected, same instance
    masks = binary_to_instances(binary, "components")
    assert len(masks) == 3
    assert sorted(m.sum() for m in masks) == [1, 12, 13]
    assert len(binary_to_instances(binary, "components", min_area=2)) == 2
    semantic = binary_to_instances(binary, "semantic")
    assert semantic.shape == (1, 10, 12) and semantic[0].sum() == binary.sum()
    boxes = masks_to_boxes(binary_to_instances(binary, "components", min_area=2))
    assert boxes.dtype == np.float32
    assert boxes.tolist() == [[1, 1, 6, 5], [7, 6, 11, 9]]  # xyxy, pixel edges


def test_instance_label_map_keeps_touching_objects_apart():
    labels = np.zeros((8, 8), np.uint16)
    labels[1:4, 1:4] = 7
    labels[1:4, 4:7] = 300  # touches instance 7: connected components would merge them
    masks = label_map_to_instances(labels)
    assert len(masks) == 2 and all(m.sum() == 9 for m in masks)
    assert len(binary_to_instances(labels > 0, "components")) == 1


# ----------------------------------------------------------------------------- nnU-Net / MSD 3D


def _liver_volume(with_second_blob: bool = True):
    image = RNG.normal(40, 20, (10, 16, 20)).astype(np.int16)
    image[:, :2] = -1000
    label = np.zeros((10, 16, 20), np.uint8)
    label[2:7, 4:10, 5:12] = 1
    label[4:6, 5:7, 6:8] = 2
    if with_second_blob:
        label[3, 12:14, 15:18] = 1
    return image, label


def make_nnunet_3d(root, cases=("liver_000", "liver_001"), test_cases=("liver_100",)):
    for folder, names in (("Tr", cases), ("Ts", test_cases)):
        for name in names:
            image, label = _liver_volume()
            write_volume(root / f"images{folder}" / f"{name}_0000.nii.gz", image)
            write_volume(root / f"labels{folder}" / f"{name}.nii.gz", label)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "liver": 1, "cancer": 2},
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
                "name": "Dataset003_Liver",
            }
        )
    )
    return root


def test_nnunet_3d_slices_concepts_negatives_and_test_split(tmp_path):
    root = make_nnunet_3d(tmp_path / "Dataset003_Liver")
    assert detect_layout(tmp_path) == "nnunet"
    ds = open_dataset(tmp_path, negatives_fraction=0.5)
    assert ds.concepts == ["liver", "liver tumor"]  # MSD Liver's "cancer" -> "liver tumor"
    assert ds.info.layout == "nnunet" and ds.info.root == root
    _, label = _liver_volume()
    for case in ("liver_000", "liver_001", "liver_100"):
        refs = [r for r in ds.refs if r.case_id == case]
        liver_pos = sorted(r.image.slice_index for r in refs if r.concept == "liver" and r.positive)
        assert liver_pos == [2, 3, 4, 5, 6]
        liver_neg = [r for r in refs if r.concept == "liver" and not r.positive]
        assert len(liver_neg) == math.ceil(0.5 * 5)  # half of the 5 liver-free slices
        tumor_neg = [r for r in refs if r.concept == "liver tumor" and not r.positive]
        assert len(tumor_neg) == math.ceil(0.5 * 8)
    assert ds.split("test").cases == ["liver_100"]
    assert set(ds.split("train").cases) | set(ds.split("val").cases) == {"liver_000", "liver_001"}

    index = by_key(ds)
    sample = ds[index[("liver_000", "liver", 3)]]
    assert sample.image.shape == (16, 20, 3) and sample.image.dtype == np.uint8
    assert sample.masks.shape == (2, 16, 20)  # the main liver region and the separate blob
    assert np.array_equal(sample.union, label[3] == 1)
    assert sample.boxes.tolist() == [[5, 4, 12, 10], [15, 12, 18, 14]]
    assert sample.spacing == pytest.approx((0.7, 0.8))  # (row, col) = (y, x) spacing
    assert sample.modality == "CT"
    assert sample.case_id == "liver_000" and "slice 3" in sample.source
    tumor = ds[index[("liver_000", "liver tumor", 4)]]
    assert tumor.masks.shape == (1, 16, 20) and tumor.masks[0].sum() == 4
    negative = ds[[i for i, r in enumerate(ds.refs) if r.concept == "liver tumor" and not r.positive][0]]
    assert negative.is_negative and negative.masks.shape == (0, 16, 20) and negative.boxes.shape == (0, 4)

    # Deterministic negatives; seed changes them.
    again = open_dataset(tmp_path, negatives_fraction=0.5)
    assert [(r.case_id, r.concept, r.image.slice_index) for r in again.refs] == [
        (r.case_id, r.concept, r.image.slice_index) for r in ds.refs
    ]
    none = open_dataset(tmp_path, negatives_fraction=0.0)
    assert all(r.positive for r in none.refs)


def test_nnunet_axis_instances_and_min_area(tmp_path):
    make_nnunet_3d(tmp_path / "Dataset003_Liver", test_cases=())
    ds = open_dataset(tmp_path, axis=2, negatives_fraction=0.0)
    first = ds[0]
    assert first.image.shape == (10, 16, 3)  # slice along X: (Z, Y)
    assert first.spacing == pytest.approx((2.5, 0.7))
    semantic = open_dataset(tmp_path, negatives_fraction=0.0, instances="semantic")
    small = open_dataset(tmp_path, negatives_fraction=0.0, min_instance_area=10)
    key = by_key(semantic)[("liver_000", "liver", 3)]
    assert len(semantic[key].masks) == 1
    assert len(small[by_key(small)[("liver_000", "liver", 3)]].masks) == 1  # the 6-pixel blob dropped
    with pytest.raises(DatasetError, match="instances must be one of"):
        open_dataset(tmp_path, instances="blobs")


@pytest.mark.parametrize("ending", [".nrrd", ".mha", ".tif"])
def test_nnunet_other_file_formats(tmp_path, ending):
    root = tmp_path / "Dataset300_Formats"
    image, label = _liver_volume()
    if ending == ".tif":  # 2D: one slice, 16-bit image, 8-bit label map
        image, label = (image[4] + 1024).astype(np.uint16), label[4]
        for path, array in (
            (root / "imagesTr" / f"x_0000{ending}", image),
            (root / "labelsTr" / f"x{ending}", label),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, array)
    else:
        write_volume(root / "imagesTr" / f"x_0000{ending}", image)
        write_volume(root / "labelsTr" / f"x{ending}", label)
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "liver": 1, "liver tumor": 2}, "file_ending": ending})
    )
    ds = open_dataset(root, negatives_fraction=0.0)
    key = by_key(ds)[("x", "liver tumor", None if ending == ".tif" else 4)]
    sample = ds[key]
    assert sample.masks.shape == (1, 16, 20) and sample.boxes.tolist() == [[6, 5, 8, 7]]
    assert sample.image.shape == (16, 20, 3)


def test_msd_value_to_name_labels_without_channel_suffix(tmp_path):
    root = tmp_path / "Task03_Liver"
    image, label = _liver_volume()
    write_volume(root / "imagesTr" / "liver_0.nii.gz", image)
    write_volume(root / "labelsTr" / "liver_0.nii.gz", label)
    write_volume(root / "imagesTr" / "liver_0001.nii.gz", image)  # looks like a channel suffix, is a case id
    write_volume(root / "labelsTr" / "liver_0001.nii.gz", label)
    write_volume(root / "imagesTs" / "liver_9.nii.gz", image)  # MSD test images have no labels
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Liver",
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "liver", "2": "cancer"},
                "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}],
                "test": ["./imagesTs/liver_9.nii.gz"],
            }
        )
    )
    ds = open_dataset(root)
    assert ds.concepts == ["liver", "liver tumor"]
    assert ds.cases == ["liver_0", "liver_0001"]
    assert any("without labels" in note for note in ds.info.notes)


def test_nnunet_2d_png_negatives_regions_ignore_and_instance_maps(tmp_path):
    root = tmp_path / "Dataset200_Cells"
    labels_json = {"background": 0, "nucleus": 1, "mitosis": 2, "any cell": [1, 2], "ignore": 3}
    for i in range(3):
        label = np.zeros((24, 32), np.uint8)
        label[2:8, 2:8] = 1
        label[2:8, 8:14] = 1  # touches the first nucleus
        if i == 0:
            label[15:20, 20:26] = 2
        label[22:24, 0:4] = 3  # ignored pixels
        ids = np.zeros((24, 32), np.uint16)
        ids[2:8, 2:8] = 1
        ids[2:8, 8:14] = 2
        ids[15:20, 20:26] = 3
        png(root / "imagesTr" / f"cells_{i}_0000.png", gray())
        png(root / "labelsTr" / f"cells_{i}.png", label)
        png(root / "instancesTr" / f"cells_{i}.png", ids)
    (root / "dataset.json").write_text(json.dumps({"labels": labels_json, "file_ending": ".png"}))
    ds = open_dataset(root)
    assert ds.concepts == ["cell nucleus", "mitotic cell", "any cell"]  # label names -> canonical phrases
    assert len(ds) == 9  # 3 images x 3 concepts, absent ones as negatives
    index = by_key(ds)
    assert ds.refs[index[("cells_1", "mitotic cell", None)]].positive is False
    assert ds[index[("cells_1", "mitotic cell", None)]].is_negative
    nuclei = ds[index[("cells_0", "cell nucleus", None)]]
    assert len(nuclei.masks) == 2  # instance map keeps the touching nuclei apart
    assert len(ds[index[("cells_0", "any cell", None)]].masks) == 3
    without_negatives = open_dataset(root, negatives_2d=False)
    assert len(without_negatives) == 7
    renamed = open_dataset(root, concept_map={"mitosis": "dividing nucleus"})
    assert renamed.concepts == ["cell nucleus", "dividing nucleus", "any cell"]


# ----------------------------------------------------------------------------- bad input


def test_nnunet_bad_input_errors_and_skip_bad(tmp_path):
    root = make_nnunet_3d(tmp_path / "Dataset003_Liver", cases=("a", "b", "c", "d", "e"), test_cases=())
    # label without image
    (root / "imagesTr" / "b_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/b\.nii\.gz: label without its image"):
        open_dataset(root)
    ds = open_dataset(root, skip_bad=True)
    assert "b" not in ds.cases and len(ds.skipped) == 1 and "label without its image" in ds.skipped[0].problem
    image, _ = _liver_volume()
    write_volume(root / "imagesTr" / "b_0000.nii.gz", image)
    # size mismatch
    write_volume(root / "labelsTr" / "c.nii.gz", np.zeros((10, 16, 21), np.uint8))
    with pytest.raises(InputFileError, match=r"c\.nii\.gz: label volume is \(10, 16, 21\)"):
        open_dataset(root)
    # a label value dataset.json does not name
    bad = _liver_volume()[1]
    bad[0, 0, 0] = 5
    write_volume(root / "labelsTr" / "d.nii.gz", bad)
    # a corrupt (truncated) image
    data = (root / "imagesTr" / "e_0000.nii.gz").read_bytes()
    (root / "imagesTr" / "e_0000.nii.gz").write_bytes(data[: len(data) // 3])
    partial = open_dataset(root, skip_bad=True)  # c and d fail indexing; e's header reads fine
    assert partial.cases == ["a", "b", "e"] and len(partial.skipped) == 2
    with pytest.raises(InputFileError, match=r"e_0000\.nii\.gz: truncated"):  # found on load
        partial[next(i for i, r in enumerate(partial.refs) if r.case_id == "e")]
    ds = open_dataset(root, skip_bad=True, verify_images=True)  # or up front
    assert ds.cases == ["a", "b"]
    problems = {s.path.split("/")[-1]: s.problem for s in ds.skipped}
    assert "label volume is (10, 16, 21)" in problems["c.nii.gz"]
    assert "label values 5 are not named" in problems["d.nii.gz"]
    assert set(problems) == {"c.nii.gz", "d.nii.gz", "e_0000.nii.gz"}
    write_volume(root / "labelsTr" / "c.nii.gz", _liver_volume()[1])
    with pytest.raises(DatasetError, match=r"d\.nii\.gz: label values 5 are not named in .*dataset\.json"):
        open_dataset(root)


def test_image_without_label_empty_and_unknown_layouts(tmp_path):
    root = make_nnunet_3d(tmp_path / "Dataset003_Liver", cases=("a",), test_cases=())
    image, _ = _liver_volume()
    write_volume(root / "imagesTr" / "z_0000.nii.gz", image)
    with pytest.raises(DatasetError, match=r"z_0000\.nii\.gz: image without its label"):
        open_dataset(root)
    (root / "imagesTr" / "z_0000.nii.gz").unlink()
    for path in (root / "labelsTr").iterdir():
        path.unlink()
    for path in (root / "imagesTr").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="no samples found"):
        open_dataset(root)
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="unknown dataset layout; known layouts: nnunet") as info:
        open_dataset(tmp_path / "random")
    for name in layout_names():
        assert name in str(info.value)
    with pytest.raises(DatasetError, match="no such dataset folder"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="unknown layout 'voc'"):
        open_dataset(root, layout="voc")
    with pytest.raises(DatasetError, match="does not look like a busi dataset"):
        open_dataset(root, layout="busi")


def test_corrupt_2d_image_fails_on_load_naming_the_file(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    jpg(root / "images" / "p1.jpg", rgb())
    mask = np.zeros((24, 32), np.uint8)
    mask[5:10, 5:10] = 255
    jpg(root / "masks" / "p1.jpg", mask)
    data = (root / "images" / "p1.jpg").read_bytes()
    (root / "images" / "p1.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact, pixels cut
    ds = open_dataset(root)
    with pytest.raises(InputFileError, match=r"images/p1\.jpg: unreadable or corrupt image"):
        ds[0]
    with pytest.raises(InputFileError, match=r"images/p1\.jpg: unreadable or corrupt image"):
        open_dataset(root, verify_images=True)
    with pytest.raises(DatasetError, match=r"no readable samples left \(1 bad file"):
        open_dataset(root, verify_images=True, skip_bad=True)
    (root / "images" / "p1.jpg").write_bytes(b"not an image at all")
    with pytest.raises(InputFileError, match=r"images/p1\.jpg: unreadable or corrupt image"):
        open_dataset(root)


# ----------------------------------------------------------------------------- COCO


def test_coco_polygons_rle_and_negatives(tmp_path):
    root = tmp_path / "coco"
    for name in ("a.png", "b.png", "c.png"):
        png(root / "images" / name, rgb(7, 9) if name == "c.png" else rgb(10, 12))
    truth_rle = np.zeros((7, 9), bool)
    truth_rle[1:4, 2:6] = True
    truth_rle[5, 0:9] = True
    truth_rle[0, 8] = True
    square_3x3 = np.zeros((10, 12), bool)
    square_3x3[2:5, 4:7] = True
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 10, "width": 12},
            {"id": 2, "file_name": "b.png", "height": 10, "width": 12},
            {"id": 3, "file_name": "c.png", "height": 7, "width": 9},
        ],
        "categories": [{"id": 1, "name": "polyp"}, {"id": 2, "name": "Nuclei"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 9, 1, 1, 8]], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "iscrowd": 0,
             "segmentation": {"size": [10, 12], "counts": encode_rle(square_3x3)}},
            # Compressed RLE string, as pycocotools 2.0.11 encodes ``truth_rle``.
            {"id": 4, "image_id": 3, "category_id": 2, "iscrowd": 1,
             "segmentation": {"size": [7, 9], "counts": "5160L2ON12ON12ON12ON5000K030M"}},
        ],
    }  # fmt: skip
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    assert detect_layout(root) == "coco"
    ds = open_dataset(root)
    assert ds.concepts == ["polyp", "cell nucleus"]  # category "Nuclei" -> canonical phrase
    assert ds.splits == ["val"]  # from the JSON's name
    index = by_key(ds)
    polyps = ds[index[("a", "polyp", None)]]
    assert len(polyps.masks) == 2
    square = polyps.masks[0]
    assert square.sum() == 24 and polyps.boxes[0].tolist() == [2, 2, 8, 6]  # pixel-edge polygon
    assert abs(int(polyps.masks[1].sum()) - 27) <= 1  # pycocotools fills 27 pixels for this triangle
    assert ds[index[("a", "cell nucleus", None)]].is_negative
    assert ds[index[("b", "polyp", None)]].is_negative
    rle = ds[index[("b", "cell nucleus", None)]]
    assert rle.masks.shape == (1, 10, 12) and rle.boxes[0].tolist() == [4, 2, 7, 5]
    crowd = ds[index[("c", "cell nucleus", None)]]
    assert np.array_equal(crowd.masks[0], truth_rle)

    data["annotations"].append(
        {"id": 9, "image_id": 42, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]}
    )
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    with pytest.raises(
        InputFileError, match=r"instances_val\.json: annotation 9 refers to unknown image id 42"
    ):
        open_dataset(root)


def test_rle_round_trip_and_errors():
    mask = RNG.random((13, 7)) > 0.6
    assert np.array_equal(decode_rle(encode_rle(mask), 13, 7), mask)
    first_on = np.zeros((3, 3), bool)
    first_on[0, 0] = True
    assert encode_rle(first_on)[0] == 0  # counts always start with a background run
    with pytest.raises(ValueError, match="cover"):
        decode_rle([3, 2], 3, 3)


# ----------------------------------------------------------------------------- paired folders


def test_paired_folders_with_yaml_mapping_and_split_subfolders(tmp_path):
    root = tmp_path / "organs"
    (root).mkdir()
    (root / "concepts.yaml").write_text("1: liver\n2: Kidneys\n")
    for split, name in (("train", "p1"), ("train", "p2"), ("test", "p3")):
        label = np.zeros((24, 32), np.uint8)
        label[3:9, 3:12] = 1
        if name != "p2":
            label[14:20, 20:28] = 2
        png(root / "images" / split / f"{name}.png", gray())
        png(root / "masks" / split / f"{name}.png", label)
    assert detect_layout(root) == "paired"
    ds = open_dataset(root)
    assert ds.concepts == ["liver", "kidney"]
    assert ds.split("test").cases == ["p3"]
    index = by_key(ds)
    assert ds[index[("p2", "kidney", None)]].is_negative
    kidney = ds[index[("p1", "kidney", None)]]
    assert kidney.boxes.tolist() == [[20, 14, 28, 20]]
    bad = np.zeros((24, 32), np.uint8)
    bad[0, 0] = 9
    png(root / "masks" / "train" / "p2.png", bad)
    with pytest.raises(DatasetError, match=r"p2\.png: label values 9 are not named in .*concepts\.yaml"):
        open_dataset(root)


def test_paired_single_concept_binary_masks_and_orphans(tmp_path):
    root = tmp_path / "lesions"
    root.mkdir()
    (root / "concepts.json").write_text(json.dumps({"breast lesion": 1}))  # phrase -> value also works
    mask = np.zeros((24, 32), np.uint8)
    mask[4:10, 4:10] = 255
    png(root / "images" / "x.png", gray())
    png(root / "masks" / "x.png", mask)
    ds = open_dataset(root)
    assert ds.concepts == ["breast lesion"] and ds[0].masks[0].sum() == 36
    png(root / "masks" / "y.png", mask)
    with pytest.raises(DatasetError, match=r"masks/y\.png: mask without its image"):
        open_dataset(root)
    ds = open_dataset(root, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 1
    png(root / "masks" / "x.png", np.zeros((20, 32), np.uint8))
    with pytest.raises(InputFileError, match=r"x\.png: label is 32x20 but its image x\.png is 32x24"):
        open_dataset(root, skip_bad=False)


# ----------------------------------------------------------------------------- the paper's datasets


def test_busi_native_layout(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    one = np.zeros((24, 32), np.uint8)
    one[3:9, 3:9] = 255
    two = np.zeros((24, 32), np.uint8)
    two[12:20, 15:25] = 255
    png(root / "benign" / "benign (1).png", gray())
    png(root / "benign" / "benign (1)_mask.png", one)
    png(root / "benign" / "benign (1)_mask_1.png", two)
    png(root / "malignant" / "malignant (1).png", rgb())  # BUSI has some RGB images
    png(root / "malignant" / "malignant (1)_mask.png", np.stack([two] * 3, axis=-1))  # and RGB masks
    png(root / "normal" / "normal (1).png", gray())
    png(root / "normal" / "normal (1)_mask.png", np.zeros((24, 32), np.uint8))
    assert detect_layout(tmp_path) == "busi"
    ds = open_dataset(tmp_path)
    assert ds.concepts == ["breast tumor"] and len(ds) == 3
    index = by_key(ds)
    benign = ds[index[("benign/benign (1)", "breast tumor", None)]]
    assert len(benign.masks) == 2  # two mask files = two tumours
    assert benign.boxes.tolist() == [[3, 3, 9, 9], [15, 12, 25, 20]]
    assert benign.meta["class"] == "benign" and benign.modality == "US"
    assert len(ds[index[("malignant/malignant (1)", "breast tumor", None)]].masks) == 1
    normal = index[("normal/normal (1)", "breast tumor", None)]
    assert ds.refs[normal].positive is False and ds[normal].is_negative
    (root / "normal" / "normal (1).png").unlink()
    with pytest.raises(DatasetError, match=r"normal \(1\)_mask\.png: mask without its image"):
        open_dataset(tmp_path)


def test_kvasir_native_layout_jpeg_masks(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    mask = np.zeros((24, 32), np.uint8)
    mask[4:14, 6:20] = 255
    for name in ("cju0qkwl35piu0993l0dewei2", "cju0roawvklrq0799vmjorwfv"):
        jpg(root / "images" / f"{name}.jpg", rgb())
        jpg(root / "masks" / f"{name}.jpg", mask)
    (root / "kavsir_bboxes.json").write_text("{}")
    assert detect_layout(tmp_path) == "kvasir"
    ds = open_dataset(tmp_path)
    assert ds.concepts == ["polyp"] and len(ds) == 2
    sample = ds[0]
    assert len(sample.masks) == 1  # JPEG ringing is thresholded away, no specks
    assert abs(int(sample.masks[0].sum()) - 140) <= 6
    sessile = tmp_path / "sessile-main-Kvasir-SEG"
    jpg(sessile / "images" / "s1.jpg", rgb())
    jpg(sessile / "masks" / "s1.jpg", mask)
    assert open_dataset(sessile).concepts == ["sessile polyp"]


def test_isic2018_native_layout(tmp_path):
    mask = np.zeros((24, 32), np.uint8)
    mask[5:20, 8:26] = 255
    for part, ids in (("Training", (0, 1, 2)), ("Validation", (10,)), ("Test", (20,))):
        for i in ids:
            jpg(tmp_path / f"ISIC2018_Task1-2_{part}_Input" / f"ISIC_{i:07d}.jpg", rgb())
            png(tmp_path / f"ISIC2018_Task1_{part}_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", mask)
    (tmp_path / "ISIC2018_Task1-2_Training_Input" / "ATTRIBUTION.txt").write_text("credits")
    assert detect_layout(tmp_path) == "isic2018"
    ds = open_dataset(tmp_path)
    assert ds.concepts == ["skin lesion"] and len(ds) == 5
    assert ds.split("val").cases == ["ISIC_0000010"] and ds.split("test").cases == ["ISIC_0000020"]
    assert set(ds.split("train").cases) == {"ISIC_0000000", "ISIC_0000001", "ISIC_0000002"}
    assert ds[0].boxes.tolist() == [[8, 5, 26, 20]]


def test_dsb2018_native_layout_with_solution_csv(tmp_path):
    root = tmp_path / "dsb"
    for case in ("0a7d30b2", "1b4c5d6e"):
        image = np.dstack([gray(), gray(), gray(), np.full((24, 32), 255, np.uint8)])  # RGBA like DSB
        png(root / "stage1_train" / case / "images" / f"{case}.png", image)
        for k, (r, c) in enumerate([(2, 2), (2, 8), (14, 20)]):
            nucleus = np.zeros((24, 32), np.uint8)
            nucleus[r : r + 6, c : c + 6] = 255  # the first two touch
            png(root / "stage1_train" / case / "masks" / f"m{k}.png", nucleus)
    png(root / "stage1_test" / "9f9f" / "images" / "9f9f.png", gray())
    (root / "stage1_solution.csv").write_text(
        "ImageId,EncodedPixels,Height,Width,Usage\n9f9f,26 3 50 3,24,32,Public\n9f9f,700 2,24,32,Public\n"
    )
    assert detect_layout(root) == "dsb2018"
    ds = open_dataset(root)
    assert ds.concepts == ["cell nucleus"] and len(ds) == 3
    train = ds[by_key(ds)[("0a7d30b2", "cell nucleus", None)]]
    assert len(train.masks) == 3 and all(m.sum() == 36 for m in train.masks)  # touching nuclei apart
    test = ds[by_key(ds)[("9f9f", "cell nucleus", None)]]
    assert ds.refs[by_key(ds)[("9f9f", "cell nucleus", None)]].split == "test"
    assert len(test.masks) == 2
    # '26 3 50 3': pixels 25..27 and 49..51 in column-major order: column 1 rows 1-3, column 2 rows 1-3.
    expected = np.zeros((24, 32), bool)
    expected[1:4, 1:3] = True
    assert np.array_equal(test.masks[0], expected)
    assert open_dataset(root / "stage1_train").info.root == root  # pointing at stage1_train works too


def _aperio_xml(regions) -> str:
    body = []
    for rid, points in enumerate(regions, start=1):
        vertices = "".join(f'<Vertex X="{x}" Y="{y}" Z="0" />' for x, y in points)
        body.append(f'<Region Id="{rid}" Type="0"><Attributes/><Vertices>{vertices}</Vertices></Region>')
    return (
        '<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.252100">'
        '<Annotation Id="1" Name="" ReadOnly="0"><Attributes/><Regions>'
        + "".join(body)
        + "</Regions></Annotation></Annotations>"
    )


def test_monuseg_native_layout_tif_and_aperio_xml(tmp_path):
    train = tmp_path / "MoNuSeg 2018 Training Data"
    (train / "Tissue Images").mkdir(parents=True)
    (train / "Annotations").mkdir()
    tifffile.imwrite(train / "Tissue Images" / "TCGA-18-5592-01Z-00-DX1.tif", rgb(30, 40))
    regions = [[(5, 5), (12, 5), (12, 11), (5, 11)], [(20.5, 15.2), (30.1, 15.0), (25.0, 25.3)]]
    (train / "Annotations" / "TCGA-18-5592-01Z-00-DX1.xml").write_text(_aperio_xml(regions))
    test = tmp_path / "MoNuSegTestData"
    test.mkdir()
    tifffile.imwrite(test / "TCGA-2Z-A9J9-01A-01-TS1.tif", rgb(30, 40))
    (test / "TCGA-2Z-A9J9-01A-01-TS1.xml").write_text(_aperio_xml(regions[:1]))
    assert detect_layout(tmp_path) == "monuseg"
    ds = open_dataset(tmp_path)
    assert ds.concepts == ["cell nucleus"] and len(ds) == 2
    assert ds.split("test").cases == ["TCGA-2Z-A9J9-01A-01-TS1"]
    sample = ds[by_key(ds)[("TCGA-18-5592-01Z-00-DX1", "cell nucleus", None)]]
    assert len(sample.masks) == 2 and sample.image.shape == (30, 40, 3)
    assert sample.masks[0].sum() == 8 * 7  # vertices 5..12 x 5..11, pixel positions inclusive
    assert sample.boxes[0].tolist() == [5, 5, 13, 12]
    (train / "Annotations" / "TCGA-18-5592-01Z-00-DX1.xml").write_text(
        _aperio_xml([[(5, 5), (90, 5), (5, 9)]])
    )
    tifffile.imwrite(train / "Tissue Images" / "broken.tif", rgb(30, 40))
    (train / "Annotations" / "broken.xml").write_text("<Annotations><Region>")
    with pytest.raises(InputFileError, match=r"broken\.xml: not a readable XML annotation"):
        open_dataset(tmp_path)


def test_rimone_dl_native_layout(tmp_path):
    images = tmp_path / "RIM-ONE_DL_images"
    segs = tmp_path / "RIM-ONE_DL_reference_segmentations"
    disc = np.zeros((24, 32), np.uint8)
    disc[4:20, 8:24] = 255
    cup = np.zeros((24, 32), np.uint8)
    cup[8:16, 12:20] = 255
    for split, cls, case in (("training_set", "glaucoma", "r1_Im001"), ("training_set", "normal", "r2_Im004"),
                             ("test_set", "normal", "r3_G-1-L")):  # fmt: skip
        for partition in ("partitioned_by_hospital", "partitioned_randomly"):
            png(images / partition / split / cls / f"{case}.png", rgb())
        png(segs / cls / f"{case}-1-Cup-T.png", cup)
        png(segs / cls / f"{case}-1-Disc-T.png", disc)
    assert detect_layout(tmp_path) == "rimone"
    ds = open_dataset(tmp_path)
    assert ds.concepts == ["optic cup", "optic disc"] and len(ds) == 6
    assert ds.split("test").cases == ["r3_G-1-L"]
    index = by_key(ds)
    assert ds[index[("r1_Im001", "optic cup", None)]].boxes.tolist() == [[12, 8, 20, 16]]
    assert ds[index[("r1_Im001", "optic disc", None)]].boxes.tolist() == [[8, 4, 24, 20]]
    assert ds[index[("r2_Im004", "optic cup", None)]].meta["class"] == "normal"
    assert any("partitioned_by_hospital" in note for note in ds.info.notes)
    (segs / "normal" / "r2_Im004-1-Cup-T.png").unlink()
    with pytest.raises(DatasetError, match=r"r2_Im004\.png: image without its Cup mask"):
        open_dataset(tmp_path)


def test_covid_qu_ex_native_layout(tmp_path):
    lung = np.zeros((24, 32), np.uint8)
    lung[3:21, 2:14] = 255
    lung[3:21, 18:30] = 255
    infection = np.zeros((24, 32), np.uint8)
    infection[8:12, 4:8] = 255
    lung_set = tmp_path / "Lung Segmentation Data" / "Lung Segmentation Data"
    inf_set = tmp_path / "Infection Segmentation Data" / "Infection Segmentation Data"
    for split in ("Train", "Val", "Test"):
        for cls in ("COVID-19", "Non-COVID", "Normal"):
            name = f"{cls.lower()}_{split.lower()}.png"
            png(lung_set / split / cls / "images" / name, gray())
            png(lung_set / split / cls / "lung masks" / name, lung)
            png(inf_set / split / cls / "images" / name, gray())
            png(inf_set / split / cls / "lung masks" / name, lung)
            png(
                inf_set / split / cls / "infection masks" / name, infection if cls == "COVID-19" else lung * 0
            )
    assert detect_layout(tmp_path) == "covidqu"
    ds = open_dataset(tmp_path)
    assert ds.concepts == ["lung", "lung infection"]
    assert len(ds) == 9 + 9  # lung from the lung set, infection from the infection set
    lungs = [ds[i] for i, r in enumerate(ds.refs) if r.concept == "lung"]
    assert all(len(s.masks) == 2 for s in lungs)  # two lungs = two instances
    infection_refs = [r for r in ds.refs if r.concept == "lung infection"]
    assert sum(r.positive for r in infection_refs) == 3  # only COVID-19 images show infection
    assert ds.split("val").cases and {r.split for r in ds.refs} == {"train", "val", "test"}
    # Only the infection set: its lung masks give the lung samples.
    only = tmp_path / "only"
    (only).mkdir()
    (tmp_path / "Infection Segmentation Data").rename(only / "Infection Segmentation Data")
    ds = open_dataset(only)
    assert ds.concepts == ["lung", "lung infection"] and len(ds) == 18


def test_dataset_views_and_bad_arguments(tmp_path):
    make_nnunet_3d(tmp_path / "Dataset003_Liver")
    ds = open_dataset(tmp_path)
    order = ds.volume_blocked_order(seed=1)
    assert sorted(order) == list(range(len(ds))) and order == ds.volume_blocked_order(seed=1)
    assert order != ds.volume_blocked_order(seed=2)
    files = [ds.refs[i].image.path for i in order]
    changes = sum(a != b for a, b in zip(files[:-1], files[1:], strict=True))
    assert changes == len(set(files)) - 1  # one run per volume
    copy = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert np.array_equal(copy[5].masks, ds[5].masks) and copy[5].concept == ds[5].concept
    assert len(ds[:3]) == 3 and ds[:3].concepts
    tumor = ds.select(concepts=["liver tumor"], positives_only=True)
    assert tumor.concepts == ["liver tumor"] and all(r.positive for r in tumor.refs)
    assert all(not s.is_negative for s in tumor)
    with pytest.raises(DatasetError, match="no concept kidney"):
        ds.select(concepts=["kidney"])
    test_only = open_dataset(tmp_path, split="test")
    assert test_only.cases == ["liver_100"]
    with pytest.raises(DatasetError, match="unknown split 'holdout'"):
        open_dataset(tmp_path, split="holdout")
    with pytest.raises(DatasetError, match="negatives_fraction"):
        open_dataset(tmp_path, negatives_fraction=1.5)
    with pytest.raises(DatasetError, match="axis"):
        open_dataset(tmp_path, axis=3)
