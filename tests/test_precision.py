"""bf16 towers where the CPU makes them fast, fp32 elsewhere, and the fast path never changes results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam3.data.dataset import open_dataset
from medsam3.data.phantoms import write_phantom_dataset
from medsam3.errors import ModelSpecError
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt
from medsam3.model import load_model, precision
from medsam3.model.policy import apply_policy
from medsam3.train.feature_cache import FeatureCache


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2 * (a & b).sum() / (a.sum() + b.sum())


def test_cpu_support_read_from_flags():
    assert precision.cpu_bf16_support({"avx2", "amx_bf16", "avx512_bf16"}) == "amx"
    assert precision.cpu_bf16_support({"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert precision.cpu_bf16_support({"avx2", "fma"}) == "none"


def test_auto_chooses_by_support_and_measurement(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda flags=None: "none")
    assert precision.choose_precision("auto", cpu).dtype == "fp32"  # never bf16 without the instructions
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda flags=None: "avx512_bf16")
    monkeypatch.setattr(precision, "measured_bf16_speedup", lambda threads: 0.4)
    assert precision.choose_precision("auto", cpu).dtype == "fp32"  # flags alone are not enough
    monkeypatch.setattr(precision, "measured_bf16_speedup", lambda threads: 2.5)
    chosen = precision.choose_precision("auto", cpu)
    assert chosen.dtype == "bf16" and "2.5x" in chosen.reason
    assert precision.choose_precision("fp32", cpu).dtype == "fp32"
    with pytest.raises(ModelSpecError, match="--dtype 'fp16'"):
        precision.choose_precision("fp16", cpu)


def test_speedup_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM3_CACHE", str(tmp_path))
    precision.measured_bf16_speedup.cache_clear()
    calls = []
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, **_: calls.append(dtype) or 10.0)
    assert precision.measured_bf16_speedup(1) == 1.0
    precision.measured_bf16_speedup.cache_clear()
    assert precision.measured_bf16_speedup(1) == 1.0 and len(calls) == 2  # second process reads the file
    assert (tmp_path / "precision.json").is_file()
    precision.measured_bf16_speedup.cache_clear()


def test_bf16_towers_keep_trainable_parts_fp32():
    loaded = load_model("nano", device="cpu", towers="bf16")
    apply_policy(loaded.model, "paper")
    assert loaded.seam.tower_dtype == torch.bfloat16 and loaded.seam.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters() if p.requires_grad)
    assert loaded.precision.dtype == "bf16"


def test_fidelity_guard_bf16_masks_match_fp32_on_phantoms(tmp_path):
    """The fast path never silently changes results: Dice >= 0.99 between bf16 and fp32 masks."""
    folder = write_phantom_dataset(tmp_path / "ct", "ct", n=6, seed=77)
    samples = [s for s in open_dataset(folder) if s.concept == "liver" and len(s.masks)][:5]
    fp32 = Sam3Predictor(load_model("nano", device="cpu", towers="fp32"))
    bf16 = Sam3Predictor(load_model("nano", device="cpu", towers="bf16"))
    agreements, presence_gaps = [], []
    for sample in samples:
        fp32.set_image(sample.image)
        bf16.set_image(sample.image)
        a, b = fp32.predict_one(Prompt("liver")), bf16.predict_one(Prompt("liver"))
        agreements.append(_dice(a.union, b.union))
        presence_gaps.append(abs(a.presence - b.presence))
    assert len(samples) >= 4 and min(agreements) >= 0.99, agreements
    assert max(presence_gaps) < 0.05, presence_gaps


def test_feature_cache_stores_bf16_for_bf16_towers(tmp_path):
    loaded = load_model("tiny", device="cpu", towers="bf16")
    cache = FeatureCache(tmp_path / "cache", loaded.seam)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    cache.encode([rgb])
    assert cache.stored_dtype == torch.bfloat16
    fp32_cache_fingerprint = FeatureCache(tmp_path / "other", load_model("tiny", device="cpu").seam).fingerprint
    assert cache.fingerprint != fp32_cache_fingerprint  # bound to the dtype the encoder ran in


def test_cli_dtype_reaches_result_json_and_is_restored(tmp_path, rgb_image):
    from PIL import Image

    from medsam3.cli import main
    from medsam3.model.precision import default_towers

    Image.fromarray(rgb_image).save(tmp_path / "img.png")
    for choice in ("fp32", "bf16"):
        out = tmp_path / f"out_{choice}"
        code = main(["segment", str(tmp_path / "img.png"), "-p", "liver", "-m", "tiny", "--dtype", choice,
                     "--out", str(out), "--no-normalize"])  # fmt: skip
        assert code == 0
        import json

        assert json.loads((out / "result.json").read_text())["precision"]["dtype"] == choice
    assert default_towers() == "fp32"  # the library default is back after the command
    assert main(["segment", str(tmp_path / "img.png"), "-p", "liver", "-m", "tiny", "--dtype", "fp16",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip


def test_cpu_autocast_trains_fp32_master_weights_from_a_feature_cache(tmp_path):
    """bf16 autocast on CPU (TrainConfig.cpu_autocast) runs the trained parts only; the cache read stays fp16."""
    from medsam3.train.trainer import TrainConfig, Trainer
    from train_helpers import disk_samples

    loaded = load_model("nano-init", device="cpu")
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, progress=False, val_limit=2, cache_features=True,
                         cpu_autocast=True)  # fmt: skip
    trainer = Trainer(loaded, disk_samples(2), tmp_path / "run", config)
    assert trainer.autocast and trainer.autocast_device == "cpu"
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    trainer.fit()
    after = dict(loaded.model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)  # master weights stay fp32
    assert any(not torch.equal(after[n], w) for n, w in before.items())  # and they trained
    assert not Trainer(load_model("nano-init", device="cpu"), disk_samples(2), tmp_path / "b",
                       TrainConfig(epochs=1, progress=False)).autocast  # off unless asked for on CPU  # fmt: skip
