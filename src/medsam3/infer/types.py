"""What a prompt is and what the predictor returns for it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from medsam3.errors import PromptError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Prompt:
    """A concept phrase, optionally with exemplar boxes (xyxy, pixels of the original image).

    ``box_labels`` holds 1 for a positive box (an example of the concept) and 0 for a negative one
    (something that looks alike but is not it). SAM 3 learns the concept from both.
    """

    text: str
    boxes: tuple[Box, ...] = ()
    box_labels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.text or not self.text.strip():
            raise PromptError("empty prompt: give a concept phrase such as 'breast tumor'")
        object.__setattr__(self, "text", " ".join(self.text.split()))
        boxes = tuple(tuple(float(v) for v in b) for b in self.boxes)
        labels = tuple(int(v) for v in self.box_labels) if self.box_labels else (1,) * len(boxes)
        if len(labels) != len(boxes):
            raise PromptError(f"prompt '{self.text}': {len(boxes)} boxes but {len(labels)} box labels")
        for box in boxes:
            if len(box) != 4:
                raise PromptError(f"prompt '{self.text}': a box needs 4 numbers X0,Y0,X1,Y1, got {box}")
            x0, y0, x1, y1 = box
            if not all(math.isfinite(v) for v in box):
                raise PromptError(f"prompt '{self.text}': box {box} needs finite numbers (no inf or nan)")
            if not (x1 > x0 and y1 > y0):
                raise PromptError(f"prompt '{self.text}': box {box} needs x1 > x0 and y1 > y0")
        for label in labels:
            if label not in (0, 1):
                raise PromptError(f"prompt '{self.text}': box labels are 1 (positive) or 0 (negative)")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "box_labels", labels)

    @property
    def word_count(self) -> int:
        return len(self.text.split())

    def check_inside(self, height: int, width: int) -> None:
        """Refuse boxes that do not overlap the image of this size at all."""
        for x0, y0, x1, y1 in self.boxes:
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise PromptError(
                    f"prompt '{self.text}': box {(x0, y0, x1, y1)} lies outside the {width}x{height} image"
                )


def as_prompts(prompts: Iterable[Prompt | str]) -> list[Prompt]:
    """Each prompt as a :class:`Prompt` (a bare phrase becomes a text prompt); no prompt at all is an error."""
    out = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in prompts]
    if not out:
        raise PromptError("no prompt given: name at least one concept")
    return out


@dataclass
class PromptResult:
    """Every instance of one concept found in one image, at the image's original resolution.

    ``scores`` are SAM 3's instance scores, sigmoid(logit) x sigmoid(presence); ``presence`` is the
    model's belief that the concept is in the image at all. Instances are sorted by score.
    """

    prompt: Prompt
    presence: float
    scores: np.ndarray  # (N,) float32
    boxes: np.ndarray  # (N, 4) float32, xyxy in pixels
    masks: np.ndarray  # (N, H, W) bool
    semantic: np.ndarray | None = field(default=None, repr=False)  # (H, W) float32 probability

    @property
    def union(self) -> np.ndarray:
        """All instances as one binary mask (H, W)."""
        if len(self.masks) == 0:
            return np.zeros(self.masks.shape[1:], dtype=bool)
        return self.masks.any(axis=0)

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self, mask_file: str | None = None) -> dict:
        """The ``result.json`` entry for this prompt."""
        return {
            "prompt": self.prompt.text,
            "boxes_in": [list(b) for b in self.prompt.boxes],
            "presence": round(float(self.presence), 6),
            "mask": mask_file,
            "instances": [
                {
                    "score": round(float(s), 6),
                    "box": [round(float(v), 2) for v in b],
                    "area": int(m.sum()),
                }
                for s, b, m in zip(self.scores, self.boxes, self.masks)
            ],
        }
