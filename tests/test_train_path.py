"""The training path end to end (issue 11, class 4): train_path and `medsam3 train`, resume, seeds,
auxiliary losses, volume order, --skip-bad, evaluate --volumes through the layout, time budgets."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from medsam3.cli import main
from medsam3.errors import MedSAM3Error
from medsam3.model import load_model
from medsam3.train.run import train_path
from medsam3.train.trainer import TrainConfig, Trainer
from train_helpers import disk_samples

FAST = dict(batch_size=2, lr=1e-3, grad_clip=1.0, progress=False, val_limit=2)


def _config(**kw):
    return TrainConfig(**{"epochs": 1, **FAST, **kw})


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _weights(loaded):
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}


def _disk_folder(root, cases=("c00", "c02", "c03", "c04")):
    """A 2D nnU-Net dataset of bright disks; c01 is the val case of the hashed split, the others train."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "blob": 1}, "channel_names": {"0": "x"}, "file_ending": ".png"})
    )
    for case, sample in zip(cases, disk_samples(len(cases), size=48, negatives=0)):
        Image.fromarray(sample.image).save(root / "imagesTr" / f"{case}_0000.png")
        Image.fromarray(sample.masks[0].astype(np.uint8)).save(root / "labelsTr" / f"{case}.png")
    return root


def _ct3d(root, n=2, seed=3):
    from medsam3.data.phantoms import write_phantom_dataset

    return write_phantom_dataset(root, "ct3d", n=n, seed=seed, size=32, test_fraction=0.0)


def _nan_volume(path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    nan = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(image).shape, np.nan, np.float32))
    nan.CopyInformation(image)
    sitk.WriteImage(nan, str(path))


# -- no validation samples, --epochs 0, the CLI on train_path ------------------------------------------


def test_without_val_cases_best_is_last_and_the_cli_says_so(tmp_path, capsys):
    data = _disk_folder(tmp_path / "disks")
    out = tmp_path / "run"
    args = ["train", data, "--base", "tiny", "--out", out, "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]
    code, stdout, err = _run([*args, "--epochs", "1"], capsys)
    assert code == 0, err
    assert "no validation samples" in stdout and f"adapter: {out / 'best'}" in stdout
    best, last = out / "best" / "adapter.safetensors", out / "last" / "adapter.safetensors"
    assert best.read_bytes() == last.read_bytes()
    load_model("tiny", device="cpu", adapter=out / "best")  # what the message tells the user to use
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["best"] == "best" and not summary["validated"]

    code, _, err = _run([*args, "--epochs", "0", "--out", tmp_path / "zero"], capsys)
    assert code == 2 and "--epochs" in err and ">= 1" in err and not (tmp_path / "zero").exists()
    with pytest.raises(MedSAM3Error, match="epochs must be at least 1"):
        Trainer(load_model("tiny", device="cpu"), disk_samples(2), tmp_path / "z", _config(epochs=0))

    code, _, err = _run([*args, "--keep", "newest", "--out", tmp_path / "keep"], capsys)
    assert code != 0 and "--keep must be one of auto, best, last, average, ema, average-ema, got 'newest'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "keep").exists()
    code, _, err = _run([*args, "--keep", "ema", "--ema-decay", "1", "--out", tmp_path / "ema"], capsys)
    assert code == 2 and "--ema-decay" in err and "in (0, 1)" in err and not (tmp_path / "ema").exists()


# -- resume ---------------------------------------------------------------------------------------------


def test_resume_at_an_epoch_end_and_refusals(tmp_path):
    data = disk_samples(4)  # 2 steps per epoch
    straight = load_model("tiny", device="cpu")
    Trainer(straight, data, tmp_path / "a", _config(epochs=2)).fit()

    stopped = load_model("tiny", device="cpu")
    summary = Trainer(stopped, data, tmp_path / "b", _config(epochs=2, max_steps=2)).fit()
    position = summary["position"]
    assert summary["stop_reason"] == "max_steps" and (position["epoch"], position["batch"]) == (0, 2)
    resumed = load_model("tiny", device="cpu")
    trainer = Trainer(resumed, data, tmp_path / "b", _config(epochs=2))
    trainer.resume()
    history = trainer.fit()["history"]  # used to raise UnboundLocalError: logged
    assert [row["epoch"] for row in history] == [1, 2] and history[0]["train_loss"] != ""
    reference = _weights(straight)
    for name, value in _weights(resumed).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=name)

    other_batch = Trainer(load_model("tiny", device="cpu"), data, tmp_path / "b", _config(epochs=3, batch_size=4))
    with pytest.raises(MedSAM3Error, match="cannot resume with --batch-size 4: .* --batch-size 2"):
        other_batch.resume()
    other_data = Trainer(load_model("tiny", device="cpu"), disk_samples(4, seed=5), tmp_path / "b", _config(epochs=3))
    with pytest.raises(MedSAM3Error, match="another training set"):
        other_data.resume()


# -- seeds ------------------------------------------------------------------------------------------------


def test_one_seed_gives_one_set_of_weights(tmp_path):
    """LoRA's initial weights and its dropout come from torch's RNG: the trainer seeds it from `seed`."""
    runs = []
    for k, (seed, disturb) in enumerate([(0, 1), (0, 2), (1, 1)]):
        torch.manual_seed(disturb)  # whatever the process did before
        np.random.seed(disturb)
        loaded = load_model("tiny", device="cpu")
        Trainer(loaded, disk_samples(4), tmp_path / f"r{k}", _config(policy="lora-detector", seed=seed)).fit()
        runs.append(_weights(loaded))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


# -- auxiliary decoder-layer losses ---------------------------------------------------------------------------


def test_aux_losses_of_earlier_decoder_layers_are_trained(tmp_path):
    loaded = load_model("tiny", device="cpu")
    trainer = Trainer(loaded, disk_samples(3, negatives=0), tmp_path / "run", _config(prompt_mode="mixed"))
    items = trainer._items(0, [0, 1, 2])
    outputs, targets, aux = trainer.forward_items(items)
    assert len(aux) == 1 and aux[0]["pred_logits"].shape == outputs["pred_logits"].shape  # tiny: 2 decoder layers
    with_aux, terms = trainer.loss(outputs, targets, aux_outputs=aux)
    without, _ = trainer.loss(outputs, targets)
    assert {"loss_cls_aux0", "loss_presence_aux0", "loss_bbox_aux0", "loss_giou_aux0"} <= set(terms)
    assert with_aux.item() > without.item()
    (with_aux - without).backward()  # the auxiliary part alone trains the first decoder layer, not the second
    grads = {n: p.grad for n, p in loaded.model.named_parameters() if p.grad is not None}
    assert sum(g.abs().sum().item() for n, g in grads.items() if n.startswith("detr_decoder.layers.0.")) > 0
    assert all(g.abs().sum() < 1e-6 for n, g in grads.items() if n.startswith("detr_decoder.layers.1."))
    assert not loaded.model.detr_decoder._forward_hooks  # the recorder is gone after each pass

    off = Trainer(load_model("tiny", device="cpu"), disk_samples(3), tmp_path / "off", _config(loss_weights={"aux": 0}))
    assert off.forward_items(off._items(0, [0, 1]))[2] == []
    assert "loss_cls_aux0" in trainer.train_step(0, [[0, 1]])


# -- 3D: volume-blocked order, --skip-bad on an all-NaN volume ------------------------------------------------


def test_volumes_are_decoded_once_per_epoch(tmp_path, monkeypatch):
    from medsam3.data.dataset import open_dataset
    from medsam3.data.layouts import readers

    data = _ct3d(tmp_path / "ct3d", n=3)
    train = open_dataset(data).select(concepts=["liver"])
    readers.clear_caches()
    decoded = []
    real = readers.read_volume
    monkeypatch.setattr(readers, "read_volume", lambda path, *a, **k: decoded.append(str(path)) or real(path, *a, **k))
    trainer = Trainer(load_model("tiny", device="cpu"), train, tmp_path / "run", _config(epochs=2, batch_size=8))
    assert trainer.volume_blocks
    orders = [trainer.epoch_indices(0), trainer.epoch_indices(1)]
    assert sorted(orders[0]) == list(range(len(train))) and orders[0] != orders[1]
    trainer.fit()
    images = Counter(p for p in decoded if "imagesTr" in p)
    assert set(images) == {str(p) for p in (data / "imagesTr").iterdir()}
    assert max(images.values()) <= 2  # at most once per epoch (a plain shuffle decodes ~ once per sample)
    readers.clear_caches()


def test_train_skip_bad_leaves_out_an_all_nan_volume(tmp_path):
    from medsam3.data.dataset import open_dataset

    data = _ct3d(tmp_path / "ct3d", n=3)
    case = open_dataset(data, split="train").cases[0]
    _nan_volume(data / "imagesTr" / f"{case}_0000.nii.gz")
    lines = []
    run = train_path(data, "tiny", tmp_path / "run", skip_bad=True, device="cpu", say=lines.append, max_steps=1, **FAST)
    assert len(run.skipped) == 1 and case in run.skipped[0] and "NaN" in run.skipped[0]
    assert any(line.startswith("warning: skipped") for line in lines)
    indexed = open_dataset(data, split="train").refs  # indexing reads headers only: the NaN case is there
    assert run.train_samples == len([ref for ref in indexed if ref.case_id != case]) > 0
    assert run.adapter.name in ("best", "last") and (run.adapter / "adapter.json").is_file()


# -- evaluate --volumes through the layout ----------------------------------------------------------------------


def test_evaluate_volumes_reads_msd_names_through_the_layout_and_skips_bad(tmp_path, capsys):
    data = _ct3d(tmp_path / "Task03_Liver", n=2)
    meta = json.loads((data / "dataset.json").read_text())
    names = {v: k for k, v in meta["labels"].items() if v}
    names[4] = "cancer"  # MSD Liver's name; the layout's phrase is "liver tumor"
    meta["labels"] = {"0": "background", **{str(v): n for v, n in sorted(names.items())}}
    meta["name"] = "Task03_Liver"
    (data / "dataset.json").write_text(json.dumps(meta))
    for image in (data / "imagesTr").iterdir():  # MSD names images like their labels (no _0000)
        image.rename(image.with_name(image.name.replace("_0000", "")))
    bad = sorted((data / "imagesTr").iterdir())[0]
    bad_case = bad.name.split(".")[0]
    _nan_volume(bad)

    args = ["evaluate", data, "--volumes", "--split", "all", "--model", "tiny", "--device", "cpu"]
    code, _, err = _run([*args, "--out", tmp_path / "e1"], capsys)
    assert code != 0 and "NaN" in err
    code, stdout, err = _run([*args, "--skip-bad", "--out", tmp_path / "e2"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert summary["n_skipped"] == 1 and summary["skipped"][0]["case"] == bad_case
    assert set(summary["concepts"]) == {"liver", "kidney", "spleen", "liver tumor"}  # phrases, not "cancer"
    rows = list(csv.DictReader((tmp_path / "e2" / "per_case.csv").open()))
    assert len(rows) == 4 and bad_case not in {r["case"] for r in rows}
    assert "Skipped 1" in stdout


# -- time budgets ---------------------------------------------------------------------------------------------


def test_max_minutes_stops_after_the_crossing_step_and_records_it(tmp_path, capsys):
    loaded = load_model("tiny", device="cpu")
    out = tmp_path / "run"
    summary = Trainer(loaded, disk_samples(6), out, _config(epochs=5, max_minutes=1e-6), val_data=disk_samples(2)).fit()
    assert summary["stop_reason"] == "max_minutes" and summary["position"]["step"] == 1
    assert (out / "last" / "adapter.json").is_file() and (out / "best" / "adapter.json").is_file()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["epoch"]) == pytest.approx(1 / 3, abs=1e-3) and rows[0]["val_dice"]
    assert json.loads((out / "summary.json").read_text())["max_minutes"] == 1e-6
    resumed = Trainer(load_model("tiny", device="cpu"), disk_samples(6), out, _config(epochs=1))
    resumed.resume()
    assert resumed.fit()["position"]["step"] == 3  # a budget-stopped run continues where it stopped

    data = _disk_folder(tmp_path / "disks")
    unet = tmp_path / "unet"
    args = ["baseline", "unet", data, "--out", unet, "--epochs", "50", "--size", "32", "--batch-size", "2"]
    code, stdout, err = _run([*args, "--max-minutes", "1e-6"], capsys)
    assert code == 0, err
    config = json.loads((unet / "config.json").read_text())
    assert config["stop_reason"] == "max_minutes" and config["steps"] == 1 and config["max_minutes"] == 1e-6
    assert "stopped by --max-minutes" in stdout and len((unet / "train_log.csv").read_text().splitlines()) == 2
    code, _, err = _run([*args, "--max-minutes", "0", "--out", tmp_path / "u0"], capsys)
    assert code == 2 and "--max-minutes" in err


def test_train_refuses_an_output_inside_the_dataset_or_a_file(tmp_path):
    from medsam3.cli import main

    data = tmp_path / "data"
    from medsam3.data.phantoms import write_phantom_dataset

    write_phantom_dataset(data, "nuclei", n=2, seed=0)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    assert main(["train", str(data), "--base", "tiny", "--out", str(data / "run"), "--epochs", "1"]) == 2
    (tmp_path / "afile").write_text("x")
    assert main(["train", str(data), "--base", "tiny", "--out", str(tmp_path / "afile"), "--epochs", "1"]) == 2
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into the data
    assert (tmp_path / "afile").read_text() == "x"


def test_the_cli_keeps_the_weight_average_when_asked(tmp_path, capsys):
    data = _disk_folder(tmp_path / "data", cases=("c00", "c01", "c02", "c03"))  # c01: the validation case
    out = tmp_path / "run"
    args = ["train", data, "--base", "tiny", "--out", out, "--batch-size", "2", "--lr", "1e-3", "--device", "cpu",
            "--epochs", "2", "--keep", "ema", "--ema-decay", "0.5", "--no-choose-mask-sources"]  # fmt: skip
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    assert "the moving average of the weights (--keep ema" in stdout and f"adapter: {out / 'best'}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == "ema"
    meta = json.loads((out / "best" / "adapter.json").read_text())
    assert meta["selected_by"] == "exponential moving average of the weights (decay 0.5)"
    assert (out / "best" / "adapter.safetensors").read_bytes() != (out / "last" / "adapter.safetensors").read_bytes()


def test_the_cli_says_whether_the_semantic_head_was_kept(tmp_path, capsys):
    """By default a lite run fits its semantic head and validation judges it; the CLI says what it decided
    and on which numbers, and the summary, best/'s metadata and the line agree."""
    data = _disk_folder(tmp_path / "data", cases=("c00", "c01", "c02", "c03"))  # c01: the validation case
    out = tmp_path / "run"
    args = ["train", data, "--base", "lite-init", "--out", out, "--batch-size", "2", "--device", "cpu",
            "--epochs", "1", "--head-steps", "5", "--no-choose-mask-sources"]  # fmt: skip
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    head = json.loads((out / "summary.json").read_text())["semantic_head"]
    assert head["steps"] == 5 and json.loads((out / "best" / "adapter.json").read_text())["semantic_head"] == head
    before, after = head["validation"]["without"], head["validation"]["with"]
    line = next(line for line in stdout.splitlines() if line.startswith("semantic head: "))
    assert line.startswith(f"semantic head: {'kept' if head['kept'] else 'not kept'} (")
    assert f"held-out images {before['images']:.3f} -> {after['images']:.3f}" in line
