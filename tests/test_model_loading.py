import json

import pytest
import torch

from medsam3.errors import ModelSpecError
from medsam3.model import load_model
from medsam3.model.adapter import apply_adapter, read_adapter_metadata, save_adapter
from medsam3.model.components import count_parameters
from medsam3.model.policy import apply_policy


def _rows(model):
    return {r.component: r for r in count_parameters(model)}


def test_tiny_preset_is_deterministic(tiny_model):
    again = load_model("tiny", device="cpu")
    for (name, a), (_, b) in zip(tiny_model.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert tiny_model.image_size == 112


def test_folder_round_trip(tiny_folder, tiny_model):
    loaded = load_model(str(tiny_folder), device="cpu")
    assert loaded.fingerprint == tiny_model.fingerprint
    ref = tiny_model.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name
    assert (
        loaded.processor.tokenizer("liver")["input_ids"]
        == tiny_model.processor.tokenizer("liver")["input_ids"]
    )


def test_unknown_spec_and_bad_folder(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model 'no-such-model'"):
        load_model("no-such-model", device="cpu")
    with pytest.raises(ModelSpecError, match="not a model folder"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelSpecError, match="checkpoint file not found"):
        load_model(str(tmp_path / "sam3.pt"), device="cpu")


def test_hub_id_offline_fails_with_gated_explanation():
    with pytest.raises(ModelSpecError) as info:
        load_model("facebook/sam3", device="cpu")
    message = str(info.value)
    assert "gated" in message and "save_pretrained" in message and "\n" not in message


def test_original_checkpoint_is_mapped_by_our_own_table(tmp_path):
    """Meta's sam3.pt is read with our strict key mapping (no transformers converter script needed);
    the layouts themselves are tested in test_published_models.py."""
    checkpoint = tmp_path / "sam3.pt"
    torch.save({"model": {}}, checkpoint)
    with pytest.raises(ModelSpecError, match=r"sam3.pt: does not match the SAM 3 layout: missing: "):
        load_model(str(checkpoint), device="cpu")


def test_paper_policy_freezes_encoders_only():
    loaded = load_model("tiny", device="cpu")
    rows = _rows(apply_policy(loaded.model, "paper"))
    for frozen in ("vision_encoder", "text_encoder", "text_projection"):
        assert rows[frozen].trainable == 0 and rows[frozen].total > 0
    for trained in (
        "geometry_encoder",
        "detr_encoder",
        "detr_decoder",
        "mask_decoder",
        "dot_product_scoring",
    ):
        assert rows[trained].trainable == rows[trained].total > 0


def test_lora_policies_add_adapters_where_promised():
    detector = _rows(apply_policy(load_model("tiny", device="cpu").model, "lora-detector"))
    assert detector["vision_encoder"].trainable == 0 and detector["text_encoder"].trainable == 0
    assert detector["detr_decoder"].trainable > 0
    everything = _rows(apply_policy(load_model("tiny", device="cpu").model, "lora-all"))
    assert everything["vision_encoder"].trainable > 0 and everything["text_encoder"].trainable > 0
    assert everything["total"].trainable < everything["total"].total / 5
    full = _rows(apply_policy(load_model("tiny", device="cpu").model, "full"))
    assert full["total"].frozen == 0


@pytest.mark.parametrize("policy", ["paper", "lora-detector"])
def test_adapter_round_trip(tmp_path, policy):
    trained = load_model("tiny", device="cpu")
    apply_policy(trained.model, policy)
    with torch.no_grad():
        for param in trained.model.parameters():
            if param.requires_grad:
                param.add_(0.01)
    save_adapter(trained, tmp_path / "adapter", policy, concepts=["polyp", "liver"])
    meta = read_adapter_metadata(tmp_path / "adapter")
    assert meta["policy"] == policy and meta["concepts"] == ["liver", "polyp"]
    assert meta["base_fingerprint"] == trained.fingerprint
    stored = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    assert stored < 4 * sum(p.numel() for p in trained.model.parameters()) / 2  # not the whole model

    fresh = load_model("tiny", device="cpu", adapter=tmp_path / "adapter")
    assert fresh.concepts == ["liver", "polyp"]
    mine = dict(trained.model.named_parameters())
    for name, param in fresh.model.named_parameters():
        assert torch.equal(param, mine[name]), name


def test_adapter_refuses_another_base(tmp_path):
    trained = load_model("tiny", device="cpu")
    apply_policy(trained.model, "paper")
    save_adapter(trained, tmp_path / "adapter", "paper", concepts=["polyp"])
    meta_file = tmp_path / "adapter" / "adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["base_fingerprint"] = "0000000000000000"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ModelSpecError, match="adapter was trained on base"):
        load_model("tiny", device="cpu", adapter=tmp_path / "adapter")
    with pytest.raises(ModelSpecError, match="not an adapter folder"):
        apply_adapter(trained, tmp_path)
