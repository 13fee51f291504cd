"""Results as the API returns them: JSON bodies, mask and overlay PNGs, NIfTI and DICOM-SEG files."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.infer.segment import instance_label_map, slug
from medsam3.infer.types import PromptResult
from medsam3.serve.http_errors import ApiError


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, np.generic):
        return finite(value.item())
    return value


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 gray/RGB or uint16 gray (bool as 0/255) as PNG bytes."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * np.uint8(255)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def label_map_of(results: list[PromptResult]) -> np.ndarray:
    """All prompts as one label map: value k = prompt k (1-based); overlaps go to the higher score."""
    shape = results[0].masks.shape[1:] if results else (0, 0)
    labels = np.zeros(shape, dtype=np.uint8 if len(results) < 256 else np.uint16)
    best = np.zeros(shape, dtype=np.float32)
    for k, result in enumerate(results, start=1):
        for score, mask in zip(result.scores, result.masks):
            wins = mask & (best < score)
            labels[wins] = k
            best[wins] = score
    return labels


def prompt_entry(
    k: int, result: PromptResult, base_url: str, spacing: tuple[float, float] | None, asked: str | None
) -> dict:
    """One prompt's results for the JSON body, with the URLs of its masks."""
    entry = result.to_json(mask_file=None)
    entry.pop("mask", None)
    union = int(result.union.sum())
    pixel_mm2 = None if spacing is None else float(spacing[0]) * float(spacing[1])
    for instance in entry["instances"]:
        instance["area_mm2"] = None if pixel_mm2 is None else round(instance["area"] * pixel_mm2, 3)
    entry.update(
        index=k,
        asked=asked if asked is not None else result.prompt.text,
        count=len(result),
        area=union,
        area_mm2=None if pixel_mm2 is None else round(union * pixel_mm2, 3),
        downloads={
            "mask": f"{base_url}/masks/{k}.png",
            "instances": f"{base_url}/masks/{k}.png?instances=true",
        },
        filename=slug(result.prompt.text),
    )
    return entry


def mask_png(result: PromptResult, instances: bool) -> bytes:
    """The prompt's union mask (0/255), or its instance map (1 = best instance) as 8/16-bit PNG."""
    if not instances:
        return png_bytes(result.union)
    labels = instance_label_map(result)
    return png_bytes(labels.astype(np.uint8) if len(result) < 256 else labels)


def overlay_png(rgb: np.ndarray, results: list[PromptResult]) -> bytes:
    """Every prompt's masks over the image, with instance boxes and a legend (as ``medsam3 segment``)."""
    from medsam3.visualize import overlay

    masks = [r.union for r in results]
    labels = [f"{r.prompt.text} ({len(r)})" for r in results]
    boxes = [b for r in results for b in r.boxes.tolist()]
    owners = [i for i, r in enumerate(results) for _ in range(len(r))]
    picture = overlay(rgb, masks, labels=labels, boxes=boxes or None, box_masks=owners or None, legend=True)
    return png_bytes(picture)


def pick_prompt(results: list[PromptResult], k: int) -> PromptResult:
    if not 1 <= k <= len(results):
        raise ApiError(404, f"no prompt {k} in this result: prompts are numbered 1..{len(results)}")
    return results[k - 1]


def read_back(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
