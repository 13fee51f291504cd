"""evaluate_dataset end to end with small fake segmenters that follow the set_image/predict protocol."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from medsam3.data.masks import components
from medsam3.data.sample import make_sample
from medsam3.errors import DatasetError, InputFileError, MedSAM3Error
from medsam3.evaluate.runner import (
    build_prompt,
    evaluate_dataset,
    evaluate_volume_labels,
    evaluate_volume_predictions,
)
from medsam3.infer.types import Prompt, PromptResult


class ListDataset:
    """A dataset as the runner sees it: indexable, sized, named; items may fail to load."""

    def __init__(self, items, name="phantom"):
        self.items = items
        self.name = name

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item, Exception):
            raise item
        return item


def image_with_squares(squares, size=32):
    img = np.full((size, size, 3), 20, dtype=np.uint8)
    gt = np.zeros((size, size), dtype=bool)
    for r0, r1, c0, c1 in squares:
        img[r0:r1, c0:c1] = 220
        gt[r0:r1, c0:c1] = True
    return img, gt


def sample(case, squares, concept="lesion", spacing=None, size=32):
    img, gt = image_with_squares(squares, size)
    return make_sample(img, concept, components(gt), case, spacing=spacing, source=f"{case}.png")


class ThresholdSegmenter:
    """Segments bright pixels; ``keep_cols`` limits the prediction to the left columns (a known miss)."""

    name = "threshold-fake"

    def __init__(self, keep_cols=None):
        self.keep_cols = keep_cols
        self.set_image_calls = 0
        self.prompts: list[Prompt] = []

    def set_image(self, rgb):
        self.rgb = rgb
        self.set_image_calls += 1

    def predict(self, prompts, score_threshold=0.5):
        out = []
        for prompt in prompts:
            self.prompts.append(prompt)
            mask = self.rgb[..., 0] > 128
            if self.keep_cols is not None:
                mask[:, self.keep_cols :] = False
            inst = components(mask)
            n = len(inst)
            out.append(
                PromptResult(
                    prompt=prompt,
                    presence=0.9 if n else 0.1,
                    scores=np.full(n, 0.9, np.float32),
                    boxes=np.zeros((n, 4), np.float32),
                    masks=inst,
                )
            )
        return out


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_perfect_segmenter_writes_every_report(tmp_path):
    ds = ListDataset(
        [
            sample("a", [(4, 12, 4, 12)]),
            sample("b", [(2, 6, 2, 6), (20, 28, 20, 28)], spacing=(0.5, 0.5)),
            sample("c", []),  # negative: concept absent
            sample("d", [(10, 20, 10, 20)], concept="cyst"),
        ]
    )
    result = evaluate_dataset(ds, ThresholdSegmenter(), out_dir=tmp_path / "run", progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"per_case.csv", "summary.json", "report.md", "worst_cases.png", "dice_distribution.png"} <= files
    rows = read_csv(tmp_path / "run" / "per_case.csv")
    assert [r["case"] for r in rows] == ["a", "b", "c", "d"]
    assert all(float(r["dice"]) == 1.0 for r in rows)
    assert rows[1]["n_gt"] == "2" and rows[1]["tp"] == "2" and rows[2]["presence_gt"] == "0"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lesion = summary["concepts"]["lesion"]
    assert (lesion["n_cases"], lesion["n_positive"], lesion["n_negative"]) == (3, 2, 1)
    assert lesion["dice"]["mean"] == 1.0 and lesion["presence"]["accuracy"] == 1.0
    assert summary["overall"]["n_cases"] == 4 and summary["distance_unit"] == "mixed"
    assert summary["model"] == "threshold-fake" and summary["dataset"] == "phantom"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| lesion | 3 (2/1) | 1.0000 ± 0.0000 |" in md and "**overall**" in md
    for png in ("worst_cases.png", "dice_distribution.png"):
        with Image.open(tmp_path / "run" / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert result.summary == summary and len(result.records) == 4


def test_partial_prediction_scores_by_hand(tmp_path):
    # truth: rows 4..11, cols 4..11 (64 px); prediction keeps cols < 8 (32 px): Dice 64/96, IoU 1/2
    ds = ListDataset([sample("a", [(4, 12, 4, 12)]), sample("b", [(4, 12, 20, 28)])])
    res = evaluate_dataset(ds, ThresholdSegmenter(keep_cols=8), out_dir=tmp_path, progress=False)
    a, b = res.records
    assert a.dice == pytest.approx(2 * 32 / 96) and a.iou == pytest.approx(0.5)
    assert b.dice == 0.0 and b.n_pred == 0 and math.isinf(b.hd95) and b.presence_pred == pytest.approx(0.1)
    s = res.summary["concepts"]["lesion"]
    assert s["dice"]["mean"] == pytest.approx((2 / 3) / 2)
    assert s["dice"]["median"] == pytest.approx((2 / 3) / 2)
    assert s["hd95"]["n_inf"] == 1 and s["presence"]["accuracy"] == 0.5
    assert "(1 inf)" in (tmp_path / "report.md").read_text()


def test_text_box_mode_sends_ground_truth_boxes(tmp_path):
    ds = ListDataset([sample("a", [(4, 12, 4, 12), (20, 24, 20, 30)]), sample("n", [])])
    seg = ThresholdSegmenter()
    evaluate_dataset(ds, seg, prompt_mode="text+box", out_dir=tmp_path, progress=False)
    assert seg.prompts[0].boxes == ((4.0, 4.0, 12.0, 12.0), (20.0, 20.0, 30.0, 24.0))
    assert seg.prompts[1].boxes == ()  # a negative has no box to give
    assert build_prompt(ds[0], "text").boxes == ()
    with pytest.raises(MedSAM3Error, match="prompt mode"):
        evaluate_dataset(ds, seg, prompt_mode="box", out_dir=tmp_path, progress=False)


def test_same_image_is_encoded_once(tmp_path):
    first = sample("a", [(4, 12, 4, 12)], concept="lesion")
    second = make_sample(first.image, "cyst", np.zeros((0, 32, 32), bool), "a")
    seg = ThresholdSegmenter()
    evaluate_dataset(ListDataset([first, second]), seg, out_dir=tmp_path, progress=False)
    assert seg.set_image_calls == 1


def test_bad_cases_raise_naming_the_case_or_are_skipped(tmp_path):
    bad = sample("nan_case", [(4, 12, 4, 12)])
    bad.image = bad.image.astype(np.float32)
    bad.image[0, 0, 0] = np.nan
    missing = InputFileError(tmp_path / "missing_case.png", "file not found")
    good = sample("ok", [(4, 12, 4, 12)])
    with pytest.raises(MedSAM3Error, match="nan_case.*NaN"):
        evaluate_dataset(
            ListDataset([good, bad]), ThresholdSegmenter(), out_dir=tmp_path / "x", progress=False
        )
    assert not (tmp_path / "x" / "per_case.csv").exists()  # nothing half-written
    with pytest.raises(InputFileError, match="missing_case.png"):
        evaluate_dataset(ListDataset([missing, good]), ThresholdSegmenter(), out_dir=tmp_path, progress=False)
    res = evaluate_dataset(
        ListDataset([missing, good, bad]),
        ThresholdSegmenter(),
        out_dir=tmp_path / "s",
        skip_bad=True,
        progress=False,
    )
    assert [r.case for r in res.records] == ["ok"]
    assert res.summary["n_skipped"] == 2
    assert res.skipped[0]["index"] == 0 and "missing_case.png" in res.skipped[0]["error"]
    assert res.skipped[1]["case"] == "nan_case"
    with pytest.raises(DatasetError, match="no case could be evaluated"):
        evaluate_dataset(
            ListDataset([bad]), ThresholdSegmenter(), out_dir=tmp_path, skip_bad=True, progress=False
        )


def test_empty_split_and_wrong_prediction_shape(tmp_path):
    with pytest.raises(DatasetError, match="phantom split 'test': no samples"):
        evaluate_dataset(
            ListDataset([]), ThresholdSegmenter(), out_dir=tmp_path, split="test", progress=False
        )

    class WrongSize(ThresholdSegmenter):
        def set_image(self, rgb):
            super().set_image(rgb[:-1])

    with pytest.raises(MedSAM3Error, match=r"case a \(lesion\).*shape"):
        evaluate_dataset(
            ListDataset([sample("a", [(4, 12, 4, 12)])]), WrongSize(), out_dir=tmp_path, progress=False
        )


def test_volume_scores_use_spacing():
    gt = np.zeros((10, 10, 10), dtype=bool)
    gt[2:6, 2:6, 2:6] = True
    pred = np.roll(gt, 1, axis=0)
    scores = evaluate_volume_predictions(pred, gt, (3.0, 1.0, 1.0), nsd_tolerance=2.0, case="vol1")
    assert scores.semantic.nsd == pytest.approx(80 / 112) and scores.semantic.hd95 == pytest.approx(3.0)
    assert (scores.instances.tp, scores.instances.fp, scores.instances.fn) == (1, 0, 0)
    with pytest.raises(MedSAM3Error, match="vol1.*spacing"):
        evaluate_volume_predictions(pred, gt, (3.0, 1.0, 1.0), pred_spacing=(1.0, 1.0, 1.0), case="vol1")
    labels = gt.astype(np.uint8) * 2
    per = evaluate_volume_labels(labels, labels, (1.0, 1.0, 1.0), {"liver": 2, "tumor": 3})
    assert per["liver"].semantic.dice == 1.0 and per["tumor"].semantic.hd95 == 0.0  # absent in both
