"""The U-Net baseline end to end on a tiny paired-folder dataset of bright disks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from medsam3.errors import DatasetError, ModelSpecError, PromptError
from medsam3.evaluate.baseline_unet import UNetSegmenter, is_unet_run, train_unet_baseline
from medsam3.evaluate.compare import compare_runs
from medsam3.evaluate.runner import evaluate_dataset
from medsam3.infer.types import Prompt

SMALL = dict(size=64, channels=(8, 16, 32), num_res_units=1, batch_size=4, lr=1e-2, progress=False)


def disk_dataset(root, n_train=10, n_test=4, size=64, seed=0):
    """images/{train,test}/*.png with one bright noisy disk each, masks/ 0/255, concepts.yaml."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_train), ("test", n_test)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            cy, cx = rng.integers(16, size - 16, 2)
            r = rng.integers(7, 13)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            img = rng.normal(60, 20, (size, size)) + 120 * disk
            rgb = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            Image.fromarray(rgb).save(root / "images" / split / f"{split}{i:02d}.png")
            Image.fromarray(disk.astype(np.uint8) * 255).save(root / "masks" / split / f"{split}{i:02d}.png")
    (root / "concepts.yaml").write_text("1: cyst\n")
    return root


def mean_dice(result):
    return result.summary["overall"]["dice"]["mean"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return disk_dataset(tmp_path_factory.mktemp("disks") / "Disks")


def test_unet_learns_and_is_scored_like_any_segmenter(data, tmp_path):
    from medsam3.data.dataset import open_dataset

    train_unet_baseline(data, tmp_path / "unet0", epochs=0, **SMALL)
    trained = train_unet_baseline(data, tmp_path / "unet", epochs=20, **SMALL)
    assert trained.config.n_train_samples == 10 and trained.config.split == "train"
    assert trained.history[-1] < 0.8 * trained.history[0]
    test = open_dataset(data, split="test")
    concept = test[0].concept
    assert trained.config.concepts == [concept]
    before = evaluate_dataset(
        test, UNetSegmenter.from_dir(tmp_path / "unet0"), out_dir=tmp_path / "e0", progress=False
    )
    after = evaluate_dataset(
        test, UNetSegmenter.from_dir(tmp_path / "unet"), out_dir=tmp_path / "e1", progress=False
    )
    assert mean_dice(after) > 0.8
    assert mean_dice(after) > mean_dice(before) + 0.3
    assert after.summary["concepts"][concept]["presence"]["accuracy"] == 1.0
    assert all(r.n_pred == 1 for r in after.records)  # one disk -> one connected component

    files = {p.name for p in (tmp_path / "unet").iterdir()}
    assert {"config.json", "model.safetensors", "train_log.csv"} <= files and is_unet_run(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["epochs"] == 20 and config["channels"] == [8, 16, 32]
    with open(tmp_path / "unet" / "train_log.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 20

    (row,) = compare_runs([tmp_path / "e0", tmp_path / "e1"], labels=["untrained", "trained"]).rows
    assert row.diffs[0] == pytest.approx(mean_dice(after) - mean_dice(before))


def test_same_seed_same_weights_and_protocol_errors(data, tmp_path):
    a = train_unet_baseline(data, tmp_path / "a", epochs=1, **SMALL)
    b = train_unet_baseline(data, tmp_path / "b", epochs=1, **SMALL)
    assert a.history == b.history
    seg = UNetSegmenter.from_dir(tmp_path / "a")
    rgb = np.asarray(Image.open(next((data / "images" / "test").iterdir())).convert("RGB"))
    seg.set_image(rgb)
    (res,) = seg.predict([Prompt(a.config.concepts[0])], score_threshold=0.0)
    assert res.semantic.shape == rgb.shape[:2] and res.presence == pytest.approx(float(res.semantic.max()))
    assert res.masks.shape[1:] == rgb.shape[:2] and list(res.scores) == sorted(res.scores, reverse=True)
    with pytest.raises(PromptError, match="cannot segment 'liver'"):
        seg.predict([Prompt("liver")])
    with pytest.raises(ModelSpecError, match="not a U-Net baseline folder"):
        UNetSegmenter.from_dir(tmp_path)
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(ModelSpecError, match="model.safetensors is missing"):
        UNetSegmenter.from_dir(tmp_path / "a")
    with pytest.raises(DatasetError, match="split 'val' has no samples"):
        train_unet_baseline(data, tmp_path / "c", epochs=1, split="val", **SMALL)


def test_evaluate_path_dispatches_unet_folders(data, tmp_path):
    from medsam3.evaluate.runner import evaluate_path
    from medsam3.evaluate.segmenters import load_segmenter

    train_unet_baseline(data, tmp_path / "unet", epochs=2, **SMALL)
    assert isinstance(load_segmenter(str(tmp_path / "unet"), device="cpu"), UNetSegmenter)
    with pytest.raises(ModelSpecError, match="takes no SAM 3 adapter"):
        load_segmenter(str(tmp_path / "unet"), adapter=tmp_path)
    res = evaluate_path(data, str(tmp_path / "unet"), out_dir=tmp_path / "ev", device="cpu", progress=False)
    assert res.summary["dataset"] == "Disks" and res.summary["split"] == "test"
    assert res.summary["model"] == str(tmp_path / "unet") and len(res.records) == 4
    assert (tmp_path / "ev" / "report.md").is_file()
