"""Per-case CSV round trip, summary statistics and the Markdown table."""

from __future__ import annotations

import math

import pytest

from medsam3.errors import InputFileError
from medsam3.evaluate.report import (
    CaseRecord,
    describe,
    markdown_report,
    read_case_csv,
    records_to_csv,
    summarise,
    write_case_csv,
)


def rec(case, dice, *, concept="polyp", n_gt=1, n_pred=1, presence=0.9, hd=2.0, tp=1, fp=0, fn=0):
    return CaseRecord(
        case=case,
        concept=concept,
        split="test",
        dice=dice,
        iou=dice / (2 - dice),
        nsd=dice,
        hd95=hd,
        presence_pred=presence,
        presence_gt=n_gt > 0,
        n_pred=n_pred,
        n_gt=n_gt,
        seconds=0.5,
        tp=tp,
        fp=fp,
        fn=fn,
    )


def test_csv_round_trip_keeps_inf_and_nan(tmp_path):
    records = [rec("a", 0.5, hd=math.inf), rec("b", 1.0), rec("c", 1.0, n_gt=0, n_pred=0, tp=0, hd=0.0)]
    path = write_case_csv(records, tmp_path / "per_case.csv")
    text = path.read_text()
    assert text.splitlines()[0].startswith("case,concept,split,dice,iou,nsd,hd95,presence_pred,presence_gt")
    assert ",inf," in text and ",nan," in text  # inf HD95, NaN matched Dice
    back = read_case_csv(path)
    assert [r.case for r in back] == ["a", "b", "c"]
    assert math.isinf(back[0].hd95) and back[2].presence_gt is False and back[1].n_gt == 1
    assert back[0].dice == pytest.approx(0.5) and math.isnan(back[0].matched_dice)
    assert records_to_csv(back) == text


def test_read_case_csv_errors(tmp_path):
    with pytest.raises(InputFileError, match="no per-case CSV"):
        read_case_csv(tmp_path / "per_case.csv")
    (tmp_path / "bad.csv").write_text("case,concept\nx,y\n")
    with pytest.raises(InputFileError, match="missing columns dice"):
        read_case_csv(tmp_path / "bad.csv")
    good = records_to_csv([rec("a", 0.5)]).replace("0.5,", "half,", 1)
    (tmp_path / "garbled.csv").write_text(good)
    with pytest.raises(InputFileError, match="line 2"):
        read_case_csv(tmp_path / "garbled.csv")


def test_describe():
    d = describe([0.2, 0.4, 0.9, math.nan])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.5) and d["median"] == pytest.approx(0.4)
    assert d["std"] == pytest.approx(math.sqrt(((0.3) ** 2 + 0.1**2 + 0.4**2) / 3))
    assert describe([])["mean"] is None


def test_summary_counts_positives_negatives_and_presence():
    records = [
        rec("a", 0.6, presence=0.8),
        rec("b", 0.8, presence=0.3, hd=math.inf, tp=0, fn=1),  # presence missed
        rec("c", 1.0, n_gt=0, n_pred=0, presence=0.1, hd=0.0, tp=0),  # true negative
        rec("d", 0.0, n_gt=0, presence=0.7, hd=math.inf, tp=0, fp=1),  # false alarm on a negative
        rec("e", 0.9, concept="lesion"),
    ]
    s = summarise(records, presence_threshold=0.5, dataset="Kvasir-SEG", distance_unit="mm")
    polyp = s["concepts"]["polyp"]
    assert (polyp["n_cases"], polyp["n_positive"], polyp["n_negative"]) == (4, 2, 2)
    assert polyp["dice"]["mean"] == pytest.approx(0.7)  # positives only: (0.6 + 0.8) / 2
    assert polyp["dice_all"]["mean"] == pytest.approx((0.6 + 0.8 + 1.0 + 0.0) / 4)
    assert polyp["hd95"] == {**polyp["hd95"], "n": 1, "n_inf": 1, "median": 2.0}
    assert polyp["presence"]["accuracy"] == pytest.approx(2 / 4)
    assert polyp["instances"]["tp"] == 1 and polyp["instances"]["fp"] == 1 and polyp["instances"]["fn"] == 1
    assert s["overall"]["n_cases"] == 5 and s["dataset"] == "Kvasir-SEG"
    md = markdown_report(s)
    assert "| polyp | 4 (2/2) | 0.7000 ± 0.1000 | 0.7000 |" in md
    assert "2.00 (1 inf)" in md and "NSD@2mm" in md and "**overall** | 5 (3/2)" in md
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in lines}) == 1  # every row has the header's column count
