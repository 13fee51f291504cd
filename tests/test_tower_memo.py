"""Models that share a frozen image tower share its outputs: each image is encoded once."""

from __future__ import annotations

import copy

import numpy as np
import torch

from medsam3.infer.predictor import Sam3Predictor
from medsam3.model.tower_memo import TowerMemo


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8) for i in range(n)]


def test_a_shared_memo_encodes_each_image_once_and_changes_no_answer(tiny_model):
    before, after = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    before.seam.image_encodes = after.seam.image_encodes = 0
    with torch.no_grad():  # "after fine-tuning": the detector moved, the frozen tower did not
        for p in after.model.detr_decoder.parameters():
            p.add_(0.01)
    plain = Sam3Predictor(copy.deepcopy(after))
    memo = TowerMemo()
    before.seam.share_tower_outputs(memo)
    after.seam.share_tower_outputs(memo)
    images = _images(3)
    for image in images:
        Sam3Predictor(before).set_image(image)
    assert before.seam.image_encodes == 3 and len(memo) == 3
    remembered = Sam3Predictor(after)
    for image in images:
        remembered.set_image(image)
        plain.set_image(image)
        got, want = remembered.predict_one("lesion"), plain.predict_one("lesion")
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
        assert np.array_equal(got.union, want.union)
    assert after.seam.image_encodes == 0 and memo.hits == 3
    batch = after.seam.embed_images(images[:2] + _images(4)[3:])  # two remembered, one new, in one call
    assert after.seam.image_encodes == 1 and batch[0].shape[0] == 3


def test_another_tower_never_sees_the_memo(tiny_model):
    ours, other = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    other.seam.image_encodes = 0
    with torch.no_grad():
        next(iter(other.seam.backbone.frozen_modules(other.model).values())).parameters().__next__().add_(0.5)
    memo = TowerMemo()
    ours.seam.share_tower_outputs(memo)
    other.seam.share_tower_outputs(memo)
    image = _images(1)[0]
    ours.seam.embed_images([image])
    other.seam.embed_images([image])
    assert other.seam.image_encodes == 1 and len(memo) == 2


def test_the_memo_drops_the_least_recently_used_past_its_size(tiny_model):
    loaded = copy.deepcopy(tiny_model)
    one = loaded.seam.embed_images(_images(1))
    size = sum(t.numel() * t.element_size() for t in one)
    memo = TowerMemo(max_bytes=2 * size)
    loaded.seam.share_tower_outputs(memo)
    first, second, third = _images(3)[0], _images(3)[1][:40], _images(3)[2][:40]  # same shape: same size
    for image in (first, second, first, third):  # first used again, so second is the oldest
        loaded.seam.embed_images([image])
    assert len(memo) == 2
    encodes = loaded.seam.image_encodes
    loaded.seam.embed_images([first])
    assert loaded.seam.image_encodes == encodes
    loaded.seam.embed_images([second])
    assert loaded.seam.image_encodes == encodes + 1
