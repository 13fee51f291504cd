"""SAM 3 detection loss: hand-computed terms, invariances, gradient routing on a tiny Sam3Model, overfit."""

from __future__ import annotations

import math

import pytest
import torch

from medsam3.train.boxes import masks_to_normalized_boxes
from medsam3.train.losses import (
    DecoderLayerRecorder,
    LossWeights,
    Sam3DetectionLoss,
    dice_loss,
    iou_aware_bce,
    resize_masks,
)

LN2 = math.log(2)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is as fast alone and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _disk(size: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def _case() -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A perfect prediction for two images: image 0 holds a disk and a square (labels and predictions at
    32 px), image 1 does not contain the concept. Queries 3 and 1 answer image 0's instances."""
    disk = _disk(32, 10, 10, 6)
    square = torch.zeros(32, 32, dtype=torch.bool)
    square[20:28, 16:30] = True
    masks = torch.stack([disk, square])
    targets = [
        {"boxes": masks_to_normalized_boxes(masks), "masks": masks, "present": True},
        {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 32, 32, dtype=torch.bool), "present": False},
    ]
    b, q, h = 2, 5, 32
    logits = torch.full((b, q), -12.0)
    boxes = torch.tensor([0.4, 0.4, 0.6, 0.6]).repeat(b, q, 1)
    pred_masks = torch.full((b, q, h, h), -20.0)
    small = resize_masks(masks, (h, h))
    for query, instance in ((3, 0), (1, 1)):
        logits[0, query] = 12.0
        boxes[0, query] = targets[0]["boxes"][instance]
        pred_masks[0, query] = small[instance] * 40 - 20
    semantic = torch.full((b, 1, h, h), -20.0)
    semantic[0, 0] = resize_masks(masks.any(0, keepdim=True), (h, h))[0] * 40 - 20
    outputs = {
        "pred_logits": logits,
        "pred_boxes": boxes,
        "pred_masks": pred_masks,
        "presence_logits": torch.tensor([[10.0], [-10.0]]),
        "semantic_seg": semantic,
    }
    return outputs, targets


def _clone(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in outputs.items()}


def test_perfect_prediction_is_near_zero_and_every_mistake_costs_more():
    loss = Sam3DetectionLoss()
    outputs, targets = _case()
    best, terms = loss(outputs, targets)
    assert best.item() < 5e-3
    assert all(v.item() < 1e-4 for v in terms.values()), terms

    def worse(edit, term: str) -> None:
        bad = _clone(outputs)
        edit(bad)
        total, bad_terms = loss(bad, targets)
        assert total.item() > best.item() + 0.5, term
        assert bad_terms[term].item() > terms[term].item() + 1e-2, term

    worse(lambda o: o["pred_boxes"][0, 3].add_(torch.tensor([0.05, 0.0, 0.05, 0.0])), "loss_bbox")
    worse(lambda o: o["pred_boxes"][0, 3].add_(torch.tensor([0.05, 0.0, 0.05, 0.0])), "loss_giou")
    worse(lambda o: o["pred_masks"][0, 1].neg_(), "loss_mask")
    worse(lambda o: o["pred_masks"][0, 1].neg_(), "loss_dice")
    worse(lambda o: o["pred_logits"][0, 3].fill_(-2.0), "loss_cls")  # a true instance scored low
    worse(lambda o: o["pred_logits"][0, 0:5:2].fill_(6.0), "loss_cls")  # queries fire on background
    worse(lambda o: o["presence_logits"][1].fill_(5.0), "loss_presence")
    worse(lambda o: o["semantic_seg"].neg_(), "loss_semantic")
    worse(lambda o: o["semantic_seg"].neg_(), "loss_semantic_dice")
    # SAM 3: in an image without the concept a firing query is left to the presence head
    absent_fires = _clone(outputs)
    absent_fires["pred_logits"][1].fill_(6.0)
    assert loss(absent_fires, targets)[0].item() == pytest.approx(best.item(), abs=1e-6)
    legacy = Sam3DetectionLoss(LossWeights(negatives_in_absent_images=True))
    assert legacy(absent_fires, targets)[0].item() > legacy(outputs, targets)[0].item() + 0.5


def test_permuting_queries_gives_the_same_loss():
    torch.manual_seed(3)
    _, targets = _case()
    b, q, h = 2, 7, 16
    corners = torch.rand(b, q, 2, 2).sort(dim=2).values
    outputs = {
        "pred_logits": torch.randn(b, q),
        "pred_boxes": corners.permute(0, 1, 3, 2).reshape(b, q, 4)[..., [0, 2, 1, 3]],
        "pred_masks": torch.randn(b, q, h, h),
        "presence_logits": torch.randn(b, 1),
        "semantic_seg": torch.randn(b, 1, h, h),
    }
    loss = Sam3DetectionLoss()
    total, terms = loss(outputs, targets)
    perm = torch.randperm(q)
    permuted = {k: (v[:, perm] if k.startswith("pred_") else v) for k, v in outputs.items()}
    total_p, terms_p = loss(permuted, targets)
    assert total_p.item() == pytest.approx(total.item(), rel=1e-5)
    for name in terms:
        assert terms_p[name].item() == pytest.approx(terms[name].item(), rel=1e-5, abs=1e-7), name


def _single(logits, boxes, masks_logits, target_box, target_mask):
    outputs = {
        "pred_logits": torch.tensor([logits]),
        "pred_boxes": torch.tensor([boxes]),
        "pred_masks": masks_logits[None],
        "presence_logits": torch.zeros(1, 1),
    }
    targets = [{"boxes": torch.tensor([target_box]), "masks": target_mask[None]}]
    return outputs, targets


def test_box_terms_match_hand_values():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    outputs, targets = _single([0.0], [[0.0, 0.0, 0.5, 1.0]], torch.zeros(1, 4, 4), [0, 0, 0.5, 0.5], mask)
    _, terms = Sam3DetectionLoss()(outputs, targets)
    # cxcywh (.25, .5, .5, 1) vs (.25, .25, .5, .5): L1 = .25 + .5; IoU = GIoU = .25 / .5
    assert terms["loss_bbox"].item() == pytest.approx(0.75, abs=1e-6)
    assert terms["loss_giou"].item() == pytest.approx(0.5, abs=1e-6)


def test_classification_and_presence_match_hand_values():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    box = [0.0, 0.0, 0.5, 0.5]
    outputs, targets = _single([0.0, 0.0], [box, [0.5, 0.5, 1.0, 1.0]], torch.zeros(2, 4, 4), box, mask)
    _, terms = Sam3DetectionLoss(LossWeights(pad_n_queries=0))(outputs, targets)
    # logit 0: BCE is ln 2 whatever the soft target; positive x pos_weight 10, negative x p^gamma = 1/4
    assert terms["loss_cls"].item() == pytest.approx((10 * LN2 + 0.25 * LN2) / 2, abs=1e-6)
    _, terms = Sam3DetectionLoss()(outputs, targets)  # SAM 3: the sum over 200 (padded) queries
    assert terms["loss_cls"].item() == pytest.approx((10 * LN2 + 0.25 * LN2) / 200, abs=1e-6)
    # presence: focal with alpha .5, gamma 0 = half a BCE
    assert terms["loss_presence"].item() == pytest.approx(0.5 * LN2, abs=1e-6)


def test_mask_terms_match_hand_values():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, :2] = True  # half the pixels
    outputs, targets = _single([0.0], [[0.0, 0.0, 0.5, 1.0]], torch.zeros(1, 4, 4), [0, 0, 0.5, 1.0], mask)
    _, terms = Sam3DetectionLoss()(outputs, targets)
    # p = .5 everywhere: positives alpha (1-p)^2 ln2 = .0625 ln2, negatives (1-alpha) p^2 ln2 = .1875 ln2
    assert terms["loss_mask"].item() == pytest.approx(0.125 * LN2, abs=1e-6)
    # Dice: intersection 8 * .5 = 4, sums 8 + 8 -> 1 - (2 * 4 + 1) / (16 + 1)
    assert terms["loss_dice"].item() == pytest.approx(1 - 9 / 17, abs=1e-6)


def test_absent_concept_has_no_matches_and_pushes_presence_and_queries_down():
    outputs, targets = _case()
    absent_out = {k: v[1:].clone().requires_grad_(True) for k, v in outputs.items()}
    absent_out["pred_logits"].data.fill_(0.0)
    absent_out["presence_logits"].data.fill_(0.0)
    total, terms = Sam3DetectionLoss()(absent_out, targets[1:])
    assert terms["loss_bbox"].item() == 0 and terms["loss_mask"].item() == 0
    total.backward()
    assert absent_out["presence_logits"].grad.item() > 0  # descent lowers presence
    assert absent_out["pred_logits"].grad.abs().sum() == 0  # SAM 3: left to the presence head
    assert absent_out["pred_boxes"].grad.abs().sum() == 0  # nothing to regress to
    assert absent_out["pred_masks"].grad.abs().sum() == 0
    assert absent_out["semantic_seg"].grad.abs().sum() == 0  # SAM 3: no semantic term without the concept

    for grad in ("pred_logits", "presence_logits", "semantic_seg"):
        absent_out[grad].grad = None
    legacy = LossWeights(negatives_in_absent_images=True, semantic_on_absent=True)
    Sam3DetectionLoss(legacy)(absent_out, targets[1:])[0].backward()
    assert (absent_out["pred_logits"].grad > 0).all()  # every query is a negative
    assert absent_out["semantic_seg"].grad.abs().sum() > 0


def test_present_concept_pushes_presence_up():
    outputs, targets = _case()
    present = {k: v[:1].clone().requires_grad_(True) for k, v in outputs.items()}
    present["presence_logits"].data.fill_(0.0)
    total, _ = Sam3DetectionLoss()(present, targets[:1])
    total.backward()
    assert present["presence_logits"].grad.item() < 0


def test_box_and_mask_sums_are_normalised_by_the_number_of_boxes():
    torch.manual_seed(0)
    outputs, targets = _case()
    outputs["pred_boxes"][0, 3] += 0.03
    outputs["pred_masks"][0, 1] += torch.randn(32, 32) * 10
    _, one = Sam3DetectionLoss()({k: v[:1] for k, v in outputs.items()}, targets[:1])
    twice = {k: torch.cat([v[:1], v[:1]]) for k, v in outputs.items()}
    _, two = Sam3DetectionLoss()(twice, [targets[0], targets[0]])
    for name in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_cls", "loss_semantic_dice"):
        assert two[name].item() == pytest.approx(one[name].item(), rel=1e-5), name


def test_resize_masks_area_threshold_and_tiny_instances():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :3, :3] = True  # 2x2 blocks: (0, 1) and (1, 0) half covered -> inside; (1, 1) a quarter -> out
    small = resize_masks(mask, (4, 4))
    assert small[0].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    speck = torch.zeros(1, 8, 8, dtype=torch.bool)
    speck[0, 5, 6] = True  # covers a quarter of one output pixel
    kept = resize_masks(speck, (4, 4))
    assert kept.sum().item() == 1 and kept[0, 2, 3].item() == 1
    big = resize_masks(torch.ones(1, 2, 2, dtype=torch.bool), (4, 4))
    assert big.sum().item() == 16
    assert dice_loss(torch.full((1, 4), 20.0), torch.ones(1, 4)).item() < 1e-6


def test_bad_targets_fail_with_clear_messages():
    outputs, targets = _case()
    loss = Sam3DetectionLoss()
    with pytest.raises(ValueError, match="present=True but it has 0 boxes"):
        loss(outputs, [targets[0], {**targets[1], "present": True}])
    inverted = {**targets[0], "boxes": targets[0]["boxes"][:, [2, 1, 0, 3]]}
    with pytest.raises(ValueError, match="x2 >= x1"):
        loss(outputs, [inverted, targets[1]])
    with pytest.raises(ValueError, match="masks must be"):
        loss(outputs, [{**targets[0], "masks": targets[0]["masks"][:1]}, targets[1]])
    with pytest.raises(ValueError, match="2 predictions"):
        loss(outputs, targets[:1])


def test_box_count_is_averaged_over_processes(tmp_path):
    dist = torch.distributed
    outputs, targets = _case()
    alone, _ = Sam3DetectionLoss()(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grouped, _ = Sam3DetectionLoss()(outputs, targets)
    finally:
        dist.destroy_process_group()
    assert grouped.item() == pytest.approx(alone.item(), rel=1e-6)


# ---- a tiny transformers Sam3Model (random weights) -----------------------------------------------


def _tiny_model():
    from transformers import Sam3Config, Sam3Model

    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    config = Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
                "window_size": 4, "global_attn_indexes": [1],
            },
            "fpn_hidden_size": 32,
            "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
        },
        text_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 49408, "max_position_embeddings": 32, "projection_dim": 32,
        },
        geometry_encoder_config=dict(small, num_layers=1),
        detr_encoder_config=dict(small, num_layers=1),
        detr_decoder_config=dict(small, num_layers=2, num_queries=8),
        mask_decoder_config={"hidden_size": 32, "num_attention_heads": 2, "num_upsampling_stages": 3},
    )
    model = Sam3Model(config)
    for frozen in (model.vision_encoder, model.text_encoder, model.text_projection):
        frozen.requires_grad_(False)
    return model


def _disk_sample():
    disk = _disk(112, 60, 45, 22)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 112, 112, generator=generator) * 0.1 + disk.float()
    input_ids = torch.tensor([[49406, 320, 1000, 49407]])
    attention_mask = torch.ones_like(input_ids)
    target = {"boxes": masks_to_normalized_boxes(disk[None]), "masks": disk[None], "present": True}
    return pixels, input_ids, attention_mask, target


def test_gradients_reach_only_trainable_parameters_including_aux_layers():
    model = _tiny_model()
    pixels, input_ids, attention_mask, target = _disk_sample()
    with DecoderLayerRecorder(model) as recorder:
        outputs = model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask)
        layers = recorder.layer_outputs(include_last=True)
    assert len(layers) == 2  # two decoder layers; the last is what the model returns
    assert torch.equal(layers[-1]["pred_logits"], outputs.pred_logits)
    assert torch.equal(layers[-1]["pred_boxes"], outputs.pred_boxes)
    assert torch.equal(layers[-1]["presence_logits"], outputs.presence_logits)

    total, terms = Sam3DetectionLoss()(outputs, [target], aux_outputs=layers[:-1])
    assert {"loss_cls_aux0", "loss_presence_aux0", "loss_bbox_aux0", "loss_giou_aux0"} <= set(terms)
    total.backward()
    frozen_prefixes = ("vision_encoder.", "text_encoder.", "text_projection.")
    frozen = {n: p for n, p in model.named_parameters() if n.startswith(frozen_prefixes)}
    assert frozen and all(p.grad is None for p in frozen.values())
    for module in ("detr_decoder", "detr_encoder", "mask_decoder", "dot_product_scoring"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(module + ".")]
        assert grads and sum(g.abs().sum().item() for g in grads if g is not None) > 0, module
    # geometry encoder is unused without box prompts, so it gets no gradient
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("geometry_encoder."))


def test_aux_outputs_are_the_first_decoder_layer_own_predictions():
    """A loss on the recorded first-layer outputs trains decoder layer 0 and never layer 1."""
    model = _tiny_model()
    pixels, input_ids, attention_mask, target = _disk_sample()
    with DecoderLayerRecorder(model) as recorder:
        model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask)
        (first,) = recorder.layer_outputs()
        with pytest.raises(RuntimeError, match="no forward"):
            recorder.layer_outputs()  # cleared after reading
    assert first["pred_logits"].shape == (1, 8) and first["pred_boxes"].shape == (1, 8, 4)
    total, terms = Sam3DetectionLoss()(first, [target])
    assert set(terms) == {"loss_cls", "loss_presence", "loss_bbox", "loss_giou"}
    total.backward()
    layer0 = [p.grad for n, p in model.named_parameters() if n.startswith("detr_decoder.layers.0.")]
    layer1 = [p.grad for n, p in model.named_parameters() if n.startswith("detr_decoder.layers.1.")]
    assert any(g is not None and g.abs().sum() > 0 for g in layer0)
    assert all(g is None or g.abs().sum() == 0 for g in layer1)  # stacked layers pass back zeros
    assert model.detr_decoder.box_head.layer3.weight.grad.abs().sum() > 0
    assert not model.detr_decoder._forward_hooks  # the context manager removed its hooks


def test_overfitting_one_disk_drives_dice_up():
    model = _tiny_model()
    pixels, input_ids, attention_mask, target = _disk_sample()
    with torch.no_grad():  # frozen encoders: compute their features once, as the feature cache does
        vision = model.get_vision_features(pixels)
        text = model.get_text_features(input_ids, attention_mask)
    small_target = resize_masks(target["masks"], (32, 32))[0] > 0

    def dice_of_best_query_and_presence() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            out = model(vision_embeds=vision, text_embeds=text, attention_mask=attention_mask)
        model.train()
        best = out.pred_logits[0].argmax()
        pred = out.pred_masks[0, best] > 0
        dice = (2 * (pred & small_target).sum() / (pred.sum() + small_target.sum())).item()
        return dice, out.presence_logits.sigmoid().item()

    before, presence_before = dice_of_best_query_and_presence()
    loss = Sam3DetectionLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(100):
        with DecoderLayerRecorder(model) as recorder:
            outputs = model(vision_embeds=vision, text_embeds=text, attention_mask=attention_mask)
            total, _ = loss(outputs, [target], aux_outputs=recorder.layer_outputs())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    after, presence_after = dice_of_best_query_and_presence()
    assert before < 0.5 and presence_before < 0.6
    assert after > 0.9 and presence_after > 0.9
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_hard_classification_targets_for_training_from_scratch():
    """With IoU-aware targets a badly placed match is pushed low; with hard targets it is pushed to 1."""
    logits = torch.tensor([[2.0]], requires_grad=True)
    positive = torch.tensor([[True]])
    poor_iou = torch.tensor([[0.05]])
    soft = iou_aware_bce(logits, positive, poor_iou, pos_weight=1.0, alpha=0.25, gamma=2.0)
    (grad_soft,) = torch.autograd.grad(soft, logits)
    hard = iou_aware_bce(logits, positive, poor_iou, pos_weight=1.0, alpha=0.25, gamma=2.0, iou_aware=False)
    (grad_hard,) = torch.autograd.grad(hard, logits)
    assert grad_soft.item() > 0  # descent lowers the score towards p^.25 * IoU^.75 ~ 0.1
    assert grad_hard.item() < 0  # descent raises it towards 1
    assert hard.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)


# ---- parity with SAM 3's formulas (reference.md section 3), written out by hand -----------------
# Plain-Python versions of each term, independent of the implementation: the matched pairs are made
# obvious by the boxes, so the expected values follow from the formulas alone.

_TARGET_BOXES = [
    [[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]],  # image 0: two instances
    [[0.2, 0.3, 0.6, 0.7]],  # image 1: one instance
    [],  # image 2: the concept is absent
]
_PRED_BOXES = [
    [[0.52, 0.5, 0.88, 0.82], [0.0, 0.8, 0.1, 0.95], [0.12, 0.08, 0.41, 0.5], [0.7, 0.0, 0.95, 0.2]],
    [[0.8, 0.8, 0.95, 0.95], [0.0, 0.0, 0.1, 0.1], [0.85, 0.1, 0.95, 0.3], [0.22, 0.3, 0.58, 0.72]],
    [[0.1, 0.1, 0.3, 0.3], [0.4, 0.4, 0.6, 0.6], [0.2, 0.5, 0.5, 0.9], [0.6, 0.1, 0.9, 0.4]],
]
_MATCHES = [{2: 0, 0: 1}, {3: 0}, {}]  # per image: query -> target, by construction of the boxes
_LOGITS = [[1.0, -2.0, 0.5, -1.0], [-0.5, 0.3, -3.0, 2.0], [0.7, -1.2, 0.1, 1.5]]
_PRESENCE = [1.2, -0.4, 0.8]


def _parity_case():
    generator = torch.Generator().manual_seed(7)
    target_masks = []
    for boxes in _TARGET_BOXES:
        masks = torch.rand(len(boxes), 8, 8, generator=generator) > 0.6
        masks[:, 3, 3] = True  # never empty
        target_masks.append(masks)
    targets = [
        {"boxes": torch.tensor(boxes).reshape(-1, 4), "masks": masks}
        for boxes, masks in zip(_TARGET_BOXES, target_masks, strict=True)
    ]
    outputs = {
        "pred_logits": torch.tensor(_LOGITS),
        "pred_boxes": torch.tensor(_PRED_BOXES),
        "pred_masks": torch.randn(3, 4, 4, 4, generator=generator) * 2,  # 4 x 4 logits, 8 x 8 targets
        "presence_logits": torch.tensor(_PRESENCE)[:, None],
        "semantic_seg": torch.randn(3, 1, 4, 4, generator=generator) * 2,
    }
    return outputs, targets


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(p: float, t: float) -> float:
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _area(b) -> float:
    return max(b[2] - b[0], 0) * max(b[3] - b[1], 0)


def _iou_giou(a, b) -> tuple[float, float]:
    inter = _area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = _area(a) + _area(b) - inter
    hull = _area([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
    return inter / union, inter / union - (hull - union) / hull


def _cxcywh(b) -> list[float]:
    return [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]


def _bilinear(grid: list[list[float]], size: int) -> list[list[float]]:
    """Bilinear resize without corner alignment (source = (i + .5) * h / H - .5, clamped at 0)."""
    h = len(grid)

    def taps(i: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * h / size - 0.5, 0.0)
        lo = int(src)
        return lo, min(lo + 1, h - 1), src - lo

    out = []
    for i in range(size):
        y0, y1, fy = taps(i)
        row = []
        for j in range(size):
            x0, x1, fx = taps(j)
            top = grid[y0][x0] * (1 - fx) + grid[y0][x1] * fx
            bottom = grid[y1][x0] * (1 - fx) + grid[y1][x1] * fx
            row.append(top * (1 - fy) + bottom * fy)
        out.append(row)
    return out


def _focal_and_dice(logit_grid, target_grid, alpha: float, gamma: float) -> tuple[float, float]:
    """Sigmoid focal (mean over pixels) and +1-smoothed Dice of one mask, logits upsampled to the target."""
    logits = _bilinear(logit_grid, len(target_grid))
    focal, inter, prob_sum, target_sum, n = 0.0, 0.0, 0.0, 0.0, 0
    for logit_row, target_row in zip(logits, target_grid, strict=True):
        for x, t in zip(logit_row, target_row, strict=True):
            p = _sig(x)
            p_t = p if t else 1 - p
            alpha_t = alpha if t else 1 - alpha
            focal += alpha_t * (1 - p_t) ** gamma * _bce(p, t)
            inter, prob_sum, target_sum, n = inter + p * t, prob_sum + p, target_sum + t, n + 1
    return focal / n, 1 - (2 * inter + 1) / (prob_sum + target_sum + 1)


def _expected_cls(pad: int, absent_queries: bool) -> float:
    total = 0.0
    for b, logits in enumerate(_LOGITS):
        if not _TARGET_BOXES[b] and not absent_queries:
            continue  # SAM 3: an image without the concept has no query term
        for q, x in enumerate(logits):
            p = _sig(x)
            if q in _MATCHES[b]:
                iou, _ = _iou_giou(_PRED_BOXES[b][q], _TARGET_BOXES[b][_MATCHES[b][q]])
                soft = max(p**0.25 * iou**0.75, 0.01)
                total += 10 * _bce(p, soft)
            else:
                total += p**2 * _bce(p, 0.0)
    return total / (len(_LOGITS) * max(len(_LOGITS[0]), pad))


def test_classification_is_sam3_iabce_with_soft_targets_and_padded_queries():
    outputs, targets = _parity_case()
    _, terms = Sam3DetectionLoss()(outputs, targets)
    assert terms["loss_cls"].item() == pytest.approx(_expected_cls(pad=200, absent_queries=False), rel=1e-5)
    _, terms = Sam3DetectionLoss(LossWeights(pad_n_queries=0))(outputs, targets)
    assert terms["loss_cls"].item() == pytest.approx(_expected_cls(pad=0, absent_queries=False), rel=1e-5)
    _, terms = Sam3DetectionLoss(LossWeights(pad_n_queries=3))(outputs, targets)  # Q = 4 >= 3: the mean
    assert terms["loss_cls"].item() == pytest.approx(_expected_cls(pad=0, absent_queries=False), rel=1e-5)
    _, terms = Sam3DetectionLoss(LossWeights(negatives_in_absent_images=True))(outputs, targets)
    assert terms["loss_cls"].item() == pytest.approx(_expected_cls(pad=200, absent_queries=True), rel=1e-5)


def test_presence_is_half_a_bce_averaged_over_images():
    outputs, targets = _parity_case()
    _, terms = Sam3DetectionLoss()(outputs, targets)
    expected = sum(0.5 * _bce(_sig(z), float(bool(boxes))) for z, boxes in zip(_PRESENCE, _TARGET_BOXES)) / 3
    assert terms["loss_presence"].item() == pytest.approx(expected, rel=1e-5)


def test_boxes_are_l1_on_cxcywh_and_giou_over_the_number_of_boxes():
    outputs, targets = _parity_case()
    _, terms = Sam3DetectionLoss()(outputs, targets)
    l1 = giou = 0.0
    for b, matches in enumerate(_MATCHES):
        for q, t in matches.items():
            pred, target = _PRED_BOXES[b][q], _TARGET_BOXES[b][t]
            l1 += sum(abs(u - v) for u, v in zip(_cxcywh(pred), _cxcywh(target), strict=True))
            giou += 1 - _iou_giou(pred, target)[1]
    assert terms["loss_bbox"].item() == pytest.approx(l1 / 3, rel=1e-5)
    assert terms["loss_giou"].item() == pytest.approx(giou / 3, rel=1e-5)


def test_masks_are_focal_and_dice_at_the_target_size():
    outputs, targets = _parity_case()
    _, terms = Sam3DetectionLoss()(outputs, targets)
    focal = dice = 0.0
    for b, matches in enumerate(_MATCHES):
        for q, t in matches.items():
            logits, target = outputs["pred_masks"][b, q].tolist(), targets[b]["masks"][t].float().tolist()
            f, d = _focal_and_dice(logits, target, 0.25, 2)
            focal, dice = focal + f, dice + d
    assert terms["loss_mask"].item() == pytest.approx(focal / 3, rel=1e-5)
    assert terms["loss_dice"].item() == pytest.approx(dice / 3, rel=1e-5)


def test_semantic_map_is_focal_and_dice_on_images_with_the_concept_only():
    outputs, targets = _parity_case()
    _, terms = Sam3DetectionLoss()(outputs, targets)
    focal = dice = 0.0
    for b in (0, 1):  # image 2 has no instance: no semantic term
        union = targets[b]["masks"].any(0).float().tolist()
        f, d = _focal_and_dice(outputs["semantic_seg"][b, 0].tolist(), union, 0.6, 2)
        focal, dice = focal + f, dice + d
    assert terms["loss_semantic"].item() == pytest.approx(focal / 2, rel=1e-5)
    assert terms["loss_semantic_dice"].item() == pytest.approx(dice / 2, rel=1e-5)


def test_total_is_the_weighted_sum_with_sam3_weights():
    outputs, targets = _parity_case()
    total, terms = Sam3DetectionLoss()(outputs, targets)
    weights = {"loss_cls": 20, "loss_presence": 20, "loss_bbox": 5, "loss_giou": 2, "loss_mask": 200,
               "loss_dice": 10, "loss_semantic": 20, "loss_semantic_dice": 30}
    assert set(terms) == set(weights)
    assert total.item() == pytest.approx(sum(w * terms[k].item() for k, w in weights.items()), rel=1e-6)


def test_legacy_semantic_form_is_bce_on_every_image():
    outputs, targets = _parity_case()
    legacy = LossWeights(semantic_form="bce", semantic_on_absent=True)
    _, terms = Sam3DetectionLoss(legacy)(outputs, targets)
    bce = dice = 0.0
    for b in range(3):
        logits = _bilinear(outputs["semantic_seg"][b, 0].tolist(), 8)
        union = targets[b]["masks"].any(0).float().tolist() if len(targets[b]["masks"]) else [[0.0] * 8] * 8
        pixels = [(_sig(x), t) for lr, tr in zip(logits, union) for x, t in zip(lr, tr)]
        bce += sum(_bce(p, t) for p, t in pixels) / 64
        inter, psum, tsum = sum(p * t for p, t in pixels), sum(p for p, _ in pixels), sum(t for _, t in pixels)
        dice += 1 - (2 * inter + 1) / (psum + tsum + 1)
    assert terms["loss_semantic"].item() == pytest.approx(bce / 3, rel=1e-5)
    assert terms["loss_semantic_dice"].item() == pytest.approx(dice / 3, rel=1e-5)


def test_loss_grid_is_capped_at_the_model_input_side():
    outputs, targets = _parity_case()
    at_grid = Sam3DetectionLoss(LossWeights(mask_at_target=False, semantic_at_target=False))(outputs, targets)[1]
    capped = Sam3DetectionLoss(input_side=4)(outputs, targets)[1]  # 8 px targets, 4 px input: the 4 px grid
    full = Sam3DetectionLoss(input_side=8)(outputs, targets)[1]
    for name in ("loss_mask", "loss_dice", "loss_semantic", "loss_semantic_dice"):
        assert capped[name].item() == pytest.approx(at_grid[name].item(), rel=1e-6), name
        assert full[name].item() != pytest.approx(at_grid[name].item(), rel=1e-3), name
    explicit = Sam3DetectionLoss(LossWeights(max_mask_side=4), input_side=8)(outputs, targets)[1]
    assert explicit["loss_mask"].item() == pytest.approx(at_grid["loss_mask"].item(), rel=1e-6)
    loss = Sam3DetectionLoss(LossWeights(max_mask_side=0), input_side=4)
    assert loss.loss_grid((1000, 500), (64, 64)) == (1000, 500)  # 0: no cap
    assert Sam3DetectionLoss(input_side=256).loss_grid((1000, 500), (64, 64)) == (256, 128)


def test_zero_weighted_dense_terms_are_skipped_and_bad_options_fail_clearly():
    outputs, targets = _parity_case()
    _, terms = Sam3DetectionLoss(LossWeights(semantic=0, semantic_dice=0, mask_focal=0, mask_dice=0))(outputs, targets)
    assert not {"loss_mask", "loss_dice", "loss_semantic", "loss_semantic_dice"} & set(terms)
    from medsam3.errors import MedSAM3Error

    with pytest.raises(MedSAM3Error, match="semantic_form"):
        LossWeights(semantic_form="dice")
    with pytest.raises(MedSAM3Error, match="max_mask_side"):
        LossWeights(max_mask_side=-4)
    with pytest.raises(MedSAM3Error, match="pad_n_queries"):
        LossWeights(pad_n_queries=-1)
    with pytest.raises(MedSAM3Error, match="unknown loss option.*one_to_many"):
        LossWeights.from_options({"one_to_many": 2.0})
    assert LossWeights.from_options({"cls": 5}).cls == 5 and LossWeights.from_options(None) == LossWeights()
