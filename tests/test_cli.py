"""The command line end to end: outputs on success, one-line errors and nothing written on failure."""

import json

import numpy as np
import pytest
from PIL import Image

from medsam3.cli import main


@pytest.fixture
def png(tmp_path, rgb_image):
    path = tmp_path / "scan.png"
    Image.fromarray(rgb_image).save(path)
    return path


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_masks_overlay_and_result(tmp_path, png, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(
        [
            "segment",
            png,
            "-p",
            "liver",
            "-p",
            "breast tumor",
            "--box",
            "10,10,60,50",
            "--model",
            "tiny",
            "--threshold",
            "0.2",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, stdout
    result = json.loads((out / "result.json").read_text())
    assert [p["prompt"] for p in result["prompts"]] == ["liver", "breast tumor"]
    assert result["image_size"] == [90, 130]
    for entry in result["prompts"]:
        mask = np.array(Image.open(out / entry["mask"]))
        assert mask.shape == (90, 130) and set(np.unique(mask)) <= {0, 255}
        assert entry["boxes_in"] == [[10.0, 10.0, 60.0, 50.0]]
        labels = np.array(Image.open(out / entry["instance_map"]))
        assert labels.max() == len(entry["instances"])
        for k, inst in enumerate(entry["instances"], start=1):
            assert inst["area"] >= (labels == k).sum()
        assert (mask > 0).sum() == (labels > 0).sum()
    assert np.array(Image.open(out / "overlay.png")).shape == (90, 130, 3)


def test_segment_with_saved_folder_equals_preset(tmp_path, png, tiny_folder, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(["segment", png, "-p", "polyp", "--model", "tiny", "--threshold", "0.2", "--out", a], capsys)[0] == 0
    assert (
        _run(["segment", png, "-p", "polyp", "--model", tiny_folder, "--threshold", "0.2", "--out", b], capsys)[0] == 0
    )
    ra, rb = (json.loads((d / "result.json").read_text())["prompts"] for d in (a, b))
    assert ra == rb


def test_long_prompt_warns_but_runs(tmp_path, png, capsys):
    code, _, err = _run(
        ["segment", png, "-p", "the big round tumor here", "--model", "tiny", "--out", tmp_path / "o"], capsys
    )
    assert code == 0
    assert "at most 3 words" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--box", "10,10,5,50"], "X1 > X0"),
        (["--box", "1,2,3"], "four numbers"),
        (["--box", "500,500,600,600"], "outside"),
        (["-p", " "], "empty prompt"),
        (["--model", "no-such-model"], "unknown model"),
        (["--window", "nonsense"], "window"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, png, capsys, args, message):
    out = tmp_path / "out"
    base = ["segment", png, "--model", "tiny", "--out", out]
    if "-p" not in args:
        base += ["-p", "liver"]
    code, _, err = _run(base + args, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), ""),
        (lambda p: p.write_bytes(b""), ""),
    ],
)
def test_bad_image_files(tmp_path, capsys, make, message):
    path = tmp_path / "broken.png"
    make(path)
    code, _, err = _run(["segment", path, "-p", "liver", "--model", "tiny", "--out", tmp_path / "o"], capsys)
    assert code == 2 and str(path) in err and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_nan_image_refused(tmp_path, capsys):
    import tifffile

    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, np.full((20, 20), np.nan, dtype=np.float32))
    code, _, err = _run(["segment", path, "-p", "liver", "--model", "tiny", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "nan.tif" in err


def test_adapter_for_another_base_refused(tmp_path, png, capsys):
    from medsam3.model import load_model
    from medsam3.model.adapter import save_adapter
    from medsam3.model.policy import apply_policy

    nano = load_model("nano-init", device="cpu")
    apply_policy(nano.model, "paper")
    save_adapter(nano, tmp_path / "adapter", "paper", ["spleen"])
    code, _, err = _run(
        [
            "segment",
            png,
            "-p",
            "spleen",
            "--model",
            "tiny",
            "--adapter",
            tmp_path / "adapter",
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert code == 2 and "adapter was trained on base 'nano-init'" in err


def test_info_table(capsys):
    code, out, _ = _run(["info", "tiny", "--policy", "paper"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if len(line.split()) == 4}
    assert "vision_encoder" in rows and "detr_decoder" in rows and "total" in rows
    assert rows["vision_encoder"][1] == "0"  # trainable column
    assert rows["detr_decoder"][1] == rows["detr_decoder"][0] != "0"  # the detector trains
    assert "backbone sam3" in out and "resize: stretch" in out


def test_segment_volume_and_video_commands(tmp_path, capsys):
    import SimpleITK as sitk

    from medsam3.data.phantoms import write_phantom_dataset

    ct = write_phantom_dataset(tmp_path / "ct3d", "ct3d", n=1, seed=0, test_fraction=0.0)
    volume = next((ct / "imagesTr").iterdir())
    out = tmp_path / "vol" / "mask.nii.gz"
    code, stdout, err = _run(["segment-volume", volume, "-p", "liver", "--model", "nano", "--out", out], capsys)
    assert code == 0, err
    source, mask = sitk.ReadImage(str(volume)), sitk.ReadImage(str(out))
    assert mask.GetSize() == source.GetSize() and mask.GetSpacing() == source.GetSpacing()
    assert mask.GetOrigin() == source.GetOrigin() and mask.GetDirection() == source.GetDirection()
    legend = json.loads((tmp_path / "vol" / "mask.json").read_text())
    assert legend["labels"] == {"1": "liver"} and "liver:" in stdout
    assert sitk.GetArrayFromImage(mask).max() == 1  # nano finds the liver in a phantom CT

    clips = write_phantom_dataset(tmp_path / "video", "video", n=1, seed=0, test_fraction=0.0)
    video = next((clips / "videos").iterdir())
    code, stdout, err = _run(
        ["segment-video", video, "-p", "polyp", "--model", "nano", "--out", tmp_path / "v"], capsys
    )
    assert code == 0, err
    tracks = json.loads((tmp_path / "v" / "tracks.json").read_text())
    assert tracks and (tmp_path / "v" / "overlay.mp4").is_file()
    assert len(list((tmp_path / "v" / "masks").glob("*.png"))) == int(stdout.split()[0])

    code, _, err = _run(
        ["segment-volume", volume, "-p", "liver", "--box", "1,1,9,9", "--out", tmp_path / "x.nii.gz"], capsys
    )
    assert code == 2 and "--box and --box-slice go together" in err


def test_evaluate_volumes_scores_in_3d_with_spacing(tmp_path, capsys):
    import SimpleITK as sitk

    from medsam3.data.phantoms import write_phantom_dataset
    from medsam3.evaluate.metrics import dice

    data = write_phantom_dataset(tmp_path / "ct3d", "ct3d", n=2, seed=5, test_fraction=0.0)
    out = tmp_path / "eval3d"
    code, stdout, err = _run(["evaluate", data, "--volumes", "--split", "all", "--model", "nano", "--out", out], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == "3D, spacing-aware" and summary["concepts"]["liver"]["n_volumes"] == 2
    assert summary["concepts"]["liver"]["dice_mean"] > 0.8  # nano knows the liver
    rows = (out / "per_case.csv").read_text().splitlines()
    assert rows[0].startswith("case,concept,split,dice") and len(rows) == 1 + 2 * 4
    assert "| liver |" in stdout
    # the per-case 3D Dice equals Dice over the whole label volume written by segment-volume
    case = sorted((data / "imagesTr").iterdir())[0]
    mask = tmp_path / "m.nii.gz"
    assert _run(["segment-volume", case, "-p", "liver", "--model", "nano", "--out", mask], capsys)[0] == 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / case.name.replace("_0000", "")))) == 1
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) == 1
    first = [r for r in rows[1:] if r.startswith(case.name.split("_0000")[0] + ",liver,")][0]
    assert float(first.split(",")[3]) == pytest.approx(dice(predicted, truth), abs=0.02)
