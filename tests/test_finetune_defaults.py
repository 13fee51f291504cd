"""Issue 17: defaults that learn (a step/time budget with early stopping), cached augmented views,
each concept's mask source chosen on validation and used by the predictor, loss options reachable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam3.cli import main
from medsam3.data.masks import masks_to_boxes
from medsam3.data.sample import Sample
from medsam3.data.transforms import Rot90, annotate, view_augmentation
from medsam3.errors import MedSAM3Error
from medsam3.infer.postprocess import fuse_results
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt, PromptResult
from medsam3.model import load_model
from medsam3.model.adapter import read_adapter_metadata
from medsam3.train.loss_options import parse_loss_options
from medsam3.train.run import hold_out_validation
from medsam3.train.trainer import TrainConfig, Trainer
from train_helpers import disk_samples

FAST = dict(batch_size=2, lr=1e-3, grad_clip=1.0, progress=False, val_limit=2, max_minutes=None)


# -- the budget ----------------------------------------------------------------------------------------


def test_default_config_is_a_budget_not_epochs():
    config = TrainConfig()
    assert config.epochs is None and config.steps >= 1000 and config.max_minutes == 10.0
    assert config.patience > 0 and config.cache_features is None and config.choose_mask_sources


def test_step_budget_stops_mid_epoch_validates_and_writes(tmp_path):
    loaded = load_model("tiny", device="cpu")
    out = tmp_path / "run"
    config = TrainConfig(steps=5, val_every=2, patience=0, **FAST)  # 6 samples, batch 2: 3 steps an epoch
    summary = Trainer(loaded, disk_samples(6), out, config, val_data=disk_samples(2, seed=9)).fit()
    assert summary["position"]["step"] == 5 and summary["stop_reason"] == "completed"
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "1.667"]  # an epoch end, then the budget's end
    assert all(row.split(",")[3] != "" for row in rows)  # both validated (3 >= 2 steps, and the end)
    assert (out / "best" / "adapter.json").is_file() and summary["budget"]["steps"] == 5


def test_validation_every_n_steps_and_early_stop_on_a_plateau(tmp_path, monkeypatch):
    loaded = load_model("tiny", device="cpu")
    config = TrainConfig(steps=200, val_every=3, patience=2, min_delta=0.01, choose_mask_sources=False, **FAST)
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", config, val_data=disk_samples(2, seed=9))
    scores = iter([0.5, 0.505, 0.508, 0.9])  # no gain of 0.01 twice in a row: stop before 0.9
    calls = []
    monkeypatch.setattr(trainer, "validate", lambda: calls.append(trainer.position.step) or next(scores))
    summary = trainer.fit()
    assert summary["stop_reason"] == "early_stop" and summary["stopped_early"]
    assert calls == [4, 8, 12]  # 2 steps an epoch: validated at the first epoch end >= 3 steps after the last
    assert summary["best_val_dice"] == pytest.approx(0.508)


def test_time_budget_keeps_room_for_the_end_of_the_run(tmp_path):
    """The last step leaves time for the final validation and the mask-source choice (``END_PASSES``
    validations' durations, timed by the last validation), so the whole run fits ``max_minutes``."""
    import time

    loaded, val = load_model("tiny", device="cpu"), disk_samples(2, seed=9)
    settings = {**FAST, "max_minutes": 1.0}
    choosing = Trainer(loaded, disk_samples(2), tmp_path / "a", TrainConfig(**settings), val_data=val)
    plain = Trainer(loaded, disk_samples(2), tmp_path / "b", TrainConfig(choose_mask_sources=False, **settings),
                    val_data=val)  # fmt: skip
    started = time.perf_counter() - 45.0  # 45 s of the 60 spent
    assert not choosing._out_of_time(started)  # no validation timed yet: only the 5 s margin reserved
    choosing._val_seconds = plain._val_seconds = 5.0
    assert choosing._out_of_time(started) and not plain._out_of_time(started)  # 45 + 10 x 5 + 5 > 60 > 45 + 5 + 5
    choosing.validate()
    assert 0.0 < choosing._val_seconds < 5.0  # a validation times itself


def _plateau_trainer(tmp_path, monkeypatch, **settings):
    """A run whose validation peaks at its first check (step 4), then stalls until early stopping."""
    loaded = load_model("tiny", device="cpu")
    config = TrainConfig(steps=200, val_every=3, patience=2, choose_mask_sources=False, **FAST, **settings)
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", config, val_data=disk_samples(2, seed=9))
    scores = iter([0.9, 0.5, 0.5])
    monkeypatch.setattr(trainer, "validate", lambda: next(scores))
    return trainer


def _plateau_run(tmp_path, monkeypatch, **settings):
    return _plateau_trainer(tmp_path, monkeypatch, **settings).fit(), tmp_path / "run"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_thin_validation_keeps_the_mean_of_the_pick_and_the_weight_average(tmp_path, monkeypatch):
    trainer = _plateau_trainer(tmp_path, monkeypatch, ema_decay=0.5)  # 2 validation samples: too few to choose by
    summary, out = trainer.fit(), tmp_path / "run"
    assert summary["stop_reason"] == "early_stop" and summary["kept"] == "average-ema" and trainer.ema.updates == 12
    best, last, pick = _weights(out / "best"), _weights(out / "last"), _weights(out / "validation-pick")
    average = trainer.ema.weights()
    assert best.keys() == pick.keys() == average.keys()
    for name in best:
        expected = (pick[name].float() + average[name].float()) / 2
        assert np.allclose(best[name].float().numpy(), expected.numpy(), atol=1e-6), name
    assert not _same(best, last) and not _same(best, pick)
    meta = read_adapter_metadata(out / "best")
    assert "mean of validation's pick and the exponential moving average of the weights (decay 0.5)" in meta[
        "selected_by"]
    assert "too few to choose a checkpoint by" in meta["selected_by"]
    assert read_adapter_metadata(out / "validation-pick")["position"]["step"] == 4


def test_a_run_saved_without_an_average_resumes_under_auto_from_its_weights(tmp_path):
    """A thin-split run checkpointed before ``auto`` tracked a moving average (here: ``keep="average"``,
    which tracks none) resumes under ``auto``: the average starts at the resumed weights."""
    loaded, val = load_model("tiny", device="cpu"), disk_samples(2, seed=9)
    settings = dict(epochs=3, checkpoint_every=1, choose_mask_sources=False, **FAST)
    Trainer(loaded, disk_samples(4), tmp_path / "run", TrainConfig(keep="average", max_steps=2, **settings),
            val_data=val).fit()  # fmt: skip
    resumed = Trainer(load_model("tiny", device="cpu"), disk_samples(4), tmp_path / "run", TrainConfig(**settings),
                      val_data=val)  # fmt: skip
    resumed.resume()
    assert resumed.position.step == 2 and resumed.ema.updates == 0
    own = {name: p.detach() for name, p in resumed.model.named_parameters() if p.requires_grad}
    assert all(np.array_equal(resumed.ema.weights()[k].numpy(), own[k].float().numpy()) for k in own)
    assert resumed.fit()["kept"] == "average-ema" and resumed.ema.updates == 4


def test_keep_average_keeps_the_mean_of_the_pick_and_the_final_weights(tmp_path, monkeypatch):
    summary, out = _plateau_run(tmp_path, monkeypatch, keep="average")
    assert summary["stop_reason"] == "early_stop" and summary["kept"] == "average"
    best, last, pick = _weights(out / "best"), _weights(out / "last"), _weights(out / "validation-pick")
    assert best.keys() == last.keys() == pick.keys() and not _same(pick, last)  # 8 steps at lr 1e-3 moved them
    for name in best:
        expected = (pick[name].float() + last[name].float()) / 2
        assert np.allclose(best[name].float().numpy(), expected.numpy(), atol=1e-6), name
    meta = read_adapter_metadata(out / "best")
    assert "mean of validation's pick and the final weights" in meta["selected_by"]
    assert read_adapter_metadata(out / "validation-pick")["position"]["step"] == 4
    assert read_adapter_metadata(out / "last")["position"]["step"] == 12


def test_averaging_again_keeps_the_pick(tmp_path, monkeypatch):
    trainer = _plateau_trainer(tmp_path, monkeypatch)
    trainer.fit()
    out, first = tmp_path / "run", _weights(tmp_path / "run" / "best")
    trainer._keep_other_weights("average-ema")  # what a resumed run that found nothing better does at its end
    assert read_adapter_metadata(out / "validation-pick")["position"]["step"] == 4  # not the average
    assert all(np.allclose(first[k].numpy(), v.numpy(), atol=1e-6) for k, v in _weights(out / "best").items())


def test_keep_last_puts_the_final_weights_in_best(tmp_path, monkeypatch):
    summary, out = _plateau_run(tmp_path, monkeypatch, keep="last")
    assert summary["kept"] == "last" and _same(_weights(out / "best"), _weights(out / "last"))
    assert read_adapter_metadata(out / "best")["selected_by"] == "final weights"


def test_keep_best_leaves_validations_pick_in_best(tmp_path, monkeypatch):
    summary, out = _plateau_run(tmp_path, monkeypatch, keep="best")
    assert summary["kept"] == "best" and not (out / "validation-pick").exists()
    assert read_adapter_metadata(out / "best")["position"]["step"] == 4
    assert not _same(_weights(out / "best"), _weights(out / "last"))


def test_keep_ema_puts_the_weight_average_in_best(tmp_path, monkeypatch):
    trainer = _plateau_trainer(tmp_path, monkeypatch, keep="ema", ema_decay=0.5)
    summary, out = trainer.fit(), tmp_path / "run"
    assert summary["kept"] == "ema" and trainer.ema.updates == 12
    best, last, pick = _weights(out / "best"), _weights(out / "last"), _weights(out / "validation-pick")
    average = trainer.ema.weights()
    assert best.keys() == average.keys()
    assert all(np.allclose(best[k].float().numpy(), average[k].numpy(), atol=1e-6) for k in best)
    assert not _same(best, last) and not _same(best, pick)
    assert "moving average of the weights (decay 0.5)" in read_adapter_metadata(out / "best")["selected_by"]


def test_weight_average_follows_its_formula():
    import torch

    from medsam3.train.ema import WeightEMA

    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight.data.fill_(0.0)
    ema = WeightEMA(layer, decay=0.5)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0]):
        layer.weight.data.fill_(value)
        decay = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18, 0.25, 0.31: the start fades fast
        expected = decay * expected + (1 - decay) * value
        ema.update()
        assert float(ema.weights()["weight"]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightEMA(layer, decay=1.0)


def test_keep_auto_chooses_by_a_validation_split_of_24_samples():
    loaded = load_model("tiny", device="cpu")
    thick = Trainer(loaded, disk_samples(2), "unused", TrainConfig(**FAST), val_data=disk_samples(24, seed=9))
    thin = Trainer(loaded, disk_samples(2), "unused", TrainConfig(**FAST), val_data=disk_samples(23, seed=9))
    assert thick.keep_choice() == "best" and thin.keep_choice() == "average-ema"
    assert thick.ema is None and thin.ema is not None  # the weight average is tracked only where it is kept
    with pytest.raises(MedSAM3Error, match="keep must be one of"):
        Trainer(loaded, disk_samples(2), "unused", TrainConfig(keep="newest", **FAST))
    with pytest.raises(MedSAM3Error, match="ema_decay must be between 0 and 1"):
        Trainer(loaded, disk_samples(2), "unused", TrainConfig(keep="ema", ema_decay=1.5, **FAST))


def test_time_budget_bends_the_schedule():
    import torch

    from medsam3.train.schedule import warmup_cosine

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    spent = {"fraction": 0.0}
    schedule = warmup_cosine(optimizer, 1000, 0, time_fraction=lambda: spent["fraction"])
    optimizer.step()
    schedule.step()
    assert schedule.get_last_lr()[0] > 0.99  # step 1 of 1000, no time spent
    spent["fraction"] = 1.0
    optimizer.step()
    schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.01)  # the time budget is spent: the floor


def test_time_budget_ends_the_warmup_too():
    """A slow machine that spends its time in a few steps still warms up, peaks and decays."""
    import torch

    from medsam3.train.schedule import warmup_cosine

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    spent = {"fraction": 0.0}
    schedule = warmup_cosine(optimizer, 400, 20, time_fraction=lambda: spent["fraction"])  # warmup: 5%
    rates = []
    for fraction in (0.0, 0.025, 0.05, 0.5, 1.0):  # one step each: 5 of 400 steps
        spent["fraction"] = fraction
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    assert rates[0] == pytest.approx(2 / 20)  # by steps: step 2 of a 20-step warmup
    assert rates[1] == pytest.approx(0.5)  # half the warmup's share of the time
    assert rates[2] == pytest.approx(1.0, abs=1e-6)  # warmup over in time: the peak
    assert 0.4 < rates[3] < 0.6  # half the budget: the cosine's middle
    assert rates[4] == pytest.approx(0.01)


def test_few_shot_training_set_gets_a_held_out_validation_split():

    class Split:
        def __init__(self, cases):
            self.cases = list(cases)

        def select(self, cases):
            return Split(cases)

    train, val = hold_out_validation(Split([f"z{i:03d}" for i in range(10)]), seed=0)
    assert len(val.cases) == 2 and len(train.cases) == 8 and not set(val.cases) & set(train.cases)
    again, _ = hold_out_validation(Split([f"z{i:03d}" for i in range(10)]), seed=0)
    assert again.cases == train.cases


# -- cached views ---------------------------------------------------------------------------------------


def _sample(concept: str, mask: np.ndarray, image: np.ndarray) -> Sample:
    masks = mask[None]
    return Sample(image=image, concept=concept, masks=masks, boxes=masks_to_boxes(masks), case_id="c")


def test_view_bank_gives_each_image_a_fixed_set_of_views_shared_by_its_concepts():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3)).astype(np.uint8)
    a, b = np.zeros((48, 64), bool), np.zeros((48, 64), bool)
    a[5:20, 10:30], b[25:40, 35:60] = True, True
    bank = view_augmentation(views=6, seed=3)
    assert bank.cacheable
    seen_a, seen_b = {}, {}
    for step in range(80):
        out_a = bank(_sample("left", a, image), np.random.default_rng([1, step]))
        out_b = bank(_sample("right", b, image), np.random.default_rng([2, step]))
        seen_a[out_a.meta.get("view", 0)] = out_a.image.tobytes()
        seen_b[out_b.meta.get("view", 0)] = out_b.image.tobytes()
        assert out_a.masks.shape[1:] == out_a.image.shape[:2]
    assert set(seen_a) == set(range(6))  # every view drawn, never more than 6 distinct images
    assert seen_a[0] == image.tobytes()
    assert all(seen_a[v] == seen_b[v] for v in seen_a)  # one view = the same pixels whatever the concept
    assert len(set(seen_a.values())) >= 5  # and the views do differ


def test_quarter_turn_moves_masks_and_boxes_together():
    mask = np.zeros((1, 30, 50), bool)
    mask[0, 2:8, 10:25] = True
    item = annotate(np.zeros((30, 50), np.uint8), mask)
    for seed in range(6):
        out = Rot90(p=1.0)(item, np.random.default_rng(seed))
        assert out.masks[0].sum() == mask.sum()
        assert np.allclose(out.boxes, masks_to_boxes(out.masks))
        assert out.image.shape in ((30, 50), (50, 30))


def test_cache_refuses_fresh_random_views_but_takes_the_bank(tmp_path):
    from medsam3.data.transforms import default_augmentation

    loaded = load_model("tiny", device="cpu")
    with pytest.raises(MedSAM3Error, match="cannot be combined with random image augmentation"):
        Trainer(loaded, disk_samples(4), tmp_path / "a", TrainConfig(cache_features=True, **FAST),
                augment=default_augmentation())  # fmt: skip
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "b", TrainConfig(**FAST), augment=view_augmentation())
    assert trainer.use_cache  # on by default: frozen towers and a cacheable augmentation
    assert not Trainer(loaded, disk_samples(4), tmp_path / "c", TrainConfig(**FAST),
                       augment=default_augmentation()).use_cache  # fmt: skip


# -- mask sources ---------------------------------------------------------------------------------------


def _result(masks: list[np.ndarray], scores: list[float]) -> PromptResult:
    stack = np.asarray(masks, bool).reshape(len(masks), 20, 20)
    return PromptResult(Prompt("x"), 0.9, np.asarray(scores, np.float32), masks_to_boxes(stack), stack)


def test_fusion_keeps_every_detection_the_dense_map_missed():
    comp, dup, other = (np.zeros((20, 20), bool) for _ in range(3))
    comp[2:8, 2:8], dup[3:8, 3:8], other[12:18, 12:18] = True, True, True
    fused = fuse_results(_result([comp], [0.6]), _result([dup, other], [0.95, 0.7]))
    assert len(fused) == 2  # the duplicate of the component is not added twice
    assert list(fused.scores) == pytest.approx([0.7, 0.6])
    assert fused.masks[0].sum() == other.sum()
    empty = fuse_results(_result([], []), _result([other], [0.8]))
    assert len(empty) == 1  # the dense map found nothing: the detection stays


def test_training_records_each_concepts_mask_source_and_the_predictor_uses_it(tmp_path):
    loaded = load_model("tiny", device="cpu")
    out = tmp_path / "run"
    config = TrainConfig(epochs=1, **FAST)
    summary = Trainer(loaded, disk_samples(4), out, config, val_data=disk_samples(2, seed=9)).fit()
    meta = read_adapter_metadata(out / "best")
    chosen = meta["mask_sources"]["blob"]
    assert chosen["source"] in ("semantic", "fusion", "detector") and set(chosen["dice"]) == {
        "semantic", "fusion", "detector"}  # fmt: skip
    assert summary["mask_sources"]["blob"]["source"] == chosen["source"]
    reloaded = load_model("tiny", device="cpu", adapter=out / "best")
    predictor = Sam3Predictor(reloaded)
    assert predictor.source_for("blob") == chosen["source"]
    assert predictor.source_for("other") == reloaded.backbone.default_mask_source
    assert Sam3Predictor(reloaded, mask_source="detector").source_for("blob") == "detector"


def _adapter_recording(out, mask_sources: dict):
    """A tiny model's adapter (trained once per test) whose adapter.json records ``mask_sources``."""
    if not (out / "best" / "adapter.json").is_file():
        loaded = load_model("tiny", device="cpu")
        Trainer(loaded, disk_samples(4), out, TrainConfig(epochs=1, choose_mask_sources=False, **FAST)).fit()
    meta_file = out / "best" / "adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["mask_sources"] = mask_sources
    meta_file.write_text(json.dumps(meta))
    return out / "best"


def test_a_bad_mask_source_in_adapter_json_is_one_line(tmp_path):
    adapter = _adapter_recording(tmp_path / "run", {"blob": {"source": "crystal ball"}})
    with pytest.raises(MedSAM3Error, match="mask_sources.blob' must name one of semantic"):
        load_model("tiny", device="cpu", adapter=adapter)


# -- loss options from the CLI --------------------------------------------------------------------------


def test_loss_options_are_typed_and_checked():
    assert parse_loss_options(["semantic_dice=0", "cls_iou_aware=false", "aux=0.5"]) == {
        "semantic_dice": 0.0, "cls_iou_aware": False, "aux": 0.5}  # fmt: skip
    for bad, words in (("nonsense=1", "unknown loss option 'nonsense'"), ("aux", "expected KEY=VALUE"),
                       ("aux=lots", "'aux' takes a float"), ("cls_iou_aware=maybe", "takes a bool")):  # fmt: skip
        with pytest.raises(MedSAM3Error, match=words):
            parse_loss_options([bad])


def test_train_cli_refuses_an_unknown_loss_option_in_one_line(tmp_path, capsys):
    code = main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--loss", "bogus=1", "--base", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown loss option 'bogus'" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_budget_encodes_every_view_first_then_training_only_reads_the_cache(tmp_path):
    loaded = load_model("tiny", device="cpu")
    config = TrainConfig(steps=6, patience=0, choose_mask_sources=False, **FAST)
    bank = view_augmentation(views=3, seed=1)
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", config, val_data=disk_samples(2, seed=9), augment=bank)
    trainer.fit()
    # 4 training and 2 validation images x 3 views (a view may repeat an image when no transform fired)
    assert trainer.val_views == 3 and 8 <= trainer.cache.misses <= 18
    misses = trainer.cache.misses
    assert trainer.prefill_cache() == 0 and trainer.cache.misses == misses  # all there already
    assert trainer.cache.hits > 0


def test_a_few_validation_slices_are_scored_under_the_banks_views(tmp_path):
    loaded = load_model("tiny", device="cpu")
    val = disk_samples(2, seed=9)
    bank = view_augmentation(views=6, seed=1)
    config = TrainConfig(steps=2, patience=0, choose_mask_sources=False, **{**FAST, "val_limit": 200})
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", config, val_data=val, augment=bank)
    assert trainer.val_views == 6 and len(trainer.val_data) == 12  # 24 wanted, the bank has 6 views
    assert trainer.val_data[0].image.tobytes() == val[0].image.tobytes()  # view 0: the slice itself
    assert trainer.val_data[5].image.tobytes() == bank.view(val[0], 5).image.tobytes()
    assert trainer.val_data[6].image.tobytes() == val[1].image.tobytes()
    assert trainer.val_data[7].concept == val[1].concept and trainer.val_data[7].meta["view"] == 1
    scored = []
    predict_one = Sam3Predictor.predict_one
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Sam3Predictor, "predict_one", lambda self, p: scored.append(p) or predict_one(self, p))
        summary = trainer.fit()
    assert summary["val_views"] == 6 and len(scored) % 12 == 0 and scored  # each validation: 2 slices x 6 views
    images_alone = dict(config.__dict__, val_views=1)
    assert len(Trainer(loaded, disk_samples(4), tmp_path / "one", TrainConfig(**images_alone), val_data=val,
                       augment=bank).val_data) == 2  # fmt: skip
    assert Trainer(loaded, disk_samples(4), tmp_path / "flat", config, val_data=val).val_views == 1  # no bank
    many = disk_samples(24, seed=5)
    assert Trainer(loaded, disk_samples(4), tmp_path / "big", config, val_data=many, augment=bank).val_views == 1
    with pytest.raises(MedSAM3Error, match="val_views must be between 1 and the view bank's 6"):
        Trainer(loaded, disk_samples(4), tmp_path / "bad", TrainConfig(**dict(images_alone, val_views=7)),
                val_data=val, augment=bank)  # fmt: skip


# -- what a box does, per concept -----------------------------------------------------------------------


def test_box_mode_is_measured_per_concept_and_recorded_with_its_source(lite_init):
    from medsam3.train.mask_choice import choose_mask_sources

    choice = choose_mask_sources(lite_init, disk_samples(3, seed=4))
    entry = choice["blob"]
    assert entry["box"] in ("outline", "exemplar") and set(entry["box_dice"]) == {"outline", "exemplar"}
    assert entry["box_dice"][entry["box"]] == max(entry["box_dice"].values())
    assert lite_init.mask_sources == {}  # measuring did not leave the choice on the model


def test_box_mode_decides_whether_the_box_decoder_outlines_the_users_box(lite_init):
    sample = disk_samples(2, seed=4)[1]
    box = tuple(float(v) for v in sample.boxes[0])
    prompt = Prompt("blob", boxes=[box])
    lite_init.box_modes = {"blob": "exemplar"}
    try:
        auto = Sam3Predictor(lite_init, score_threshold=0.0)
        assert auto.box_mode_for("blob") == "exemplar" and auto.box_mode_for("other") == "outline"
        assert Sam3Predictor(lite_init, mask_source="box-decoder").box_mode_for("blob") == "outline"
        assert Sam3Predictor(lite_init, mask_source="semantic").box_mode_for("other") == "exemplar"
        outline = Sam3Predictor(lite_init, score_threshold=0.0, box_mode="outline")
        results = {}
        for name, predictor in (("auto", auto), ("outline", outline)):
            predictor.set_image(sample.image)
            results[name] = predictor.predict_one(prompt)
    finally:
        lite_init.box_modes = {}
    assert len(results["outline"]) == 1 and tuple(results["outline"].boxes[0]) == pytest.approx(box)
    # the exemplar answer is the detector's (the untrained detector's instances), not the user's box redrawn
    exemplar = results["auto"]
    assert not (len(exemplar) == 1 and tuple(exemplar.boxes[0]) == pytest.approx(box))
    with pytest.raises(MedSAM3Error, match="unknown box mode"):
        Sam3Predictor(lite_init, box_mode="lasso")


def test_a_bad_box_mode_in_adapter_json_is_one_line(tmp_path):
    adapter = _adapter_recording(tmp_path / "run", {"blob": {"source": "semantic", "box": "lasso"}})
    with pytest.raises(MedSAM3Error, match="mask_sources.blob.box' must name one of outline, exemplar"):
        load_model("tiny", device="cpu", adapter=adapter)
    adapter = _adapter_recording(tmp_path / "run", {"blob": {"source": "semantic", "box": "exemplar"}})
    assert load_model("tiny", device="cpu", adapter=adapter).box_modes == {"blob": "exemplar"}


# -- the semantic head ---------------------------------------------------------------------------------


def _judged(monkeypatch, without: dict, fitted: dict) -> None:
    """Validation, as the head stage reads it, answers ``without`` before the fit and ``fitted`` after."""
    answers = iter([without, fitted])
    monkeypatch.setattr(Trainer, "validation_by_framing", lambda self: next(answers))


def test_semantic_head_is_fitted_on_the_training_images_after_the_kept_weights(tmp_path, monkeypatch):
    """lite's semantic head gets its own stage once best/ holds the kept weights: the rest of best/ is
    untouched, the head's loss on the training images falls, and the budget reserves its time."""
    from medsam3.train.semantic_head import HEAD_MAX_SECONDS

    loaded = load_model("lite-init", device="cpu", runtime="openvino")
    config = TrainConfig(epochs=1, keep="last", head_steps=25, choose_mask_sources=False, **FAST)
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", config, val_data=disk_samples(2, seed=9))
    assert trainer._end_reserve() >= HEAD_MAX_SECONDS
    _judged(monkeypatch, {"images": 0.50, "views": 0.40}, {"images": 0.55, "views": 0.33})
    summary = trainer.fit()
    report = summary["semantic_head"]
    assert report["steps"] == 25 and report["images"] == 3  # the negative image has no semantic term
    assert report["last_loss"] < 0.8 * report["first_loss"]
    assert report["kept"] and report["validation"]["with"] == {"images": 0.55, "views": 0.33}
    best, last = _weights(tmp_path / "run" / "best"), _weights(tmp_path / "run" / "last")
    head = {n for n in best if n.startswith("semantic_head.")}
    assert head and not any(n.startswith("semantic_head.") for n in last)  # the main loop leaves it alone
    assert best.keys() - head == last.keys()
    assert all(np.array_equal(best[n].numpy(), last[n].numpy()) for n in last)
    assert best["semantic_head.out.weight"].abs().sum() > 0  # no longer at its zero start
    tuned = load_model("lite-init", device="cpu", adapter=tmp_path / "run" / "best")
    assert not tuned.model.semantic_head.at_zero_start
    assert read_adapter_metadata(tmp_path / "run" / "best")["semantic_head"] == report
    off = Trainer(loaded, disk_samples(4), tmp_path / "off", TrainConfig(epochs=1, head_steps=0, **FAST))
    assert off._end_reserve() < HEAD_MAX_SECONDS and off.fit()["semantic_head"] is None
    unjudged = Trainer(loaded, disk_samples(4), tmp_path / "unjudged", TrainConfig(epochs=1, **FAST))
    assert unjudged.config.head_steps > 0 and not unjudged._head_stage_runs()  # no validation split
    assert unjudged.fit()["semantic_head"] is None


@pytest.mark.parametrize(
    "fitted",
    [{"images": 0.55, "views": 0.25}, {"images": 0.50, "views": 0.45}],
    ids=["costs-the-views", "no-gain-on-the-images"],
)
def test_a_semantic_head_that_validation_does_not_back_is_dropped(tmp_path, monkeypatch, fitted):
    """A fitted head that costs the bank's views more than the tolerance, or does not gain on the
    held-out images, leaves best/ as the kept weights: the model predicts as if the stage never ran."""
    loaded = load_model("lite-init", device="cpu", runtime="openvino")
    config = TrainConfig(epochs=1, keep="last", head_steps=10, choose_mask_sources=False, **FAST)
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", config, val_data=disk_samples(2, seed=9))
    _judged(monkeypatch, {"images": 0.50, "views": 0.40}, fitted)
    report = trainer.fit()["semantic_head"]
    assert report["steps"] == 10 and report["kept"] is False
    best, last = _weights(tmp_path / "run" / "best"), _weights(tmp_path / "run" / "last")
    assert best.keys() == last.keys() and not any(n.startswith("semantic_head.") for n in best)
    assert loaded.model.semantic_head.at_zero_start and not any(
        p.requires_grad for p in loaded.model.semantic_head.parameters()
    )
    assert read_adapter_metadata(tmp_path / "run" / "best")["semantic_head"] == report
    assert load_model("lite-init", device="cpu", adapter=tmp_path / "run" / "best").model.semantic_head.at_zero_start


def test_validation_by_framing_reads_view_zero_as_the_images(tmp_path, monkeypatch):
    """Under a view bank, every ``val_views``-th validation sample is an image as it is (view 0)."""
    loaded = load_model("lite-init", device="cpu", runtime="openvino")
    val = disk_samples(2, seed=9)
    config = TrainConfig(epochs=1, val_views=3, **FAST)
    trainer = Trainer(loaded, disk_samples(4), tmp_path / "run", config, val_data=val, augment=view_augmentation())
    assert trainer.val_views == 3 and len(trainer.val_data) == 6
    scores = [0.9, 0.1, 0.2, 0.7, 0.3, 0.5]
    monkeypatch.setattr(Trainer, "validation_scores", lambda self: (scores, [True] * 6))
    assert trainer.validation_by_framing() == {"images": pytest.approx(0.8), "views": pytest.approx(0.45)}
