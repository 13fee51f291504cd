import errno

import pytest
import torch

from medsam3.errors import MedSAM3Error, ModelSpecError
from medsam3.model import load_model
from medsam3.model.adapter import read_adapter_metadata
from medsam3.train.trainer import TrainConfig, Trainer, frozen_components_untouched
from train_helpers import disk_samples


def _config(**kw):
    base = dict(epochs=2, batch_size=2, lr=1e-3, grad_clip=1.0, progress=False, val_limit=2)
    base.update(kw)
    return TrainConfig(**base)


def _weights(loaded):
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters()}


def test_paper_policy_trains_detector_only(tmp_path):
    loaded = load_model("tiny", device="cpu")
    before = _weights(loaded)
    trainer = Trainer(loaded, disk_samples(6), tmp_path / "run", _config(), val_data=disk_samples(2, seed=9))
    summary = trainer.fit()
    assert frozen_components_untouched(loaded.model)
    after = _weights(loaded)
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        if name.startswith(("vision_encoder", "text_encoder", "text_projection")):
            assert not changed, name
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("detr_decoder"))
    assert len(summary["history"]) == 2
    assert (tmp_path / "run" / "last" / "adapter.safetensors").is_file()
    assert (tmp_path / "run" / "best" / "adapter.json").is_file()
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,step,train_loss,val_dice")
    assert read_adapter_metadata(tmp_path / "run" / "last")["concepts"] == ["blob"]
    # the adapter loads as `segment` would load it
    reloaded = load_model("tiny", device="cpu", adapter=tmp_path / "run" / "last")
    for name, param in reloaded.model.named_parameters():
        assert torch.equal(param, after[name]), name


@pytest.mark.parametrize("prompt_mode", ["mixed"])
def test_interrupted_and_resumed_run_ends_with_same_weights(tmp_path, prompt_mode):
    data = disk_samples(7)
    config = dict(epochs=2, checkpoint_every=1, prompt_mode=prompt_mode)
    straight = load_model("tiny", device="cpu")
    torch.manual_seed(123)
    Trainer(straight, data, tmp_path / "a", _config(**config)).fit()

    first = load_model("tiny", device="cpu")
    torch.manual_seed(123)
    summary = Trainer(first, data, tmp_path / "b", _config(max_steps=3, **config)).fit()
    assert summary["stopped_early"] and summary["position"]["step"] == 3
    torch.manual_seed(999)  # the resumed process starts with another RNG state: resume must restore it
    resumed = load_model("tiny", device="cpu")
    trainer = Trainer(resumed, data, tmp_path / "b", _config(**config))
    trainer.resume()
    assert trainer.position.step == 3 and trainer.position.epoch == 0 + (3 >= trainer.steps_per_epoch)
    trainer.fit()
    reference = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=1e-6, msg=name)


def test_a_resumed_run_keeps_its_weight_average(tmp_path):
    data = disk_samples(6)
    config = dict(epochs=2, checkpoint_every=1, keep="ema", ema_decay=0.9)
    torch.manual_seed(123)
    straight = Trainer(load_model("tiny", device="cpu"), data, tmp_path / "a", _config(**config))
    straight.fit()
    torch.manual_seed(123)
    Trainer(load_model("tiny", device="cpu"), data, tmp_path / "b", _config(max_steps=4, **config)).fit()
    resumed = Trainer(load_model("tiny", device="cpu"), data, tmp_path / "b", _config(**config))
    resumed.resume()
    assert resumed.ema.updates == 4
    resumed.fit()
    assert resumed.ema.updates == straight.ema.updates == 6
    for name, value in straight.ema.weights().items():
        torch.testing.assert_close(resumed.ema.weights()[name], value, rtol=0, atol=1e-6, msg=name)
    # a run saved without an average cannot be resumed into one
    Trainer(load_model("tiny", device="cpu"), data, tmp_path / "c", _config(max_steps=2, epochs=2)).fit()
    plain = Trainer(load_model("tiny", device="cpu"), data, tmp_path / "c", _config(**config))
    with pytest.raises(MedSAM3Error, match="no weight average saved"):
        plain.resume()


def test_resume_refuses_another_base(tmp_path):
    loaded = load_model("tiny", device="cpu")
    Trainer(loaded, disk_samples(4), tmp_path / "run", _config(epochs=1)).fit()
    other = load_model("tiny", device="cpu")
    other.model.config.detr_decoder_config.num_queries = 9  # a different architecture
    trainer = Trainer(other, disk_samples(4), tmp_path / "run", _config(epochs=1))
    with pytest.raises(MedSAM3Error, match="cannot resume"):
        trainer.resume()


def test_checkpoint_survives_disk_full(tmp_path, monkeypatch):
    loaded = load_model("tiny", device="cpu")
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", _config(epochs=1))
    trainer.fit()
    good = (tmp_path / "run" / "last" / "adapter.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("medsam3.utils.files.write_bytes", full_disk)  # where every tensor file is written
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint("last")
    assert (tmp_path / "run" / "last" / "adapter.safetensors").read_bytes() == good
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".last")]
    load_model("tiny", device="cpu", adapter=tmp_path / "run" / "last")  # still loadable


def test_feature_cache_matches_encoder_and_is_reused(tmp_path):
    data = disk_samples(4)
    loaded = load_model("tiny", device="cpu")
    trainer = Trainer(loaded, data, tmp_path / "run", _config(epochs=2, cache_features=True))
    trainer.fit()
    assert trainer.cache.misses == 4 and trainer.cache.hits == 4  # epoch 2 never ran the encoder
    cached = loaded.seam.vision_features(trainer.cache.encode([data[1].image]))
    pixels = loaded.processor.image_processor(images=[data[1].image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        fresh = loaded.model.get_vision_features(pixel_values=pixels)  # the plain transformers path
    for a, b in zip(cached.fpn_hidden_states, fresh.fpn_hidden_states):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # fp16 storage
    for a, b in zip(cached.fpn_position_encoding, fresh.fpn_position_encoding):
        torch.testing.assert_close(a, b)


def test_feature_cache_refuses_other_encoder_and_trainable_encoder(tmp_path):
    loaded = load_model("tiny", device="cpu")
    Trainer(loaded, disk_samples(2), tmp_path / "run", _config(epochs=1, cache_features=True)).fit()
    other = load_model("tiny", device="cpu")
    with torch.no_grad():
        next(other.model.vision_encoder.parameters()).add_(1.0)
    with pytest.raises(MedSAM3Error, match="another encoder"):
        Trainer(other, disk_samples(2), tmp_path / "run", _config(epochs=1, cache_features=True))
    with pytest.raises(MedSAM3Error, match="needs frozen encoders"):
        Trainer(
            load_model("tiny", device="cpu"),
            disk_samples(2),
            tmp_path / "x",
            _config(policy="full", cache_features=True),
        )


def test_bad_training_settings(tmp_path):
    loaded = load_model("tiny", device="cpu")
    with pytest.raises(MedSAM3Error, match="empty"):
        Trainer(loaded, [], tmp_path, _config())
    with pytest.raises(MedSAM3Error, match="prompt mode"):
        Trainer(loaded, disk_samples(2), tmp_path, _config(prompt_mode="boxes"))
    with pytest.raises(MedSAM3Error, match="policy"):
        Trainer(loaded, disk_samples(2), tmp_path, _config(policy="most"))
    assert ModelSpecError  # adapter errors are ModelSpecError, tested in test_model_loading


def test_validation_weighs_positives_and_negatives_equally(tmp_path, monkeypatch):
    """A model that answers nothing scores 0.5 on 1 positive + 3 negatives, not the plain mean 0.75:
    negatives must not outvote the slices holding the concept when picking checkpoints."""
    from types import SimpleNamespace

    import numpy as np

    from medsam3.train import trainer as trainer_module

    val = disk_samples(4, seed=3, negatives=3)
    assert [s.is_negative for s in val] == [True, True, True, False]
    loaded = load_model("tiny", device="cpu")
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", _config(val_limit=4), val_data=val)
    silent = SimpleNamespace(union=np.zeros((64, 64), bool))
    monkeypatch.setattr(trainer_module.Sam3Predictor, "predict_one", lambda self, prompt: silent)
    assert trainer.validate() == pytest.approx(0.5)
