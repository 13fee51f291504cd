"""SAM 3's optimiser groups: per-component rates, layer decay over ViT blocks, no decay on biases/norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsam3.errors import MedSAM3Error
from medsam3.model import load_model
from medsam3.model.policy import apply_policy
from medsam3.train.optim import (
    LAYER_DECAY,
    TEXT_LR_SCALE,
    VISION_LR_SCALE,
    build_optimizer,
    is_norm_module,
    vision_layer_scale,
)

LR = 8e-5


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    found: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in found, "a parameter is in two groups"
            found[id(param)] = group
    return found


@pytest.fixture(scope="module")
def full_tiny():
    """transformers' Sam3 (random tiny config) with every parameter trainable."""
    loaded = load_model("tiny", device="cpu")
    apply_policy(loaded.model, "full")
    return loaded.model


def test_sam3_rates_and_layer_decay_over_vit_blocks(full_tiny):
    optimizer, info = build_optimizer(full_tiny, LR, 0.1)
    assert VISION_LR_SCALE == pytest.approx(2.5e-5 / 8e-5) and TEXT_LR_SCALE == pytest.approx(5e-6 / 8e-5)
    groups = _groups_by_param(optimizer)
    params = dict(full_tiny.named_parameters())
    depth = 1 + max(
        int(n.split(".layers.")[1].split(".")[0]) for n in params if n.startswith("vision_encoder.backbone.layers.")
    )
    assert depth >= 2
    vision = LR * 2.5e-5 / 8e-5
    block_lr = []
    for block in range(depth):
        weight = params[f"vision_encoder.backbone.layers.{block}.mlp.fc1.weight"]
        assert groups[id(weight)]["lr"] == pytest.approx(vision * 0.9 ** (depth - block))
        block_lr.append(groups[id(weight)]["lr"])
    assert block_lr == sorted(block_lr) and block_lr[0] < block_lr[-1]  # deeper blocks learn faster
    patch = params["vision_encoder.backbone.embeddings.patch_embeddings.projection.weight"]
    assert groups[id(patch)]["lr"] == pytest.approx(vision * 0.9 ** (depth + 1))
    assert groups[id(params["vision_encoder.backbone.embeddings.position_embeddings"])]["lr"] == pytest.approx(vision)
    neck = next(p for n, p in params.items() if n.startswith("vision_encoder.neck.") and p.ndim > 1)
    assert groups[id(neck)]["lr"] == pytest.approx(vision)
    for name, param in params.items():
        head = name.split(".", 1)[0]
        if head in ("text_encoder", "text_projection"):
            assert groups[id(param)]["lr"] == pytest.approx(LR * 5e-6 / 8e-5), name
        elif head in ("detr_decoder", "detr_encoder", "mask_decoder", "geometry_encoder", "dot_product_scoring"):
            assert groups[id(param)]["lr"] == pytest.approx(LR), name
    assert sum(i.tensors for i in info) == len(params)
    assert sum(i.numel for i in info) == sum(p.numel() for p in params.values())
    assert {g["name"] for g in optimizer.param_groups} == {i.name for i in info}


def test_no_weight_decay_on_biases_and_norm_layers(full_tiny):
    optimizer, _ = build_optimizer(full_tiny, LR, 0.1)
    groups = _groups_by_param(optimizer)
    modules = dict(full_tiny.named_modules())
    norms = linears = 0
    for name, param in full_tiny.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else full_tiny
        decay = groups[id(param)]["weight_decay"]
        if isinstance(owner, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(".bias"):
            assert decay == 0.0, name
            norms += isinstance(owner, (nn.LayerNorm, nn.GroupNorm))
        elif isinstance(owner, nn.Linear) and name.endswith(".weight"):
            assert decay == 0.1, name
            linears += 1
    assert norms > 10 and linears > 10  # both kinds exist in this model


def test_frozen_parameters_are_left_out():
    loaded = load_model("tiny", device="cpu")
    apply_policy(loaded.model, "paper")  # encoders frozen
    optimizer, info = build_optimizer(loaded.model, LR, 0.1)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len(trainable) and all(p.requires_grad for p in in_optimizer)
    assert {i.name for i in info} == {"detector", "detector.no_decay"}
    assert all(i.lr == pytest.approx(LR) for i in info)
    loaded.model.requires_grad_(False)
    with pytest.raises(MedSAM3Error, match="no trainable parameters"):
        build_optimizer(loaded.model, LR, 0.1)


class _LayerNorm2d(nn.Module):
    """Stands for LiteMedSAM's LayerNorm2d: a norm recognised by its class name."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))  # 3-D: only the class name says "norm"


class _Lite(nn.Module):
    """Parameter names as in lite: TinyViT stages ``trunk.layers.N``, a new neck and text projection
    (``extra_trained``), MiniLM, and a detector part."""

    extra_trained = ("vision_adapter", "text_projection")

    def __init__(self):
        super().__init__()
        self.vision_encoder = nn.Module()
        self.vision_encoder.trunk = nn.Module()
        self.vision_encoder.trunk.patch_embed = nn.Linear(2, 2)
        self.vision_encoder.trunk.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
        self.vision_encoder.adapter = nn.Linear(2, 2)
        self.text_encoder = nn.Linear(2, 2)
        self.text_projection = nn.Linear(2, 2)
        self.detr_decoder = nn.Sequential(nn.Linear(2, 2), _LayerNorm2d(2))


def test_lite_stages_new_modules_and_named_norms():
    model = _Lite()
    optimizer, _ = build_optimizer(model, LR, 0.05, layer_decay=0.8)
    groups = _groups_by_param(optimizer)
    vision = LR * VISION_LR_SCALE
    for stage in range(4):
        weight = model.vision_encoder.trunk.layers[stage].weight
        assert groups[id(weight)]["lr"] == pytest.approx(vision * 0.8 ** (4 - stage))
    assert groups[id(model.vision_encoder.trunk.patch_embed.weight)]["lr"] == pytest.approx(vision * 0.8**5)
    for new in (model.vision_encoder.adapter.weight, model.text_projection.weight):  # trained from scratch
        assert groups[id(new)]["lr"] == pytest.approx(LR) and groups[id(new)]["weight_decay"] == 0.05
    assert groups[id(model.text_encoder.weight)]["lr"] == pytest.approx(LR * TEXT_LR_SCALE)
    assert groups[id(model.detr_decoder[1].weight)]["weight_decay"] == 0.0
    assert is_norm_module(model.detr_decoder[1]) and not is_norm_module(model.detr_decoder[0])
    assert LAYER_DECAY == 0.9
    assert vision_layer_scale("vision_encoder.trunk.layers.2.blocks.1.attn.qkv.weight", 4, 0.9) == (
        "block2",
        pytest.approx(0.9**2),
    )
    # one optimizer step moves the parameters (the groups are usable as built)
    before = model.detr_decoder[0].weight.detach().clone()
    model.detr_decoder[0](torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.detr_decoder[0].weight)


def test_bad_settings_fail_clearly():
    with pytest.raises(MedSAM3Error, match="layer decay"):
        build_optimizer(_Lite(), LR, 0.1, layer_decay=1.5)
    with pytest.raises(MedSAM3Error, match="lr"):
        build_optimizer(_Lite(), 0.0, 0.1)
