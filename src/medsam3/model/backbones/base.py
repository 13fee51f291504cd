"""What every backbone owns: its preprocessing, its frozen towers, and where the detector starts.

SAM 3's detector (geometry encoder, DETR encoder/decoder with presence, mask decoder, scoring) reads
three things: FPN image features with their position encodings, projected text token features with
an attention mask, and boxes in [0, 1] of the model's input frame. A backbone turns pixels and
phrases into the first two and says how an image maps onto the input frame. Each step is split at
the frozen/trained boundary so that the frozen part's output can be cached (images on disk,
phrases in memory) and the trained part still runs, with gradients, every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

#: Where the instances of a text prompt can come from (the predictor's ``mask_source``, besides "auto"):
#: the dense semantic map's components, the detector's per-query masks, the backbone's pretrained
#: box decoder on the detected boxes, or a fusion (semantic components plus every confident detection
#: that no component covers, see ``infer.postprocess.fuse_results``).
TEXT_MASK_SOURCES = ("semantic", "detector", "box-decoder", "fusion")
# What a user's box does (text + box prompts): the pretrained box decoder outlines the boxed object, or
# the box is an exemplar for the detector (SAM 3) and the masks come from the concept's text source.
BOX_MODES = ("outline", "exemplar")

class Backbone(ABC):
    """Preprocessing and encoder towers of one model family (stateless apart from its tokenizer)."""

    name: str = ""
    input_size: int = 0
    resize: str = ""  # how an image becomes the square input, in words (shown by `medsam3 info`)
    normalisation: str = ""
    # Parameter groups (see model.components) that the paper policy trains besides SAM 3's detector.
    extra_trained: tuple[str, ...] = ()
    max_text_tokens: int = 32
    # Where instance masks of text prompts come from by default (see infer.predictor.MASK_SOURCES).
    default_mask_source: str = "detector"
    # How mask logits reach the image size (infer.postprocess.mask_probabilities): "probabilities" is
    # transformers' Sam3Processor, which the SAM 3 presets must equal; "logits" is what training compares.
    mask_resize: str = "probabilities"
    # Why ``--dtype auto`` must not pick bf16 towers for this backbone (None: bf16 passes the fidelity guard).
    bf16_fidelity: str | None = None

    # -- images --------------------------------------------------------------------------------
    @abstractmethod
    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        """The region of original-pixel space that the model's square input covers.

        Boxes are normalised by it, predictions are resized to it and then cropped to the image.
        """
        ...

    @abstractmethod
    def pixel_values(self, rgbs: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, S, S) float32 input for (H, W, 3) uint8 images."""
        ...

    @abstractmethod
    def image_embedding(self, model, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen image tower's output: what a feature cache stores."""
        ...

    def exportable_tower(self, model) -> torch.nn.Module | None:
        """The module with ``image_embedding(model, px) == (tower(px),)`` that may run outside PyTorch.

        None keeps the image tower in PyTorch (see :mod:`medsam3.model.runtime`).
        """
        return None

    @abstractmethod
    def vision_features(self, model, embedding: tuple[torch.Tensor, ...]) -> Sam3VisionEncoderOutput:
        """From the frozen embedding to the detector's FPN levels and position encodings."""
        ...

    # -- text ----------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), padded to ``max_text_tokens`` and truncated to it."""
        ...

    @abstractmethod
    def token_count(self, phrase: str) -> int:
        """Tokens a phrase needs before truncation (special tokens included)."""
        ...

    @abstractmethod
    def text_states(self, model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen text tower's token states (B, L, C)."""
        ...

    def text_features(self, model, states: torch.Tensor) -> torch.Tensor:
        """Token states projected into the detector's width (B, L, D)."""
        return model.text_projection(states)

    # -- facts ---------------------------------------------------------------------------------
    def preprocessing(self) -> dict:
        """The preprocessing facts an adapter records and a feature cache is bound to."""
        return {
            "backbone": self.name,
            "image_size": self.input_size,
            "resize": self.resize,
            "normalisation": self.normalisation,
        }

    @abstractmethod
    def frozen_modules(self, model) -> dict[str, torch.nn.Module]:
        """The pretrained towers whose weights define the cached embedding (for fingerprints)."""
        ...

    @abstractmethod
    def tower_modules(self, model) -> list[torch.nn.Module]:
        """Every pretrained frozen tower (image, text, ...): what runs in a reduced dtype when chosen."""
        ...

    def provenance(self, model) -> list[dict]:
        """Where each group of weights came from, for `medsam3 info`."""
        return []
