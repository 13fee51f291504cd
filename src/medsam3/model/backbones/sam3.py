"""SAM 3's own towers: the ViT + FPN neck and the CLIP text encoder, with SAM 3's processor.

Preprocessing is exactly transformers' ``Sam3ImageProcessor``: the image is stretched to the square
input (no aspect kept), scaled to [0, 1] and normalised with mean = std = 0.5. The cacheable
embedding is the FPN levels; their sine position encodings depend only on the shape and are made
anew from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import Sam3Processor
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from medsam3.model.backbones.base import Backbone


class Sam3Backbone(Backbone):
    name = "sam3"
    resize = "stretch to the square input (aspect not kept), as SAM 3"
    normalisation = "scale to [0, 1], then (x - 0.5) / 0.5 per channel"

    def __init__(self, processor: Sam3Processor):
        self.processor = processor
        size = processor.image_processor.size
        self.input_size = int(size["height"])
        self.normalisation = (
            f"scale to [0, 1], then (x - mean) / std with mean {list(processor.image_processor.image_mean)}, "
            f"std {list(processor.image_processor.image_std)}"
        )

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width  # stretched: the input covers exactly the image

    def pixel_values(self, rgbs: Sequence[np.ndarray]) -> torch.Tensor:
        # channels_last said outright: for tiny images (1 x 1, 3 x 4) the processor would guess wrongly
        processed = self.processor.image_processor(
            images=list(rgbs), return_tensors="pt", input_data_format="channels_last"
        )
        return processed["pixel_values"]

    def image_embedding(self, model, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(model.get_vision_features(pixel_values=pixels).fpn_hidden_states)

    def vision_features(self, model, embedding: tuple[torch.Tensor, ...]) -> Sam3VisionEncoderOutput:
        encode_position = model.vision_encoder.neck.position_encoding
        positions = tuple(encode_position(level.shape, level.device, level.dtype) for level in embedding)
        return Sam3VisionEncoderOutput(
            last_hidden_state=None, fpn_hidden_states=tuple(embedding), fpn_position_encoding=positions
        )

    def tokenize(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.processor.tokenizer(
            list(phrases), padding="max_length", truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def token_count(self, phrase: str) -> int:
        return len(self.processor.tokenizer(phrase)["input_ids"])

    def text_states(self, model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.text_encoder(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state

    def frozen_modules(self, model) -> dict[str, torch.nn.Module]:
        return {"vision_encoder": model.vision_encoder}

    def tower_modules(self, model) -> list[torch.nn.Module]:
        return [model.vision_encoder, model.text_encoder]

    def provenance(self, model) -> list[dict]:
        return [
            {
                "part": "vision_encoder, text_encoder, detector",
                "source": "SAM 3 architecture (transformers.Sam3Model); weights as loaded from the model spec",
            }
        ]
