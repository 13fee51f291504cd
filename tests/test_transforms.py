"""Augmentations: image, masks and boxes move together; seeded; instances that leave are dropped."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medsam3.data.masks import masks_to_boxes
from medsam3.data.sample import Sample
from medsam3.data.transforms import (
    BrightnessContrast,
    Compose,
    CTWindowJitter,
    Gamma,
    GaussianNoise,
    HorizontalFlip,
    RandomRotation,
    RandomScaleCrop,
    RandomShift,
    VerticalFlip,
    annotate,
    default_augmentation,
)


def _scene(h: int = 40, w: int = 48):
    """An RGB image whose colours encode position, and three instances (one small, near a corner)."""
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([rows * 255 // h, cols * 255 // w, (rows + cols) % 256], axis=-1).astype(np.uint8)
    masks = np.zeros((3, h, w), dtype=bool)
    masks[0, 5:15, 6:20] = True
    masks[1, 20:34, 25:31] = True
    masks[2, 0:3, w - 3 : w] = True
    return image, masks


ALWAYS = [
    HorizontalFlip(p=1),
    VerticalFlip(p=1),
    RandomScaleCrop(size=(32, 36), scale=(0.6, 1.6)),
    RandomRotation(degrees=25, p=1),
    RandomShift(fraction=0.3, p=1),
    Gamma(p=1),
    GaussianNoise(std=(0.02, 0.05), p=1),
    BrightnessContrast(p=1),
]


def test_shift_moves_image_masks_and_boxes_together_and_fills_what_it_uncovers():
    image, masks = _scene()

    largest = SimpleNamespace(uniform=lambda low, high: high)  # the largest shift: +fraction of each side
    out = RandomShift(fraction=0.25, p=1).apply(annotate(image, masks), largest)
    dy, dx = 10, 12  # 0.25 of 40 rows and 48 columns
    np.testing.assert_array_equal(out.image[dy:, dx:], image[: 40 - dy, : 48 - dx])
    assert not out.image[:dy].any() and not out.image[:, :dx].any()
    assert out.keep.tolist() == [0, 1]  # the corner instance left the frame
    np.testing.assert_array_equal(out.masks[0], np.roll(masks[0], (dy, dx), axis=(0, 1)))
    assert out.boxes[0].tolist() == [6 + dx, 5 + dy, 20 + dx, 15 + dy]
    with pytest.raises(ValueError, match="fraction"):
        RandomShift(fraction=1.0)


def test_flips_round_trip_exactly():
    image, masks = _scene()
    for flip in (HorizontalFlip(p=1), VerticalFlip(p=1)):
        once = Compose([flip], seed=0).apply(image, masks)
        twice = Compose([flip, flip], seed=0).apply(image, masks)
        assert not np.array_equal(once.image, image)
        np.testing.assert_array_equal(twice.image, image)
        np.testing.assert_array_equal(twice.masks, masks)
        np.testing.assert_array_equal(twice.boxes, masks_to_boxes(masks))
    flipped = Compose([HorizontalFlip(p=1)]).apply(image, masks)
    np.testing.assert_array_equal(flipped.image, image[:, ::-1])
    assert flipped.boxes[0].tolist() == [48 - 20, 5, 48 - 6, 15]  # pixel edges mirror exactly
    assert flipped.applied == ("hflip",)


@pytest.mark.parametrize("transform", ALWAYS, ids=lambda t: t.name)
def test_boxes_match_masks_after_every_transform(transform):
    image, masks = _scene()
    for seed in range(5):
        out = Compose([transform], seed=seed).apply(image, masks)
        assert len(out.masks) == len(out.boxes) == len(out.keep)
        assert out.masks.dtype == bool and out.masks.shape[1:] == out.image.shape[:2]
        assert all(m.any() for m in out.masks)
        np.testing.assert_array_equal(out.boxes, masks_to_boxes(out.masks))
        if not transform.geometric:
            np.testing.assert_array_equal(out.masks, masks)  # intensity leaves geometry alone


def test_rotation_by_a_right_angle_is_rot90():
    image, masks = _scene(32, 32)
    out = Compose([RandomRotation(degrees=(90, 90), p=1)]).apply(image, masks)
    np.testing.assert_array_equal(out.image, np.rot90(image))
    np.testing.assert_array_equal(out.masks, np.rot90(masks, axes=(1, 2)))


def test_small_rotation_keeps_masks_binary_and_areas():
    image, masks = _scene()
    out = Compose([RandomRotation(degrees=(8, 8), p=1)]).apply(image, masks)
    areas, rotated = masks[:2].sum(axis=(1, 2)), out.masks[:2].sum(axis=(1, 2))
    assert np.all(np.abs(rotated - areas) <= 0.1 * areas)
    assert not np.array_equal(out.masks[:2], masks[:2])


def test_zoom_by_two_replicates_pixels():
    image, masks = _scene(10, 12)
    masks = masks[[0, 2]]
    out = Compose([RandomScaleCrop(size=(20, 24), scale=(2.0, 2.0))]).apply(image, masks)
    np.testing.assert_array_equal(out.masks, masks.repeat(2, axis=1).repeat(2, axis=2))
    np.testing.assert_array_equal(out.boxes, masks_to_boxes(masks) * 2)


def test_instances_leaving_the_view_are_dropped_with_their_boxes():
    image, masks = _scene()
    dropped = 0
    for seed in range(20):
        out = Compose([RandomScaleCrop(size=(16, 16), scale=(1.0, 1.0))], seed=seed).apply(image, masks)
        assert out.image.shape == (16, 16, 3)
        assert sorted(set(out.keep.tolist())) == out.keep.tolist() and set(out.keep.tolist()) <= {0, 1, 2}
        for mask, index in zip(out.masks, out.keep, strict=True):
            assert 0 < mask.sum() <= masks[index].sum()
        dropped += 3 - len(out.keep)
    assert dropped > 0


def test_empty_input_masks_are_not_instances():
    image, masks = _scene()
    masks[1] = False
    out = Compose([Gamma(p=1)]).apply(image, masks)
    assert out.keep.tolist() == [0, 2] and len(out.masks) == len(out.boxes) == 2


def test_zoom_out_pads_with_fill():
    raw = np.full((20, 20), 50.0, dtype=np.float32)
    out = Compose([RandomScaleCrop(scale=(0.5, 0.5), fill=-1024.0)], seed=1).apply(raw)
    assert out.image.shape == (20, 20) and out.image.min() == -1024.0 and out.image.max() == 50.0
    assert np.isclose((out.image == 50.0).mean(), 0.25, atol=0.06)


def test_same_seed_same_augmentation():
    image, masks = _scene()
    first = Compose(ALWAYS, seed=7).apply(image, masks)
    second = Compose(ALWAYS, seed=7).apply(image, masks)
    other = Compose(ALWAYS, seed=8).apply(image, masks)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.image.shape == other.image.shape == (32, 36, 3)  # the crop fixes the size
    assert not np.array_equal(first.image, other.image)
    # A generator passed per call wins over the pipeline's own: a data loader seeds per sample.
    a = Compose(ALWAYS, seed=0).apply(image, masks, rng=np.random.default_rng(3))
    b = Compose(ALWAYS, seed=99).apply(image, masks, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.image, b.image)


def test_boxes_without_masks_move_as_geometry():
    image, masks = _scene()
    boxes = masks_to_boxes(masks)
    flipped = Compose([HorizontalFlip(p=1)]).apply(image, boxes=boxes)
    assert flipped.masks is None
    np.testing.assert_array_equal(flipped.boxes, masks_to_boxes(masks[:, :, ::-1]))
    zoomed = Compose([RandomScaleCrop(size=(80, 96), scale=(2.0, 2.0))]).apply(image, boxes=boxes)
    np.testing.assert_allclose(zoomed.boxes, boxes * 2, atol=1e-4)
    turned = Compose([RandomRotation(degrees=(30, 30), p=1)]).apply(image, boxes=boxes[:2])
    from_masks = Compose([RandomRotation(degrees=(30, 30), p=1)]).apply(image, masks[:2])
    # The box around rotated corners encloses the box around the rotated mask.
    assert np.all(turned.boxes[:, :2] <= from_masks.boxes[:, :2] + 1)
    assert np.all(turned.boxes[:, 2:] >= from_masks.boxes[:, 2:] - 1)


def test_intensity_transforms_do_what_they_say():
    gray = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (16, 1))
    image = np.repeat(gray[..., None], 3, axis=-1)
    darker = Compose([Gamma(gamma=(2.0, 2.0), p=1)]).apply(image).image
    assert darker[:, 32].mean() < image[:, 32].mean() and darker[0, -1, 0] == 255 and darker[0, 0, 0] == 0
    noisy = Compose([GaussianNoise(std=(0.05, 0.05), p=1)], seed=0).apply(image).image.astype(float)
    residual = noisy[:, 8:56, 0] - image[:, 8:56, 0]
    assert 10 < residual.std() < 15  # 0.05 of full scale = 12.75 grey levels
    np.testing.assert_array_equal(noisy[..., 0], noisy[..., 1])  # grey stays grey
    flat = Compose([BrightnessContrast(brightness=0.0, contrast=0.5, p=1)], seed=2).apply(image).image
    assert flat.std() != image.std() and abs(flat.mean() - image.mean()) < 3


def test_ct_window_jitter_turns_hounsfield_units_into_rgb():
    hu = np.array([[-1000.0, 0.0, 40.0, 80.0, 1000.0]], dtype=np.float32)
    fixed = CTWindowJitter(center=40, width=400, center_jitter=0, width_scale=(1, 1))
    out = Compose([fixed]).apply(hu).image
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 102, 128, 153, 255]
    windows = {CTWindowJitter().window(np.random.default_rng(s)) for s in range(5)}
    assert len(windows) == 5 and all(20 <= c <= 60 and 320 <= w <= 500 for c, w in windows)
    with pytest.raises(ValueError, match="raw"):
        Compose([fixed]).apply(np.zeros((4, 4, 3), dtype=np.uint8))


def test_flags_for_a_feature_cache():
    assert HorizontalFlip.geometric and HorizontalFlip.hflip
    assert VerticalFlip.geometric and not VerticalFlip.hflip
    assert not Gamma.geometric and not CTWindowJitter.geometric
    assert Compose([HorizontalFlip(), Gamma()]).feature_flippable
    assert not Compose([HorizontalFlip(), RandomRotation()]).feature_flippable
    assert not Compose([Gamma(), GaussianNoise()]).geometric


def test_sample_hook_keeps_concept_and_negatives():
    image, masks = _scene()
    sample = Sample(image=image, concept="polyp", masks=masks, boxes=masks_to_boxes(masks), case_id="c1")
    pipeline = default_augmentation(size=32, seed=0)
    out = pipeline(sample, np.random.default_rng(1))
    assert out.concept == "polyp" and out.case_id == "c1" and out.image.shape == (32, 32, 3)
    np.testing.assert_array_equal(out.boxes, masks_to_boxes(out.masks))
    assert "augment" in out.meta
    negative = Sample(
        image=image, concept="polyp", masks=masks[:0], boxes=np.zeros((0, 4), np.float32), case_id="n"
    )
    assert pipeline(negative, np.random.default_rng(2)).masks.shape == (0, 32, 32)


def test_default_ct_pipeline_from_raw_hu():
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 20, (24, 24)).astype(np.float32)
    masks = np.zeros((1, 24, 24), dtype=bool)
    masks[0, 8:16, 8:16] = True
    out = default_augmentation(ct=True, seed=3).apply(hu, masks)
    assert out.image.dtype == np.uint8 and out.image.shape == (24, 24, 3)
    np.testing.assert_array_equal(out.boxes, masks_to_boxes(out.masks))
