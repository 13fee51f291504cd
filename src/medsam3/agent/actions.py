"""The agent's actions: the JSON schema the LLM answers with, and tolerant, strict-where-it-matters parsing.

One answer = one action: ``segment`` (concept phrases of at most three words, optional box), ``select``
(a subset of the numbered instances), ``accept`` or ``absent``. Parsing forgives the usual wrapping
(```json fences, prose around the object, a single concept given as a string) but refuses anything the
segmenter could not use; the :class:`ActionError` message is sent back to the LLM so it can fix it.
Hostile or broken answers cost little: a very long answer, or JSON nested deeper than Python can
read, is an :class:`ActionError` too (never a RecursionError), and error messages quote values short.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass

from medsam3.agent.llm_client import short_repr
from medsam3.data.vocabulary import MAX_WORDS

MAX_CONCEPTS = 3
MAX_ANSWER_CHARS = 100_000  # an action is well under 1 kB; prose around it is allowed, a book is not
MAX_JSON_STARTS = 100  # "{" positions tried as the start of the object

ACTION_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "action": {
            "type": "string",
            "enum": ["segment", "select", "accept", "absent"],
            "description": "segment: run MedSAM-3; select: keep some numbered instances; "
            "accept: the current result is right; absent: the target is not in the image",
        },
        "concepts": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": "segment only: 1-3 short concept phrases, at most 3 words each",
        },
        "box": {
            "type": ["array", "null"],
            "items": {"type": "number"},
            "description": "segment only, optional: [x0, y0, x1, y1] in pixels of the full image as shown",
        },
        "instance_ids": {
            "type": ["array", "null"],
            "items": {"type": "integer"},
            "description": "select only: the numbers of the instances to keep",
        },
        "reason": {"type": ["string", "null"], "description": "a short reason (required for absent)"},
    },
    "required": ["action", "concepts", "box", "instance_ids", "reason"],
    "additionalProperties": False,
}

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_REFUSAL = re.compile(
    r"\b(i\s*(?:can ?not|can'?t|won'?t|am unable|'m unable|am not able|'m not able)|i'?m sorry|"
    r"as an ai|not able to (?:help|assist))\b",
    re.IGNORECASE,
)


class ActionError(ValueError):
    """An answer that is not a usable action; the message tells the LLM what to fix."""

    def __init__(self, message: str, refusal: bool = False):
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True)
class SegmentAction:
    concepts: tuple[str, ...]
    box: tuple[float, float, float, float] | None = None  # in pixels of the image as the LLM saw it
    reason: str | None = None
    kind = "segment"

    def to_json(self) -> dict:
        return {"action": "segment", "concepts": list(self.concepts), "box": self.box and list(self.box)}


@dataclass(frozen=True)
class SelectAction:
    instance_ids: tuple[int, ...]
    reason: str | None = None
    kind = "select"

    def to_json(self) -> dict:
        return {"action": "select", "instance_ids": list(self.instance_ids)}


@dataclass(frozen=True)
class AcceptAction:
    reason: str | None = None
    kind = "accept"

    def to_json(self) -> dict:
        return {"action": "accept"}


@dataclass(frozen=True)
class AbsentAction:
    reason: str
    kind = "absent"

    def to_json(self) -> dict:
        return {"action": "absent", "reason": self.reason}


Action = SegmentAction | SelectAction | AcceptAction | AbsentAction


def looks_like_refusal(text: str) -> bool:
    """Whether an answer without JSON reads as a refusal ("I'm sorry, I can't help with that")."""
    return bool(_REFUSAL.search(text))


def extract_json_object(text: str) -> dict:
    """The JSON object in an answer: bare, inside ```json fences, or the first {...} amid prose."""
    text = text.strip()
    if not text:
        raise ActionError("the answer was empty")
    if len(text) > MAX_ANSWER_CHARS:
        raise ActionError(
            f"the answer is {len(text)} characters long; answer with one short JSON object and nothing else"
        )
    candidates = [m.group(1).strip() for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    last_error = None
    tried = 0
    for candidate in candidates:
        start = candidate.find("{")
        while start >= 0 and tried < MAX_JSON_STARTS:
            tried += 1
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError as exc:
                last_error = exc
                start = candidate.find("{", start + 1)
                continue
            except RecursionError:
                raise ActionError(
                    "the JSON in the answer is nested too deeply to read; answer with one flat JSON object "
                    "with the keys action, concepts, box, instance_ids and reason"
                ) from None
            if isinstance(value, dict):
                return value
            start = candidate.find("{", start + 1)
    if last_error is None:
        raise ActionError("no JSON object found in the answer", refusal=looks_like_refusal(text))
    raise ActionError(f"the JSON in the answer does not parse ({last_error.msg} at char {last_error.pos})")


def parse_action(
    text: str,
    *,
    instance_ids: Collection[int] = (),
    image_size: tuple[int, int] | None = None,
    can_accept: bool = True,
) -> Action:
    """Turn an LLM answer into an action, or raise :class:`ActionError` saying what is wrong.

    ``instance_ids`` are the numbers currently shown (a selection must come from them),
    ``image_size`` is (width, height) of the image as the LLM saw it (a box must overlap it; it is
    clipped to it), ``can_accept`` is False before anything has been segmented.
    """
    data = extract_json_object(text)
    action = data.get("action")
    if not isinstance(action, str):
        raise ActionError('the object has no "action" (one of segment, select, accept, absent)')
    action = action.strip().lower()
    reason = data.get("reason")
    reason = (reason.strip()[:2000] or None) if isinstance(reason, str) else None
    if action == "segment":
        return SegmentAction(_concepts(data), _box(data.get("box"), image_size), reason)
    if action == "select":
        return SelectAction(_instance_ids(data.get("instance_ids"), instance_ids), reason)
    if action == "accept":
        if not can_accept:
            raise ActionError("nothing has been segmented yet: answer segment (or absent)")
        return AcceptAction(reason)
    if action == "absent":
        return AbsentAction(reason or "the target is not in the image")
    raise ActionError(f'unknown action "{action[:60]}": use one of segment, select, accept, absent')


def _concepts(data: dict) -> tuple[str, ...]:
    raw = data.get("concepts")
    if raw is None and "concept" in data:  # a common slip: one concept under the singular key
        raw = data["concept"]
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ActionError('segment needs "concepts": a list of 1 to 3 short phrases such as ["polyp"]')
    concepts: list[str] = []
    for item in raw:
        if not isinstance(item, str) or not item.strip():
            raise ActionError(f"concept {short_repr(item, 80)} is not a phrase")
        phrase = " ".join(item.split()).lower()
        words = len(phrase.split())
        if words > MAX_WORDS:
            raise ActionError(
                f'concept "{phrase[:80]}" has {words} words; MedSAM-3 takes phrases of at most '
                f'{MAX_WORDS} words (e.g. "breast tumor")'
            )
        if phrase not in concepts:
            concepts.append(phrase)
    if len(concepts) > MAX_CONCEPTS:
        raise ActionError(f"{len(concepts)} concepts given; use at most {MAX_CONCEPTS} per segment action")
    return tuple(concepts)


def _box(raw, image_size: tuple[int, int] | None) -> tuple[float, float, float, float] | None:
    if raw is None or raw == []:
        return None
    if isinstance(raw, dict):
        raw = [raw.get(k) for k in ("x0", "y0", "x1", "y1")]
    if not isinstance(raw, list) or len(raw) != 4:
        raise ActionError(f"box {short_repr(raw, 80)} must be [x0, y0, x1, y1] or null")
    try:
        x0, y0, x1, y1 = (float(v) for v in raw)
    except (TypeError, ValueError):
        raise ActionError(f"box {short_repr(raw, 80)} must hold four numbers") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ActionError(f"box {short_repr(raw, 80)} must hold finite numbers")
    if x1 <= x0 or y1 <= y0:
        raise ActionError(f"box {short_repr(raw, 80)} needs x1 > x0 and y1 > y0 (x0, y0 is the top-left corner)")
    if image_size is not None:
        width, height = image_size
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ActionError(f"box {short_repr(raw, 80)} lies outside the {width}x{height} image")
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    return (x0, y0, x1, y1)


def _instance_ids(raw, shown: Collection[int]) -> tuple[int, ...]:
    shown = sorted(set(shown))
    if not shown:
        raise ActionError("there are no numbered instances to select: answer segment or absent")
    if isinstance(raw, (int, str)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ActionError(f'select needs "instance_ids": a non-empty list drawn from {shown}')
    ids: list[int] = []
    for item in raw:
        try:
            value = int(item)
            if isinstance(item, float) and value != item:
                raise ValueError
        except (TypeError, ValueError):
            raise ActionError(f"instance id {short_repr(item, 40)} is not a whole number") from None
        if value not in ids:
            ids.append(value)
    unknown = [i for i in ids if i not in shown]
    if unknown:
        raise ActionError(f"instance ids {unknown} do not exist; the numbered instances are {shown}")
    return tuple(ids)
