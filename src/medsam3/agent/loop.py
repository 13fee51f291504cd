"""The MedSAM-3 agent: an MLLM plans prompts, looks at the numbered result and refines, for a few rounds.

Round 1 sends the instruction and the image; the LLM answers with one action (see ``actions``). A
``segment`` or ``select`` action changes the mask and counts as a round: MedSAM-3 runs, the instances
are drawn numbered (plus zoomed crops of small ones) and sent back. The loop stops on ``accept``,
``absent``, after ``max_rounds`` rounds, when a round reproduces the previous mask (no progress), or
when the LLM fails to give a usable action after a bounded number of re-asks. One deadline
(``timeout_s``) bounds the whole run: every LLM call, retry and wait; an LLM error or a run past it
raises (after writing the trace, when there is an output folder). ``run_offline`` is the no-LLM
path: the concept normaliser picks the phrase and MedSAM-3 runs once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from medsam3.agent.actions import (
    ACTION_SCHEMA,
    AbsentAction,
    AcceptAction,
    Action,
    ActionError,
    SegmentAction,
    SelectAction,
    parse_action,
)
from medsam3.agent.llm_client import ChatReply, Deadline, encode_png, png_size, user_message
from medsam3.agent.render import draw_instances, draw_mask, zoom_crops
from medsam3.agent.trace import Trace
from medsam3.data.windowing import as_rgb_uint8
from medsam3.errors import MedSAM3Error, PromptError
from medsam3.infer.types import Prompt, PromptResult
from medsam3.model.concepts import ConceptNormalizer
from medsam3.utils.files import atomic_path, write_json_atomic

STOP_REASONS = ("accepted", "absent", "max_rounds", "no_progress", "malformed", "refused", "offline")
MAX_KEPT_ANSWER_CHARS = 10_000  # of an answer, in the conversation sent back and in the trace


class AgentError(MedSAM3Error):
    """The agent ran but the LLM never gave a usable action, so there is no result to speak of."""


class Segmenter(Protocol):
    """What the agent needs from MedSAM-3 (``medsam3.infer.predictor.Sam3Predictor`` provides it)."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self, prompts: Sequence[Prompt], *, score_threshold: float | None = None
    ) -> list[PromptResult]: ...


class ChatModel(Protocol):
    """What the agent needs from the LLM (``medsam3.agent.llm_client.ChatClient`` provides it)."""

    model: str

    def prepare_image(self, image: np.ndarray) -> bytes: ...

    def chat(
        self,
        messages: list[dict],
        *,
        json_schema: dict | None = None,
        schema_name: str = ...,
        deadline: Deadline | None = None,
    ) -> ChatReply: ...


@dataclass
class Instance:
    """One numbered instance shown to the LLM, at the original image's resolution."""

    id: int
    concept: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray = field(repr=False)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "concept": self.concept,
            "score": round(self.score, 4),
            "box": [round(v, 1) for v in self.box],
            "area": int(self.mask.sum()),
        }


@dataclass
class AgentResult:
    """The final mask and how the agent got there."""

    mask: np.ndarray
    rounds: int
    stop_reason: str
    trace: Trace
    detail: str = ""
    concepts: tuple[str, ...] = ()
    instances: list[Instance] = field(default_factory=list)
    llm_calls: int = 0
    seconds: float = 0.0
    actions: int = 0  # usable actions the LLM gave (the offline path counts its one pass)

    @property
    def got_action(self) -> bool:
        """Whether the LLM gave at least one usable action (otherwise the empty mask means nothing)."""
        return self.actions > 0

    def to_json(self) -> dict:
        return {
            "stop_reason": self.stop_reason,
            "detail": self.detail,
            "rounds": self.rounds,
            "llm_calls": self.llm_calls,
            "actions": self.actions,
            "concepts": list(self.concepts),
            "instances": [i.to_json() for i in self.instances],
            "mask_area": int(self.mask.sum()),
            "image_size": [int(self.mask.shape[0]), int(self.mask.shape[1])],
            "seconds": round(self.seconds, 3),
        }


SYSTEM_PROMPT = """\
You steer MedSAM-3, a segmentation model for medical images. Given a short concept phrase (at most \
three words, e.g. "breast tumor", "polyp", "cell nucleus") it finds every instance of that concept; \
an optional box [x0, y0, x1, y1] around one example tells it where to look. You see the image, then \
the numbered instances it found (each tinted, outlined and numbered; small ones also zoomed). The \
result is the union of the numbered instances.

Answer every turn with exactly one JSON object and nothing else, with these keys:
  "action": "segment" | "select" | "accept" | "absent"
  "concepts": for segment, a list of 1 to 3 phrases of at most three words; otherwise null
  "box": for segment, optionally [x0, y0, x1, y1] in pixels of the full image as shown to you; else null
  "instance_ids": for select, the numbers of the instances to keep; otherwise null
  "reason": a short reason (required for absent)
Use segment to (re)run the model with other wording or a box, select to keep only the instances that \
match the instruction, accept when the result matches the instruction, absent when the target is not \
in the image. Example: {"action": "segment", "concepts": ["polyp"], "box": null, "instance_ids": null, \
"reason": "a polyp is visible at the top left"}"""


class _Session:
    """One run's mutable state: the conversation, the shown instances, the current mask."""

    def __init__(self, image: np.ndarray, llm: ChatModel, trace: Trace, deadline: Deadline | None = None):
        self.image = image
        self.display = as_rgb_uint8(image)
        self.llm = llm
        self.trace = trace
        self.deadline = deadline
        self.actions = 0
        self.messages: list[dict] = []
        self.instances: list[Instance] = []
        self.mask: np.ndarray | None = None
        self.concepts: tuple[str, ...] = ()
        self.llm_calls = 0
        self.input_png = llm.prepare_image(self.display)
        self.sent_size = png_size(self.input_png)  # (w, h) of the image as the LLM sees it

    def say(self, role: str, text: str, images: Sequence[tuple[str, np.ndarray | bytes]] = ()) -> None:
        """Add a message; images are shrunk by the LLM client (bytes: already encoded) and traced."""
        pngs, names = [], []
        for label, picture in images:
            png = picture if isinstance(picture, bytes) else self.llm.prepare_image(picture)
            pngs.append(png)
            names.append(self.trace.add_image(label, png))
        if role == "user":
            self.messages.append(user_message(text, pngs))
        else:
            self.messages.append({"role": role, "content": text})
        self.trace.log("message", role=role, text=text, images=names)

    def ask(self, max_reasks: int) -> tuple[Action | None, str]:
        """The next usable action, re-asking with the error up to ``max_reasks`` times."""
        for attempt in range(max_reasks + 1):
            reply = self.llm.chat(
                self.messages, json_schema=ACTION_SCHEMA, schema_name="medsam3_action", deadline=self.deadline
            )
            self.llm_calls += 1
            self.trace.log("llm_call", **reply.trace_json())
            text = reply.content
            kept = text
            if len(text) > MAX_KEPT_ANSWER_CHARS:
                kept = text[:MAX_KEPT_ANSWER_CHARS] + f" [... {len(text) - MAX_KEPT_ANSWER_CHARS} characters cut]"
            self.messages.append({"role": "assistant", "content": kept})
            self.trace.log("message", role="assistant", text=kept, images=[])
            try:
                if reply.refusal and not text.strip():
                    raise ActionError(f"refused: {reply.refusal}", refusal=True)
                action = parse_action(
                    text,
                    instance_ids=[i.id for i in self.instances],
                    image_size=self.sent_size,
                    can_accept=self.mask is not None,
                )
            except ActionError as exc:
                kind = "refused" if exc.refusal else "malformed"
                self.trace.log("invalid_answer", error=str(exc), refusal=exc.refusal, attempt=attempt + 1)
                if attempt == max_reasks:
                    return None, f"{kind}: {exc} (after {attempt + 1} answers)"
                self.say(
                    "user",
                    f"Your answer could not be used: {exc}. Answer again with exactly one JSON object "
                    "with the keys action, concepts, box, instance_ids and reason.",
                )
                continue
            self.actions += 1
            self.trace.log("action", **{**action.to_json(), "reason": action.reason})
            return action, ""
        raise AssertionError("unreachable")

    def to_original(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in the sent image's pixels, in the original image's pixels."""
        height, width = self.display.shape[:2]
        sx, sy = width / self.sent_size[0], height / self.sent_size[1]
        x0, y0, x1, y1 = box
        return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)

    def to_sent(self, box: Sequence[float]) -> list[int]:
        height, width = self.display.shape[:2]
        sx, sy = self.sent_size[0] / width, self.sent_size[1] / height
        x0, y0, x1, y1 = box
        return [round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)]


def _instances(results: list[PromptResult]) -> list[Instance]:
    found = []
    for result in results:
        for score, box, mask in zip(result.scores, result.boxes, result.masks, strict=True):
            found.append(
                Instance(len(found) + 1, result.prompt.text, float(score), tuple(float(v) for v in box), mask)
            )
    return found


def _union(instances: list[Instance], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for instance in instances:
        mask |= instance.mask
    return mask


def _feedback(session: _Session, round_no: int, max_rounds: int, results, notes: list[str]) -> None:
    """Tell the LLM what MedSAM-3 found this round and show it the numbered overlay and crops."""
    height, width = session.display.shape[:2]
    lines = [f"Round {round_no} of {max_rounds}."] + notes
    for result in results:
        lines.append(
            f'MedSAM-3 ran "{result.prompt.text}": presence {result.presence:.2f}, {len(result)} instance(s).'
        )
    if session.instances:
        lines.append("Numbered instances (box in pixels of the image as shown to you):")
        for inst in session.instances:
            share = 100.0 * inst.mask.sum() / (height * width)
            lines.append(
                f'  {inst.id}: "{inst.concept}", score {inst.score:.2f}, box {session.to_sent(inst.box)}, '
                f"{share:.2f}% of the image"
            )
    else:
        lines.append("No instance was found: the result is empty.")
    ids = [i.id for i in session.instances]
    masks = (
        np.stack([i.mask for i in session.instances])
        if session.instances
        else np.zeros((0, height, width), bool)
    )
    images = [(f"round{round_no}_overlay", draw_instances(session.display, masks, ids))]
    crops = zoom_crops(session.display, masks, ids)
    if crops:
        lines.append(
            "The overlay comes first; then zoomed crops of the small instances "
            + ", ".join(str(i) for i, _ in crops)
            + "."
        )
    images += [(f"round{round_no}_crop_{i}", crop) for i, crop in crops]
    lines.append(
        "Answer accept if the result matches the instruction, select to keep only some numbers, segment "
        "to try other wording or a box, or absent if the target is not in the image."
    )
    session.say("user", "\n".join(lines), images)


def run_agent(
    image_rgb: np.ndarray,
    instruction: str,
    segmenter: Segmenter,
    llm: ChatModel,
    *,
    max_rounds: int = 3,
    out_dir: str | Path | None = None,
    score_threshold: float | None = None,
    max_reasks: int = 2,
    normalizer: ConceptNormalizer | None = None,
    timeout_s: float | None = None,
) -> AgentResult:
    """Segment what ``instruction`` asks for, with ``llm`` planning and judging MedSAM-3's results.

    ``segmenter`` gets the original image once; the LLM gets downscaled copies. With a ``normalizer``,
    the model's vocabulary is listed to the LLM and phrases outside it are mapped onto it. Writes
    ``out_dir`` (see :func:`write_outputs`) when given. ``timeout_s`` is one deadline for the whole
    run (every LLM request is cut to the time left); an LLM error, or the deadline, raises
    :class:`~medsam3.agent.llm_client.LLMError` after writing ``out_dir``/trace.
    """
    if not instruction or not instruction.strip():
        raise PromptError("empty instruction: say what to segment, e.g. 'segment the tumor in the breast'")
    if max_rounds < 1:
        raise PromptError(f"max rounds must be at least 1, got {max_rounds}")
    if timeout_s is not None and not (0 < timeout_s < float("inf")):
        raise PromptError(f"--timeout must be a positive number of seconds, got {timeout_s}")
    deadline = Deadline.after(timeout_s) if timeout_s is not None else None
    trace = Trace()
    try:
        return _run_agent(
            image_rgb,
            instruction,
            segmenter,
            llm,
            trace,
            deadline,
            max_rounds=max_rounds,
            out_dir=out_dir,
            score_threshold=score_threshold,
            max_reasks=max_reasks,
            normalizer=normalizer,
        )
    except MedSAM3Error as exc:
        trace.log("error", error=str(exc), kind_of_error=type(exc).__name__)
        if out_dir is not None:
            trace.write(Path(out_dir) / "trace")  # what led to the error, for a look
        raise


def _run_agent(
    image_rgb: np.ndarray,
    instruction: str,
    segmenter: Segmenter,
    llm: ChatModel,
    trace: Trace,
    deadline: Deadline | None,
    *,
    max_rounds: int,
    out_dir: str | Path | None,
    score_threshold: float | None,
    max_reasks: int,
    normalizer: ConceptNormalizer | None,
) -> AgentResult:
    session = _Session(image_rgb, llm, trace, deadline)
    height, width = session.display.shape[:2]
    trace.log(
        "start",
        instruction=instruction,
        image_size=[height, width],
        sent_size=[session.sent_size[1], session.sent_size[0]],
        model=getattr(llm, "model", None),
        max_rounds=max_rounds,
        timeout_s=None if deadline is None else deadline.seconds,
    )
    t0 = time.monotonic()
    segmenter.set_image(image_rgb)
    trace.log("set_image", seconds=round(time.monotonic() - t0, 3))

    system = SYSTEM_PROMPT
    if normalizer is not None:
        system += (
            "\nConcepts MedSAM-3 was trained on: " + ", ".join(f'"{c}"' for c in normalizer.vocabulary) + "."
        )
    session.say("system", system)
    session.say(
        "user",
        f"Instruction: {instruction.strip()}\nThe image is shown at "
        f"{session.sent_size[0]}x{session.sent_size[1]} pixels. Answer with your first action.",
        [("input", session.input_png)],
    )

    rounds, stop, detail = 0, None, ""
    while stop is None:
        action, problem = session.ask(max_reasks)
        if action is None:
            stop, detail = problem.split(":", 1)[0], problem
            break
        if isinstance(action, AcceptAction):
            stop, detail = "accepted", action.reason or ""
            break
        if isinstance(action, AbsentAction):
            stop, detail = "absent", action.reason
            session.instances, session.mask = [], np.zeros((height, width), dtype=bool)
            break
        previous = session.mask
        rounds += 1
        notes: list[str] = []
        results: list[PromptResult] = []
        if isinstance(action, SegmentAction):
            concepts = list(action.concepts)
            if normalizer is not None:
                for k, concept in enumerate(concepts):
                    if concept not in normalizer:
                        best = normalizer.best(concept)
                        notes.append(f'"{concept}" is not a trained concept; ran "{best.concept}" instead.')
                        trace.log("normalize", asked=concept, used=best.concept, **best.to_json())
                        concepts[k] = best.concept
                concepts = list(dict.fromkeys(concepts))
            boxes = (session.to_original(action.box),) if action.box is not None else ()
            prompts = [Prompt(c, boxes=boxes) for c in concepts]
            t0 = time.monotonic()
            results = segmenter.predict(prompts, score_threshold=score_threshold)
            trace.log(
                "segment",
                seconds=round(time.monotonic() - t0, 3),
                results=[r.to_json() for r in results],
            )
            session.concepts = tuple(concepts)
            session.instances = _instances(results)
        elif isinstance(action, SelectAction):
            keep = set(action.instance_ids)
            session.instances = [i for i in session.instances if i.id in keep]
            notes.append(f"Kept instances {sorted(keep)}.")
            trace.log("select", kept=sorted(keep))
        session.mask = _union(session.instances, (height, width))
        if previous is not None and np.array_equal(previous, session.mask):
            stop, detail = "no_progress", f"round {rounds} gave the same mask as round {rounds - 1}"
        elif rounds >= max_rounds:
            stop, detail = "max_rounds", f"stopped after {rounds} round(s)"
        else:
            _feedback(session, rounds, max_rounds, results, notes)

    mask = session.mask if session.mask is not None else np.zeros((height, width), dtype=bool)
    result = AgentResult(
        mask=mask,
        rounds=rounds,
        stop_reason=stop,
        trace=trace,
        detail=detail,
        concepts=session.concepts,
        instances=session.instances,
        llm_calls=session.llm_calls,
        seconds=trace.elapsed(),
        actions=session.actions,
    )
    trace.log("stop", stop_reason=stop, detail=detail, rounds=rounds, mask_area=int(mask.sum()))
    if out_dir is not None:
        write_outputs(out_dir, image_rgb, result, instruction=instruction, llm=llm)
    return result


def run_offline(
    image_rgb: np.ndarray,
    instruction: str,
    segmenter: Segmenter,
    normalizer: ConceptNormalizer,
    *,
    out_dir: str | Path | None = None,
    score_threshold: float | None = None,
) -> AgentResult:
    """The ``--llm none`` path: the normaliser picks the concept from the instruction, MedSAM-3 runs once."""
    if not instruction or not instruction.strip():
        raise PromptError("empty instruction: say what to segment, e.g. 'segment the tumor in the breast'")
    trace = Trace()
    display = as_rgb_uint8(image_rgb)
    height, width = display.shape[:2]
    trace.log("start", instruction=instruction, image_size=[height, width], model=None, max_rounds=1)
    candidates = normalizer.normalize(instruction, top_k=3)
    trace.log("normalize", asked=instruction, candidates=[c.to_json() for c in candidates])
    concept = candidates[0].concept
    t0 = time.monotonic()
    segmenter.set_image(image_rgb)
    results = segmenter.predict([Prompt(concept)], score_threshold=score_threshold)
    trace.log("segment", seconds=round(time.monotonic() - t0, 3), results=[r.to_json() for r in results])
    instances = _instances(results)
    mask = _union(instances, (height, width))
    best = candidates[0]
    result = AgentResult(
        mask=mask,
        rounds=1,
        stop_reason="offline",
        trace=trace,
        detail=f'"{concept}" chosen by the normaliser ({best.via}, similarity {best.similarity:.2f})',
        concepts=(concept,),
        instances=instances,
        seconds=trace.elapsed(),
        actions=1,
    )
    trace.log("stop", stop_reason="offline", detail=result.detail, rounds=1, mask_area=int(mask.sum()))
    if out_dir is not None:
        write_outputs(out_dir, image_rgb, result, instruction=instruction, llm=None, candidates=candidates)
    return result


def require_action(result: AgentResult, out_dir: str | Path | None = None) -> AgentResult:
    """``result``, or :class:`AgentError` when the LLM never gave a usable action (nothing was segmented
    on its word: the empty mask is not an answer)."""
    if result.got_action:
        return result
    where = f"; see {Path(out_dir) / 'trace' / 'trace.json'}" if out_dir is not None else ""
    raise AgentError(f"the LLM gave no usable action, so nothing was segmented ({result.detail}){where}")


def write_outputs(
    out_dir: str | Path,
    image_rgb: np.ndarray,
    result: AgentResult,
    *,
    instruction: str,
    llm: ChatModel | None,
    candidates=None,
) -> Path:
    """Write mask.png (0/255), overlay.png, trace/ and, last, result.json: each file appears whole."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "mask.png") as tmp:
        Image.fromarray(result.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    with atomic_path(out / "overlay.png") as tmp:
        tmp.write_bytes(encode_png(draw_mask(as_rgb_uint8(image_rgb), result.mask)))
    result.trace.write(out / "trace")
    summary = {
        "instruction": instruction,
        **result.to_json(),
        "mask": "mask.png",
        "overlay": "overlay.png",
        "trace": "trace/trace.json",
        "llm": None if llm is None else {"model": llm.model, "base_url": getattr(llm, "base_url", None)},
    }
    if candidates is not None:
        summary["normalizer"] = [c.to_json() for c in candidates]
    write_json_atomic(out / "result.json", summary)
    return out
