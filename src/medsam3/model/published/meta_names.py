"""Where each parameter of transformers' ``Sam3Model`` lives in Meta's ``sam3`` image model.

Facts behind the table (read, not copied): Meta's module tree (``sam3/model_builder.py``,
``vitdet.py``, ``text_encoder_ve.py``, ``encoder.py``, ``decoder.py``, ``geometry_encoders.py``,
``maskformer_segmentation.py``), the sublayer each norm follows in both implementations (Meta's DETR
decoder: ``norm2`` after self-attention, ``catext_norm`` after text cross-attention, ``norm1`` after
image cross-attention, ``norm3`` after the MLP), and the key and shape list of Meta's
``Sam3Image`` (``tests/data/meta_sam3_image_keys.json.gz``, dumped from Meta's code with random
weights) which the tests check this table against.

Three kinds of correspondence exist:

- the same tensor under another name;
- one third of a fused projection: Meta's ViT keeps ``attn.qkv`` and its ``nn.MultiheadAttention``
  layers keep ``in_proj_weight``/``in_proj_bias`` (query, key, value stacked on dim 0), where
  transformers has ``q_proj``/``k_proj``/``v_proj``;
- a reshaped tensor: the ViT position table carries a leading class-token row that the model drops
  before use (``get_abs_pos``), and CLIP's ``text_projection`` is stored (in, out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FUSED_PART = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class MetaSource:
    """A transformers parameter's origin: Meta's key, which third of it (fused q/k/v), how reshaped."""

    key: str
    part: int | None = None  # 0, 1, 2: query, key, value third of a fused projection
    reshape: str | None = None  # "drop_cls_row" or "transpose"

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Meta's tensor -> the transformers parameter's value."""
        if self.part is not None:
            if tensor.shape[0] % 3:
                raise ValueError(f"fused projection {self.key} has {tensor.shape[0]} rows, not a multiple of 3")
            tensor = tensor.chunk(3, dim=0)[self.part]
        if self.reshape == "drop_cls_row":
            tensor = tensor[:, 1:]
        elif self.reshape == "transpose":
            tensor = tensor.t()
        return tensor


_VIT = "backbone.vision_backbone.trunk."
_CLIP = "backbone.language_backbone.encoder."
_ATTN = r"(q|k|v)_proj\.(weight|bias)"

# (transformers name pattern, Meta name template, kind); kind "fused" reads group 'qkv' as the part.
_RULES: list[tuple[str, str, str]] = [
    # ViT trunk
    (r"vision_encoder\.backbone\.embeddings\.position_embeddings", _VIT + "pos_embed", "drop_cls_row"),
    (
        r"vision_encoder\.backbone\.embeddings\.patch_embeddings\.projection\.(?P<p>\w+)",
        _VIT + "patch_embed.proj.{p}",
        "",
    ),
    (r"vision_encoder\.backbone\.layer_norm\.(?P<p>\w+)", _VIT + "ln_pre.{p}", ""),
    (
        r"vision_encoder\.backbone\.layers\.(?P<i>\d+)\.layer_norm(?P<n>[12])\.(?P<p>\w+)",
        _VIT + "blocks.{i}.norm{n}.{p}",
        "",
    ),
    (
        r"vision_encoder\.backbone\.layers\.(?P<i>\d+)\.attention\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        _VIT + "blocks.{i}.attn.qkv.{p}",
        "fused",
    ),
    (
        r"vision_encoder\.backbone\.layers\.(?P<i>\d+)\.attention\.o_proj\.(?P<p>\w+)",
        _VIT + "blocks.{i}.attn.proj.{p}",
        "",
    ),
    (
        r"vision_encoder\.backbone\.layers\.(?P<i>\d+)\.mlp\.(?P<fc>fc[12])\.(?P<p>\w+)",
        _VIT + "blocks.{i}.mlp.{fc}.{p}",
        "",
    ),
    # FPN neck (scale layers are handled by _neck_scale_layer: their names depend on the level's scale)
    (
        r"vision_encoder\.neck\.fpn_layers\.(?P<i>\d+)\.proj1\.(?P<p>\w+)",
        "backbone.vision_backbone.convs.{i}.conv_1x1.{p}",
        "",
    ),
    (
        r"vision_encoder\.neck\.fpn_layers\.(?P<i>\d+)\.proj2\.(?P<p>\w+)",
        "backbone.vision_backbone.convs.{i}.conv_3x3.{p}",
        "",
    ),
    # CLIP text tower and the projection into the detector's width
    (r"text_encoder\.text_model\.embeddings\.token_embedding\.weight", _CLIP + "token_embedding.weight", ""),
    (r"text_encoder\.text_model\.embeddings\.position_embedding\.weight", _CLIP + "positional_embedding", ""),
    (r"text_encoder\.text_model\.final_layer_norm\.(?P<p>\w+)", _CLIP + "ln_final.{p}", ""),
    (r"text_encoder\.text_projection\.weight", _CLIP + "text_projection", "transpose"),
    (
        r"text_encoder\.text_model\.encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        _CLIP + "transformer.resblocks.{i}.attn.in_proj_{p}",
        "fused",
    ),
    (
        r"text_encoder\.text_model\.encoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.(?P<p>\w+)",
        _CLIP + "transformer.resblocks.{i}.attn.out_proj.{p}",
        "",
    ),
    (
        r"text_encoder\.text_model\.encoder\.layers\.(?P<i>\d+)\.layer_norm(?P<n>[12])\.(?P<p>\w+)",
        _CLIP + "transformer.resblocks.{i}.ln_{n}.{p}",
        "",
    ),
    (
        r"text_encoder\.text_model\.encoder\.layers\.(?P<i>\d+)\.mlp\.fc1\.(?P<p>\w+)",
        _CLIP + "transformer.resblocks.{i}.mlp.c_fc.{p}",
        "",
    ),
    (
        r"text_encoder\.text_model\.encoder\.layers\.(?P<i>\d+)\.mlp\.fc2\.(?P<p>\w+)",
        _CLIP + "transformer.resblocks.{i}.mlp.c_proj.{p}",
        "",
    ),
    (r"text_projection\.(?P<p>\w+)", "backbone.language_backbone.resizer.{p}", ""),
    # geometry (box prompt) encoder
    (r"geometry_encoder\.vision_layer_norm\.(?P<p>\w+)", "geometry_encoder.img_pre_norm.{p}", ""),
    (r"geometry_encoder\.prompt_layer_norm\.(?P<p>\w+)", "geometry_encoder.norm.{p}", ""),
    (r"geometry_encoder\.output_layer_norm\.(?P<p>\w+)", "geometry_encoder.encode_norm.{p}", ""),
    (
        r"geometry_encoder\.(?P<m>label_embed|cls_embed|boxes_direct_project|boxes_pool_project|boxes_pos_enc_project|final_proj)\.(?P<p>\w+)",
        "geometry_encoder.{m}.{p}",
        "",
    ),
    (
        r"geometry_encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "geometry_encoder.encode.{i}.self_attn.in_proj_{p}",
        "fused",
    ),
    (
        r"geometry_encoder\.layers\.(?P<i>\d+)\.self_attn\.o_proj\.(?P<p>\w+)",
        "geometry_encoder.encode.{i}.self_attn.out_proj.{p}",
        "",
    ),
    (
        r"geometry_encoder\.layers\.(?P<i>\d+)\.cross_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "geometry_encoder.encode.{i}.cross_attn_image.in_proj_{p}",
        "fused",
    ),
    (
        r"geometry_encoder\.layers\.(?P<i>\d+)\.cross_attn\.o_proj\.(?P<p>\w+)",
        "geometry_encoder.encode.{i}.cross_attn_image.out_proj.{p}",
        "",
    ),
    (
        r"geometry_encoder\.layers\.(?P<i>\d+)\.mlp\.fc(?P<n>[12])\.(?P<p>\w+)",
        "geometry_encoder.encode.{i}.linear{n}.{p}",
        "",
    ),
    (
        r"geometry_encoder\.layers\.(?P<i>\d+)\.layer_norm(?P<n>[123])\.(?P<p>\w+)",
        "geometry_encoder.encode.{i}.norm{n}.{p}",
        "",
    ),
    # DETR encoder
    (
        r"detr_encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "transformer.encoder.layers.{i}.self_attn.in_proj_{p}",
        "fused",
    ),
    (
        r"detr_encoder\.layers\.(?P<i>\d+)\.self_attn\.o_proj\.(?P<p>\w+)",
        "transformer.encoder.layers.{i}.self_attn.out_proj.{p}",
        "",
    ),
    (
        r"detr_encoder\.layers\.(?P<i>\d+)\.cross_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "transformer.encoder.layers.{i}.cross_attn_image.in_proj_{p}",
        "fused",
    ),
    (
        r"detr_encoder\.layers\.(?P<i>\d+)\.cross_attn\.o_proj\.(?P<p>\w+)",
        "transformer.encoder.layers.{i}.cross_attn_image.out_proj.{p}",
        "",
    ),
    (
        r"detr_encoder\.layers\.(?P<i>\d+)\.mlp\.fc(?P<n>[12])\.(?P<p>\w+)",
        "transformer.encoder.layers.{i}.linear{n}.{p}",
        "",
    ),
    (
        r"detr_encoder\.layers\.(?P<i>\d+)\.layer_norm(?P<n>[123])\.(?P<p>\w+)",
        "transformer.encoder.layers.{i}.norm{n}.{p}",
        "",
    ),
    # DETR decoder: layers
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.self_attn.in_proj_{p}",
        "fused",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.self_attn\.o_proj\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.self_attn.out_proj.{p}",
        "",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.text_cross_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.ca_text.in_proj_{p}",
        "fused",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.text_cross_attn\.o_proj\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.ca_text.out_proj.{p}",
        "",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.vision_cross_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.cross_attn.in_proj_{p}",
        "fused",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.vision_cross_attn\.o_proj\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.cross_attn.out_proj.{p}",
        "",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.self_attn_layer_norm\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.norm2.{p}",
        "",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.text_cross_attn_layer_norm\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.catext_norm.{p}",
        "",
    ),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.vision_cross_attn_layer_norm\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.norm1.{p}",
        "",
    ),
    (r"detr_decoder\.layers\.(?P<i>\d+)\.mlp_layer_norm\.(?P<p>\w+)", "transformer.decoder.layers.{i}.norm3.{p}", ""),
    (
        r"detr_decoder\.layers\.(?P<i>\d+)\.mlp\.fc(?P<n>[12])\.(?P<p>\w+)",
        "transformer.decoder.layers.{i}.linear{n}.{p}",
        "",
    ),
    # DETR decoder: queries, presence token and heads (Meta's MLPs number layers from 0)
    (r"detr_decoder\.(?P<m>query_embed|reference_points|presence_token)\.weight", "transformer.decoder.{m}.weight", ""),
    (r"detr_decoder\.output_layer_norm\.(?P<p>\w+)", "transformer.decoder.norm.{p}", ""),
    (r"detr_decoder\.presence_layer_norm\.(?P<p>\w+)", "transformer.decoder.presence_token_out_norm.{p}", ""),
    (r"detr_decoder\.box_head\.layer(?P<k>\d)\.(?P<p>\w+)", "transformer.decoder.bbox_embed.layers.{k-1}.{p}", ""),
    (
        r"detr_decoder\.presence_head\.layer(?P<k>\d)\.(?P<p>\w+)",
        "transformer.decoder.presence_token_head.layers.{k-1}.{p}",
        "",
    ),
    (
        r"detr_decoder\.ref_point_head\.layer(?P<k>\d)\.(?P<p>\w+)",
        "transformer.decoder.ref_point_head.layers.{k-1}.{p}",
        "",
    ),
    (
        r"detr_decoder\.box_rpb_embed_(?P<a>[xy])\.layer(?P<k>\d)\.(?P<p>\w+)",
        "transformer.decoder.boxRPB_embed_{a}.layers.{k-1}.{p}",
        "",
    ),
    # mask decoder (Meta's segmentation head)
    (
        r"mask_decoder\.pixel_decoder\.(?P<m>conv_layers|norms)\.(?P<i>\d+)\.(?P<p>\w+)",
        "segmentation_head.pixel_decoder.{m}.{i}.{p}",
        "",
    ),
    (
        r"mask_decoder\.mask_embedder\.layers\.(?P<i>\d+)\.(?P<p>\w+)",
        "segmentation_head.mask_predictor.mask_embed.layers.{i}.{p}",
        "",
    ),
    (r"mask_decoder\.instance_projection\.(?P<p>\w+)", "segmentation_head.instance_seg_head.{p}", ""),
    (r"mask_decoder\.semantic_projection\.(?P<p>\w+)", "segmentation_head.semantic_seg_head.{p}", ""),
    (
        r"mask_decoder\.prompt_cross_attn\.(?P<qkv>[qkv])_proj\.(?P<p>\w+)",
        "segmentation_head.cross_attend_prompt.in_proj_{p}",
        "fused",
    ),
    (r"mask_decoder\.prompt_cross_attn\.o_proj\.(?P<p>\w+)", "segmentation_head.cross_attend_prompt.out_proj.{p}", ""),
    (r"mask_decoder\.prompt_cross_attn_norm\.(?P<p>\w+)", "segmentation_head.cross_attn_norm.{p}", ""),
    # text/query dot-product scoring
    (r"dot_product_scoring\.text_mlp\.layer(?P<k>\d)\.(?P<p>\w+)", "dot_prod_scoring.prompt_mlp.layers.{k-1}.{p}", ""),
    (r"dot_product_scoring\.text_mlp_out_norm\.(?P<p>\w+)", "dot_prod_scoring.prompt_mlp.out_norm.{p}", ""),
    (r"dot_product_scoring\.text_proj\.(?P<p>\w+)", "dot_prod_scoring.prompt_proj.{p}", ""),
    (r"dot_product_scoring\.query_proj\.(?P<p>\w+)", "dot_prod_scoring.hs_proj.{p}", ""),
]
_COMPILED = [(re.compile(pattern), template, kind) for pattern, template, kind in _RULES]
_NECK_SCALE = re.compile(r"vision_encoder\.neck\.fpn_layers\.(?P<i>\d+)\.scale_layers\.(?P<j>\d+)\.(?P<p>\w+)")
# Meta's names for the transposed convolutions of a level, by its scale and the layer's index.
_SCALE_LAYER_NAMES = {(4.0, 0): "dconv_2x2_0", (4.0, 2): "dconv_2x2_1", (2.0, 0): "dconv_2x2"}


def _fill(template: str, groups: dict[str, str]) -> str:
    if "{k-1}" in template:
        template = template.replace("{k-1}", str(int(groups["k"]) - 1))
    return template.format(**{k: v for k, v in groups.items() if v is not None})


def meta_source(name: str, scale_factors: list[float]) -> MetaSource | None:
    """Meta's origin of one ``Sam3Model`` parameter, or None when Meta's image model has none."""
    neck = _NECK_SCALE.fullmatch(name)
    if neck:
        level, index = int(neck["i"]), int(neck["j"])
        scale = float(scale_factors[level]) if level < len(scale_factors) else None
        meta = _SCALE_LAYER_NAMES.get((scale, index))
        return None if meta is None else MetaSource(f"backbone.vision_backbone.convs.{level}.{meta}.{neck['p']}")
    for pattern, template, kind in _COMPILED:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        groups = match.groupdict()
        key = _fill(template, groups)
        if kind == "fused":
            return MetaSource(key, part=FUSED_PART[groups["qkv"]])
        return MetaSource(key, reshape=kind or None)
    return None


def source_plan(parameter_names: list[str], scale_factors: list[float]) -> tuple[dict[str, MetaSource], list[str]]:
    """Meta's origin of each parameter, and the parameters the table has no origin for."""
    plan: dict[str, MetaSource] = {}
    unknown: list[str] = []
    for name in parameter_names:
        source = meta_source(name, scale_factors)
        if source is None:
            unknown.append(name)
        else:
            plan[name] = source
    return plan, unknown


def consumers(plan: dict[str, MetaSource]) -> dict[str, list[tuple[str, MetaSource]]]:
    """Meta key -> the transformers parameters built from it (three for a fused projection)."""
    by_key: dict[str, list[tuple[str, MetaSource]]] = {}
    for name, source in plan.items():
        by_key.setdefault(source.key, []).append((name, source))
    return by_key
