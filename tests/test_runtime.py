"""OpenVINO runs lite's frozen image tower on CPU: same embedding as PyTorch, cached conversion, safe fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsam3.data.dataset import open_dataset
from medsam3.data.phantoms import write_phantom_dataset
from medsam3.errors import ModelSpecError
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt
from medsam3.model import load_model, runtime
from medsam3.model.policy import apply_policy

CPU = torch.device("cpu")


def _rgbs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (120 + 9 * k, 150, 3)).astype(np.uint8) for k in range(n)]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def lite_pair():
    """lite-init twice: its tower on OpenVINO and on PyTorch (fp32)."""
    return load_model("lite-init", device="cpu", runtime="openvino"), load_model("lite-init", device="cpu")


def test_choice_follows_device_backbone_and_request():
    assert runtime.choose_runtime("auto", CPU, exportable=True).name == "openvino"
    assert runtime.choose_runtime("torch", CPU, exportable=True).name == "torch"
    gpu = runtime.choose_runtime("auto", torch.device("cuda"), exportable=True)
    assert gpu.name == "torch" and "cuda" in gpu.reason
    sam3 = runtime.choose_runtime("auto", CPU, exportable=False)
    assert sam3.name == "torch" and "not exported" in sam3.reason
    with pytest.raises(ModelSpecError, match="--runtime openvino: this backbone"):
        runtime.choose_runtime("openvino", CPU, exportable=False)
    with pytest.raises(ModelSpecError, match="--runtime 'onnx'"):
        runtime.choose_runtime("onnx", CPU, exportable=True)
    assert load_model("nano", device="cpu", runtime="auto").seam.runtime == "torch"  # SAM 3 towers stay in torch


def test_openvino_embedding_equals_torch_for_any_batch(lite_pair):
    fast, plain = lite_pair
    assert fast.seam.runtime == "openvino" and fast.precision.runtime == "openvino"
    assert plain.seam.runtime == "torch"
    images = _rgbs(3)
    before = fast.seam.image_encodes
    with torch.inference_mode():
        got, want = fast.seam.embed_images(images), plain.seam.embed_images(images)
    assert fast.seam.image_encodes - before == 3
    assert got[0].shape == want[0].shape == (3, 256, 64, 64) and got[0].dtype == torch.float32
    assert _relative_error(got[0], want[0]) < 1e-4
    with torch.inference_mode():
        single = fast.seam.embed_images(images[1:2])
    assert _relative_error(single[0], want[0][1:2]) < 1e-4  # batch of one: the same model


def _small_tower() -> torch.nn.Module:
    """A few-layer conv tower: the disk cache's mechanics, without tracing lite's 75-GFLOP TinyViT
    (test_openvino_embedding_equals_torch_for_any_batch converts that one)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=4, padding=1), torch.nn.GELU(), torch.nn.Conv2d(16, 32, 1)
    ).eval()


def test_conversion_is_cached_on_disk_and_a_damaged_entry_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM3_CACHE", str(tmp_path))
    module = _small_tower()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        want = module(x)
    first = runtime.OpenVinoTower(module, "fp32")(x)
    entries = list((tmp_path / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "tower.xml").is_file() and (entries[0] / "tower.bin").is_file()

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced again although the conversion is on disk")

    with monkeypatch.context() as patched:
        patched.setattr(torch.jit, "trace", no_tracing)
        second = runtime.OpenVinoTower(module, "fp32")(x)
    assert _relative_error(first, want) < 1e-4 and torch.equal(first, second)
    (entries[0] / "tower.xml").write_text("<not a model")
    third = runtime.OpenVinoTower(module, "fp32")(x)  # re-converted, not an error
    assert _relative_error(third, want) < 1e-4
    assert "net" in (entries[0] / "tower.xml").read_text()[:400]


def test_an_unwritable_cache_only_costs_a_conversion(tmp_path, monkeypatch):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("MEDSAM3_CACHE", str(blocked))
    module = _small_tower()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        want = module(x)
    assert _relative_error(runtime.OpenVinoTower(module, "fp32")(x), want) < 1e-4
    assert blocked.read_text() == "not a folder"


def test_changed_weights_and_gradients_fall_back_to_torch():
    loaded = load_model("lite-init", device="cpu", runtime="openvino")
    trunk = loaded.model.vision_encoder.trunk
    images = _rgbs(1, seed=3)
    assert loaded.seam.embed_images(images, grad=True)[0].requires_grad  # gradients: PyTorch
    with torch.no_grad():
        converted = loaded.seam.embed_images(images)[0]
        for parameter in trunk.parameters():
            parameter.mul_(0.5)  # as a LoRA/full fine-tuning step would change them
        after = loaded.seam.embed_images(images)[0]
        want = trunk(loaded.seam.pixel_values(images))
    assert not loaded.seam._fast_tower.usable()
    assert torch.equal(after, want) and _relative_error(after, converted) > 0.05


def test_paper_policy_training_keeps_the_tower_on_openvino():
    loaded = load_model("lite-init", device="cpu", runtime="openvino")
    apply_policy(loaded.model, "paper")
    loaded.model.train()
    with torch.no_grad():
        loaded.seam.embed_images(_rgbs(1))
    assert loaded.seam._fast_tower.usable()


@pytest.mark.parametrize("towers", ["fp32", "bf16"])
def test_fidelity_guard_openvino_masks_match_plain_fp32_on_phantoms(tmp_path, towers):
    """The fast path never silently changes results (bundled lite, against PyTorch fp32 masks).

    fp32 on OpenVINO: every decision and mask the same (Dice >= 0.99, presence within 0.01). bf16 is
    only used when asked for (auto keeps lite in fp32 for this reason): where fp32 is confident
    (presence >= 0.9) masks agree at Dice >= 0.9 (measured 0.989-0.997 with the stage-3 weights,
    0.918-0.997 with stage 4's: the detector's instance masks, liver's source, move most); a decision
    may flip only near the threshold (measured: one of 5 livers, fp32 presence 0.45, bf16 0.76).
    """
    folder = write_phantom_dataset(tmp_path / "ct", "ct", n=8, seed=78)
    samples = [s for s in open_dataset(folder) if s.concept == "liver" and len(s.masks)][:5]
    plain = Sam3Predictor(load_model("lite", device="cpu", towers="fp32", runtime="torch"))
    fast = Sam3Predictor(load_model("lite", device="cpu", towers=towers, runtime="openvino"))
    confident, uncertain = [], []  # (found, agreement, presence gap) | fp32 presence of a flipped decision
    for sample in samples:
        plain.set_image(sample.image)
        fast.set_image(sample.image)
        a, b = plain.predict_one(Prompt("liver")), fast.predict_one(Prompt("liver"))
        both = a.union.sum() + b.union.sum()
        agreement = float(2 * (a.union & b.union).sum() / both) if both else 1.0  # both found nothing: agree
        if towers == "fp32" or a.presence >= 0.9:
            confident.append((bool(a.union.any()), agreement, abs(a.presence - b.presence)))
        elif a.union.any() != b.union.any():
            uncertain.append(a.presence)
    assert sum(found for found, _, _ in confident) >= 3, confident  # livers were found: not vacuous
    assert min(agreement for _, agreement, _ in confident) >= (0.99 if towers == "fp32" else 0.9), confident
    assert max(gap for _, _, gap in confident) < (0.01 if towers == "fp32" else 0.05), confident
    assert all(0.2 < presence < 0.8 for presence in uncertain), uncertain


def test_cli_runtime_reaches_info_and_result_json_and_is_restored(tmp_path, rgb_image):
    from PIL import Image

    from medsam3.cli import main

    Image.fromarray(rgb_image).save(tmp_path / "img.png")
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "img.png"), "-p", "liver", "-m", "lite-init", "--runtime", "torch",
                 "--dtype", "fp32", "--out", str(out)])  # fmt: skip
    assert code == 0
    recorded = json.loads((out / "result.json").read_text())["precision"]
    assert recorded["runtime"] == "torch" and recorded["runtime_reason"] == "asked for"
    assert runtime.default_runtime() == "torch"  # the library default is back after the command
    assert main(["segment", str(tmp_path / "img.png"), "-p", "liver", "-m", "nano", "--runtime", "openvino",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert not (tmp_path / "x" / "result.json").exists()
    assert main(["segment", str(tmp_path / "img.png"), "-p", "liver", "--runtime", "onnx",
                 "--out", str(tmp_path / "y")]) == 2  # fmt: skip


def test_auto_keeps_lite_fp32_where_bf16_moves_its_masks(monkeypatch):
    from medsam3.model import precision

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda flags=None: "amx")
    monkeypatch.setattr(precision, "measured_bf16_speedup", lambda threads: 6.0)
    lite = load_model("lite-init", device="cpu", towers="auto", runtime="torch")
    assert lite.precision.dtype == "fp32" and "near-threshold" in lite.precision.reason
    assert load_model("nano", device="cpu", towers="auto").precision.dtype == "bf16"  # passes its guard
    assert load_model("lite-init", device="cpu", towers="bf16", runtime="torch").precision.dtype == "bf16"


def test_info_reports_the_runtime(capsys):
    from medsam3.cli import main

    assert main(["info", "lite-init", "--runtime", "openvino", "--dtype", "fp32"]) == 0
    assert "image tower runs on openvino (asked for, OpenVINO" in capsys.readouterr().out
