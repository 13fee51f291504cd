"""compare_runs on runs written by the report writer: paired differences, Wilcoxon, paper numbers."""

from __future__ import annotations

import json

import pytest

from medsam3.errors import InputFileError, MedSAM3Error
from medsam3.evaluate.compare import compare_runs, paired_test
from medsam3.evaluate.paper import match_datasets, paper_entries, published_for
from medsam3.evaluate.report import CaseRecord, write_case_csv


def rec(case, dice, concept="breast tumor", n_gt=1, source=""):
    return CaseRecord(case, concept, "test", dice, dice, dice, 1.0, 0.9, n_gt > 0, 1, n_gt, 0.1, source=source)


def write_run(path, records, **summary):
    write_case_csv(records, path / "per_case.csv")
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_paired_difference_and_wilcoxon(tmp_path):
    base_scores = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    base = [rec(f"c{i}", d) for i, d in enumerate(base_scores)] + [rec("neg", 1.0, n_gt=0)]
    better = [rec(f"c{i}", d + 0.1) for i, d in enumerate(base_scores[:5])] + [rec("c5", 0.95)]
    a = write_run(tmp_path / "sam3_text", base, dataset="BUSI", model="sam3", prompt_mode="text")
    b = write_run(tmp_path / "medsam3_box", [*reversed(better)], dataset="BUSI", prompt_mode="text+box")
    cmp = compare_runs([a, b])
    (row,) = cmp.rows
    assert row.concept == "breast tumor" and row.counts == [6, 6]  # the negative is left out
    assert row.means[0] == pytest.approx(sum(base_scores) / 6)
    assert row.diffs[0] == pytest.approx(0.5 / 6) and row.paired_n == [6]
    # five positive differences and one zero: zeros dropped, exact test on n=5 -> p = 2/32
    assert row.p_values[0] == pytest.approx(0.0625)
    md = cmp.markdown()
    assert "| breast tumor | 6 | 0.7417 | 0.8250 | +0.0833 (p=0.0625, n=6) |" in md
    assert "Published Dice for BUSI" in md and "| 2 | MedSAM-3 T+I | BUSI | 0.7772 |" in md
    assert "sam3_text: dataset BUSI, model sam3, prompt_mode text" in md
    md_path, json_path = cmp.save(tmp_path / "comparison")
    assert md_path.read_text() == md
    saved = json.loads(json_path.read_text())
    assert saved["rows"][0]["p_values"] == [pytest.approx(0.0625)]
    assert saved["runs"][1]["label"] == "medsam3_box"


def test_too_few_pairs_and_only_common_cases(tmp_path):
    a = write_run(tmp_path / "a", [rec("x", 0.2), rec("y", 0.4), rec("z", 0.6, concept="polyp")], dataset="mine")
    b = write_run(tmp_path / "b", [rec("x", 0.3), rec("q", 0.9), rec("z", 0.5, concept="polyp")], dataset="mine")
    cmp = compare_runs([a, b])
    tumor, polyp, overall = cmp.rows
    assert tumor.paired_n == [1] and tumor.diffs[0] == pytest.approx(0.1) and tumor.p_values == [None]
    assert tumor.means == [pytest.approx(0.3), pytest.approx(0.6)]  # each run's own positives
    assert overall.concept == "overall" and overall.paired_n == [2]
    assert overall.diffs[0] == pytest.approx((0.1 - 0.1) / 2)
    md = cmp.markdown()
    assert "p: too few" in md and "Published" not in md


def test_slices_sharing_a_case_id_join_on_source(tmp_path):
    a = write_run(
        tmp_path / "a",
        [rec("vol1", 0.5, source="vol1.nii.gz#z=3"), rec("vol1", 0.7, source="vol1.nii.gz#z=4")],
    )
    b = write_run(
        tmp_path / "b",
        [rec("vol1", 0.9, source="/other/vol1.nii.gz#z=4"), rec("vol1", 0.6, source="/other/vol1.nii.gz#z=3")],
    )
    (row,) = compare_runs([a, b]).rows
    assert row.paired_n == [2] and row.diffs[0] == pytest.approx((0.1 + 0.2) / 2)


def test_compare_errors(tmp_path):
    with pytest.raises(InputFileError, match="not an evaluation folder"):
        compare_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no per-case CSV"):
        compare_runs([tmp_path / "empty"])
    a = write_run(tmp_path / "a", [rec("x", 0.2)])
    with pytest.raises(MedSAM3Error, match="metric"):
        compare_runs([a], metric="hausdorff")


def test_paired_test_exact_values():
    assert paired_test([0.1] * 5, [0.2] * 5) is None
    assert paired_test([0.3] * 6, [0.3] * 6) == 1.0
    assert paired_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]) == pytest.approx(2 / 64)


def test_paper_numbers_are_data():
    entries = paper_entries()
    assert {e.table for e in entries} == {"2", "3", "4", "5", "6"}
    t2 = {(e.method, e.dataset): e.dice for e in entries if e.table == "2"}
    assert t2[("MedSAM-3 T+I", "Kvasir-SEG")] == 0.8831 and t2[("U-Net", "BUSI")] == 0.7618
    assert len(t2) == 24  # six methods by four datasets
    assert match_datasets("Dataset002_Kvasir-SEG") == ["Kvasir-SEG"]
    assert match_datasets("rim-one", concept="optic disc") == ["RIM-ONE Disc"]
    assert match_datasets("unknown set") == []
    assert [e.dice for e in published_for("lits")] == [0.7714, 0.1374]
