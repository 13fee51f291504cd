"""Exemplar boxes in SAM 3's input form, shared by inference and training (through the seam)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

BOX_PAD_LABEL = -10  # SAM 3's label for padding slots


def box_prompt_tensors(
    box_sets: Sequence[Sequence[Sequence[float]]],
    label_sets: Sequence[Sequence[int]],
    sizes: Sequence[tuple[int, int]],
    clip_sizes: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 4) cx, cy, w, h in [0, 1] and (B, N) labels from xyxy pixel boxes per prompt.

    ``sizes`` holds each prompt's (height, width) of the frame the model's input covers (the image
    itself for SAM 3's stretch, a padded square for lite); boxes are clipped to ``clip_sizes`` (the
    image; default ``sizes``). Prompts with fewer boxes than the most are padded with label -10,
    which SAM 3's geometry encoder masks out.
    """
    clip_sizes = sizes if clip_sizes is None else clip_sizes
    most = max(1, max((len(b) for b in box_sets), default=0))
    boxes = torch.zeros(len(box_sets), most, 4)
    labels = torch.full((len(box_sets), most), BOX_PAD_LABEL, dtype=torch.long)
    for i, (prompt_boxes, prompt_labels, (height, width), (clip_h, clip_w)) in enumerate(
        zip(box_sets, label_sets, sizes, clip_sizes)
    ):
        for j, ((x0, y0, x1, y1), label) in enumerate(zip(prompt_boxes, prompt_labels)):
            x0, x1 = min(max(float(x0), 0.0), clip_w), min(max(float(x1), 0.0), clip_w)
            y0, y1 = min(max(float(y0), 0.0), clip_h), min(max(float(y1), 0.0), clip_h)
            boxes[i, j] = torch.tensor(
                [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
            )
            labels[i, j] = int(label)
    return boxes, labels
