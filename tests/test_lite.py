"""The lite backbone: pinned pretrained towers behind the seam, its preprocessing, policy and files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam3.errors import ModelSpecError
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt
from medsam3.model import load_model
from medsam3.model.backbones import lite
from medsam3.model.components import component_of
from medsam3.model.export import export_model
from medsam3.model.policy import apply_policy
from medsam3.train.feature_cache import FeatureCache


def disk_image(height: int, width: int, center=(40, 60), radius=18) -> tuple[np.ndarray, np.ndarray]:
    """A gray image with one bright disk (an easy, unambiguous object) and its mask."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < radius**2
    image = rng.integers(30, 70, (height, width)).astype(np.uint8)
    image[mask] = 210
    return np.repeat(image[..., None], 3, axis=2), mask


def test_pinned_weights_are_digest_checked(tmp_path):
    fake = tmp_path / "lite_medsam.pth"
    fake.write_bytes(b"not the weights")
    with pytest.raises(ModelSpecError, match="SHA-256 does not match"):
        lite._checked(fake, lite.LITEMEDSAM_SHA256, lite.LITEMEDSAM_PACKAGE)
    assert lite.litemedsam_checkpoint().stat().st_size == lite.LITEMEDSAM_SIZE


def test_paper_policy_trains_exactly_neck_projection_and_detector(lite_init):
    model = lite_init.model
    apply_policy(model, "paper")
    trained = {component_of(n) for n, p in model.named_parameters() if p.requires_grad}
    frozen = {component_of(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert trained == {"vision_adapter", "text_projection", "geometry_encoder", "detr_encoder", "detr_decoder",
                       "mask_decoder", "dot_product_scoring"}  # fmt: skip
    assert frozen == {"vision_encoder", "text_encoder", "box_decoder", "semantic_head"}  # the head: its own stage
    model.train()
    assert not model.text_encoder.training and not model.vision_encoder.trunk.training  # no dropout in frozen towers
    assert model.detr_decoder.training
    model.eval()


def test_preprocessing_keeps_aspect_and_pads_right_bottom(lite_init):
    rgb, _ = disk_image(100, 200)
    pixels = lite_init.seam.pixel_values([rgb])
    assert pixels.shape == (1, 3, 256, 256)
    assert lite_init.seam.canvas_size(100, 200) == (200, 200)
    assert float(pixels[0, :, 128:].abs().max()) == 0.0  # padding below the content
    content = pixels[0, 0, :128]
    assert float(content.min()) == 0.0 and float(content.max()) == 1.0  # per-image min-max
    boxes, _ = lite_init.seam.box_tensors([[(0, 0, 200, 100)]], [[1]], [(100, 200)])
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.5, 0.25, 1.0, 0.5]))


def test_pretrained_box_decoder_draws_a_real_object(lite_init):
    """LiteMedSAM's own weights are in place: given a box, its decoder outlines the disk."""
    rgb, mask = disk_image(120, 160)
    predictor = Sam3Predictor(lite_init, score_threshold=0.0)
    predictor.set_image(rgb)
    scale = 256 / 160
    box = torch.tensor([[60 - 24, 40 - 24, 60 + 24, 40 + 24]], dtype=torch.float32) * scale  # xyxy, input px
    logits = lite_init.seam.box_masks(predictor._image.embedding, box)
    up = torch.nn.functional.interpolate(logits[None].sigmoid(), size=(160, 160), mode="bilinear")[0, 0, :120]
    found = up.numpy() > 0.5
    dice = 2 * (found & mask).sum() / (found.sum() + mask.sum())
    assert dice > 0.8


def test_predictor_outputs_at_original_size_for_both_mask_sources(lite_init):
    rgb, _ = disk_image(90, 140)
    for source in ("box-decoder", "detector"):
        predictor = Sam3Predictor(lite_init, score_threshold=0.0, max_batch=2, mask_source=source)
        predictor.set_image(rgb)
        text, boxed = predictor.predict(["liver", Prompt("liver", boxes=((30, 20, 90, 60),))])
        for result in (text, boxed):
            assert result.masks.shape[1:] == (90, 140) and result.semantic.shape == (90, 140)
            assert (result.boxes[:, [0, 2]] <= 140).all() and (result.boxes[:, [1, 3]] <= 90).all()
        assert predictor.encode_count == 1


def test_lite_masks_resize_logits_as_training_compares_them(lite_init):
    """The semantic map and the detector's masks reach the image size as logits, then the sigmoid:
    the resize train.losses.upsample_logits trains against, not transformers' resize of probabilities."""
    from medsam3.infer.postprocess import mask_probabilities
    from medsam3.train.losses import upsample_logits

    rgb, _ = disk_image(90, 140)
    predictor = Sam3Predictor(lite_init, score_threshold=0.0, mask_source="detector")
    predictor.set_image(rgb)
    [result] = predictor.predict(["liver"])
    outputs = predictor.detector_forward([Prompt("liver")])
    semantic = outputs.semantic_seg[0]
    trained = upsample_logits(semantic, (140, 140)).sigmoid()[0, :90, :140].numpy()
    np.testing.assert_allclose(result.semantic, trained, atol=1e-6)
    by_probability = mask_probabilities(semantic, (140, 140), "probabilities")[0, :90, :140].numpy()
    # an untrained map sits near logit 0, where the two resizes nearly agree; still 20x the tolerance
    assert np.abs(by_probability - trained).max() > 2e-5


def test_lite_folder_stores_only_trained_parts_and_loads_back(lite_init, tmp_path):
    with torch.no_grad():
        lite_init.model.detr_decoder.query_embed.weight.add_(0.5)  # make the state distinguishable
    try:
        folder = export_model(lite_init, tmp_path / "lite_model", ["liver"], {"name": "test"})
        from safetensors.torch import load_file

        names = set(load_file(str(folder / "model.safetensors")))
        assert not any(n.startswith(tuple(lite.PRETRAINED)) for n in names)  # towers come from packages
        assert (folder / "model.safetensors").stat().st_size < 30e6
        again = load_model(folder, device="cpu")
        assert again.backbone.name == "lite" and again.concepts == ["liver"]
        assert again.fingerprint == lite_init.fingerprint
        for name, tensor in again.model.state_dict().items():
            torch.testing.assert_close(tensor, lite_init.model.state_dict()[name], msg=name)
    finally:
        with torch.no_grad():
            lite_init.model.detr_decoder.query_embed.weight.sub_(0.5)


def test_lite_folder_with_wrong_weights_is_refused(lite_init, tmp_path):
    folder = export_model(lite_init, tmp_path / "bad", [], None)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop(next(n for n in tensors if not n.startswith("semantic_head.")))
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelSpecError, match="does not match the lite architecture"):
        load_model(folder, device="cpu")


def test_semantic_head_starts_as_the_identity_and_reads_the_prompt(lite_init, tmp_path):
    """A folder saved before the head existed (the bundled weights) predicts what it did; a trained
    head corrects the mask decoder's map, differently for each prompt."""
    from safetensors.torch import load_file, save_file

    folder = export_model(lite_init, tmp_path / "before_head", ["liver"], None)
    tensors = load_file(str(folder / "model.safetensors"))
    assert any(n.startswith("semantic_head.") for n in tensors)  # saved with the model from now on
    save_file({n: t for n, t in tensors.items() if not n.startswith("semantic_head.")},
              str(folder / "model.safetensors"))  # fmt: skip
    model = load_model(folder, device="cpu")
    raw = []
    model.model.mask_decoder.register_forward_hook(lambda _m, _i, out: raw.append(out.semantic_seg.detach().clone()))
    predictor = Sam3Predictor(model)
    predictor.set_image(disk_image(90, 140)[0])
    prompts = [Prompt("liver"), Prompt("kidney")]
    torch.testing.assert_close(predictor.detector_forward(prompts).semantic_seg, raw[-1], rtol=0, atol=0)
    with torch.no_grad():  # as if trained: a nonzero last layer and prompt modulation
        generator = torch.Generator().manual_seed(0)
        for layer in (model.model.semantic_head.out, model.model.semantic_head.prompt):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.05)
    correction = predictor.detector_forward(prompts).semantic_seg - raw[-1]
    assert float(correction[0].abs().mean()) > 1e-3
    assert float((correction[0] - correction[1]).abs().mean()) > 1e-4  # the prompt changes the correction


def test_feature_cache_stores_the_frozen_embedding_and_flipped_views(lite_init, tmp_path):
    rgb, _ = disk_image(64, 64)
    cache = FeatureCache(tmp_path / "cache", lite_init.seam)
    first = cache.encode([rgb, rgb[:, ::-1].copy()])
    assert cache.misses == 2 and first[0].shape == (2, 256, 64, 64)
    again = cache.encode([rgb[:, ::-1].copy()])
    assert cache.hits == 1 and cache.misses == 2  # the flipped view is one more cached view
    with torch.no_grad():
        fresh = lite_init.seam.embed_images([rgb])[0]
    torch.testing.assert_close(first[0][:1], fresh, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(again[0], first[0][1:])
