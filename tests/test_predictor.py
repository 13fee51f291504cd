"""The predictor must equal the plain transformers path and run the vision encoder once per image."""

import numpy as np
import pytest
import torch

from medsam3.errors import InputFileError, PromptError
from medsam3.infer.predictor import Sam3Predictor
from medsam3.infer.types import Prompt

PROMPTS = [
    Prompt("liver"),
    Prompt("breast tumor", boxes=((10, 10, 60, 50),)),
    Prompt("polyp"),
    Prompt("cell nucleus", boxes=((5, 5, 40, 40), (50, 20, 120, 80)), box_labels=(1, 0)),
]


def plain_path(loaded, image, prompt, threshold, mask_threshold):
    """Sam3Model.forward on one prompt + Sam3Processor post-processing, sorted by score."""
    extra = {}
    if prompt.boxes:
        extra = dict(
            input_boxes=[[list(b) for b in prompt.boxes]], input_boxes_labels=[list(prompt.box_labels)]
        )
    inputs = loaded.processor(images=image, text=prompt.text, return_tensors="pt", **extra)
    with torch.no_grad():
        outputs = loaded.model(**inputs)
    post = loaded.processor.post_process_instance_segmentation(
        outputs, threshold=threshold, mask_threshold=mask_threshold, target_sizes=[image.shape[:2]]
    )[0]
    order = torch.argsort(post["scores"], descending=True, stable=True)
    return (
        post["scores"][order].numpy(),
        post["boxes"][order].numpy(),
        post["masks"][order].numpy().astype(bool),
        float(outputs.presence_logits.sigmoid()),
    )


@pytest.mark.parametrize("threshold", [0.0, 0.25])
def test_batched_prompts_equal_plain_forward(tiny_model, rgb_image, threshold):
    predictor = Sam3Predictor(tiny_model, score_threshold=threshold, mask_threshold=0.5)
    predictor.set_image(rgb_image)
    results = predictor.predict(PROMPTS)
    kept = 0
    for prompt, result in zip(PROMPTS, results):
        scores, boxes, masks, presence = plain_path(tiny_model, rgb_image, prompt, threshold, 0.5)
        assert result.prompt == prompt
        assert len(result) == len(scores)
        np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.boxes, boxes, rtol=1e-4, atol=1e-3)
        assert masks.shape == result.masks.shape
        assert (result.masks != masks).mean() < 1e-3  # bilinear ties may flip a pixel
        assert result.presence == pytest.approx(presence, rel=1e-5)
        assert result.masks.shape[1:] == rgb_image.shape[:2]
        kept += len(result)
    assert kept > 0  # the comparison covered real instances


def test_the_two_mask_resizes_put_a_border_in_different_places():
    """A coarse row as trained maps have it (background -70, object +20), resized 4x: the logit crosses
    0 close to the object's cells, the probability crosses 0.5 halfway between cells."""
    from medsam3.infer.postprocess import mask_probabilities

    row = torch.tensor([-70.0, -70.0, 20.0, 20.0, -70.0, -70.0])
    logits = row.expand(6, 6)[None]  # (1, 6, 6): the object's cells 2-3 cover output pixels 8-15
    by_logit = mask_probabilities(logits, (24, 24), "logits")[0, 12] > 0.5
    by_probability = mask_probabilities(logits, (24, 24), "probabilities")[0, 12] > 0.5
    assert by_logit.nonzero().flatten().tolist() == list(range(9, 15))
    assert by_probability.nonzero().flatten().tolist() == list(range(8, 16))
    assert mask_probabilities(logits[:0], (24, 24)).shape == (0, 24, 24)
    with pytest.raises(ValueError, match="mask resize"):
        mask_probabilities(logits, (24, 24), "nearest")


def test_vision_encoder_runs_once_and_text_is_cached(tiny_model, rgb_image, monkeypatch):
    predictor = Sam3Predictor(tiny_model, score_threshold=0.0)
    predictor.set_image(rgb_image)
    tiny_model.seam.clear_text_cache()  # the cache lives on the model's seam, shared by predictors
    text_calls = []
    real_text = tiny_model.model.text_encoder.forward

    def count_text(*a, **k):
        text_calls.append(1)
        return real_text(*a, **k)

    monkeypatch.setattr(tiny_model.model.vision_encoder, "forward", _forbid)
    monkeypatch.setattr(tiny_model.model.text_encoder, "forward", count_text)
    first = predictor.predict(PROMPTS)
    second = predictor.predict([Prompt("liver"), Prompt("polyp")])
    assert len(text_calls) == 1  # all four phrases in one text pass, then cached
    np.testing.assert_array_equal(first[0].scores, second[0].scores)
    assert predictor.encode_count == 1


def _forbid(*args, **kwargs):
    raise AssertionError("vision encoder ran again")


def test_many_prompts_are_chunked(tiny_model, rgb_image):
    predictor = Sam3Predictor(tiny_model, score_threshold=0.0, max_batch=3)
    predictor.set_image(rgb_image)
    texts = [f"concept {i}" for i in range(7)]
    batched = predictor.predict(texts)
    single = [predictor.predict_one(t) for t in texts]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_results_are_sorted_and_union_matches(tiny_model, rgb_image):
    predictor = Sam3Predictor(tiny_model, score_threshold=0.0)
    predictor.set_image(rgb_image)
    result = predictor.predict_one("liver")
    assert np.all(np.diff(result.scores) <= 0)
    np.testing.assert_array_equal(result.union, result.masks.any(axis=0))
    assert result.semantic is not None and result.semantic.shape == rgb_image.shape[:2]


def test_nms_removes_overlapping_boxes(tiny_model, rgb_image):
    predictor = Sam3Predictor(tiny_model, score_threshold=0.0)
    predictor.set_image(rgb_image)
    plain = predictor.predict_one("liver")
    suppressed = predictor.predict_one("liver", nms_iou=0.01)
    assert 0 < len(suppressed) <= len(plain)
    from torchvision.ops import box_iou

    ious = box_iou(torch.from_numpy(suppressed.boxes), torch.from_numpy(suppressed.boxes))
    assert (ious - torch.eye(len(suppressed))).max() <= 0.01 + 1e-6


def test_bad_prompts_and_images(tiny_model, rgb_image):
    predictor = Sam3Predictor(tiny_model)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(["liver"])
    with pytest.raises(InputFileError, match="NaN"):
        predictor.set_image(np.full((10, 10), np.nan, dtype=np.float32))
    with pytest.raises(InputFileError, match="empty image"):
        predictor.set_image(np.zeros((0, 10, 3), dtype=np.uint8))
    predictor.set_image(rgb_image)
    with pytest.raises(PromptError, match="empty prompt"):
        predictor.predict(["  "])
    with pytest.raises(PromptError, match="outside"):
        predictor.predict([Prompt("liver", boxes=((200, 200, 300, 300),))])
    with pytest.raises(PromptError, match="x1 > x0"):
        Prompt("liver", boxes=((50, 10, 20, 40),))
    with pytest.raises(PromptError, match="no prompt"):
        predictor.predict([])


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 4, 3), (1, 7, 3)])
def test_tiny_images_are_read_channels_last(tiny_model, shape):
    """A 1 x 1 or 3 x 4 RGB image is (H, W, 3), never mistaken for channels-first."""
    predictor = Sam3Predictor(tiny_model, score_threshold=0.0)
    predictor.set_image(np.full(shape, 100, np.uint8))
    assert predictor.predict_one("liver").masks.shape[1:] == shape[:2]
