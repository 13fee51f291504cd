"""The agent loop end to end: the real HTTP client, a scripted chat server on loopback, a fake segmenter.

The fake segmenter is deterministic: "polyp" finds a large and a small disc, "tumor" a square, a box
keeps the instances whose centre lies inside it, anything else finds nothing.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from medsam3.agent.actions import (
    ActionError,
    SegmentAction,
    SelectAction,
    extract_json_object,
    looks_like_refusal,
    parse_action,
)
from medsam3.agent.llm_client import ChatClient, LLMError, LLMTimeoutError
from medsam3.agent.loop import AgentError, require_action, run_agent, run_offline
from medsam3.agent.render import colour, draw_instances, zoom_crops
from medsam3.errors import PromptError
from medsam3.infer.types import Prompt, PromptResult
from medsam3.model.concepts import ConceptNormalizer
from scripted_llm_server import Fail, Hang, Raw, ScriptedLLMServer, Trickle

H, W = 120, 160
YY, XX = np.mgrid[:H, :W]
BIG = (XX - 60) ** 2 + (YY - 50) ** 2 <= 25**2
SMALL = (XX - 130) ** 2 + (YY - 100) ** 2 <= 4**2
SQUARE = (XX >= 10) & (XX < 30) & (YY >= 10) & (YY < 30)
SEGMENT_POLYP = {
    "action": "segment",
    "concepts": ["polyp"],
    "box": None,
    "instance_ids": None,
    "reason": "polyps",
}
ACCEPT = {"action": "accept", "concepts": None, "box": None, "instance_ids": None, "reason": "looks right"}


def make_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    image = (rng.normal(90, 10, (H, W, 3))).clip(0, 255)
    image[BIG | SMALL] += 60
    image[SQUARE] -= 40
    return image.astype(np.uint8)


def segment(concepts, box=None) -> dict:
    return {"action": "segment", "concepts": concepts, "box": box, "instance_ids": None, "reason": None}


def select(ids) -> dict:
    return {"action": "select", "concepts": None, "box": None, "instance_ids": ids, "reason": None}


class FakeSegmenter:
    def __init__(self):
        self.images: list[np.ndarray] = []
        self.calls: list[tuple[list[Prompt], float | None]] = []

    def set_image(self, image: np.ndarray) -> None:
        self.images.append(image)

    def predict(self, prompts, *, score_threshold=None) -> list[PromptResult]:
        self.calls.append((list(prompts), score_threshold))
        table = {"polyp": [(BIG, 0.9), (SMALL, 0.7)], "tumor": [(SQUARE, 0.8)]}
        results = []
        for prompt in prompts:
            found = table.get(prompt.text, [])
            if prompt.boxes:
                x0, y0, x1, y1 = prompt.boxes[0]
                found = [(m, s) for m, s in found if x0 <= XX[m].mean() <= x1 and y0 <= YY[m].mean() <= y1]
            masks = np.stack([m for m, _ in found]) if found else np.zeros((0, H, W), bool)
            boxes = [[XX[m].min(), YY[m].min(), XX[m].max() + 1, YY[m].max() + 1] for m, _ in found]
            results.append(
                PromptResult(
                    prompt=prompt,
                    presence=0.95 if found else 0.02,
                    scores=np.array([s for _, s in found], dtype=np.float32),
                    boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                    masks=masks,
                )
            )
        return results


def llm(server: ScriptedLLMServer, **kwargs) -> ChatClient:
    kwargs.setdefault("max_image_side", 96)  # the 160x120 image is sent at 96x72
    return ChatClient(server.url, "scripted-mllm", environ={}, backoff_s=0.01, sleep=lambda s: None, **kwargs)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_accept_on_round_one_writes_mask_overlay_result_and_trace(tmp_path):
    image, seg = make_image(), FakeSegmenter()
    with ScriptedLLMServer([SEGMENT_POLYP, ACCEPT]) as server:
        result = run_agent(image, "segment the polyps", seg, llm(server), out_dir=tmp_path / "out")
    assert (result.stop_reason, result.rounds, result.llm_calls) == ("accepted", 1, 2)
    np.testing.assert_array_equal(result.mask, BIG | SMALL)
    assert result.concepts == ("polyp",) and [i.id for i in result.instances] == [1, 2]
    # MedSAM-3 got the original image once; the LLM only downscaled copies.
    assert len(seg.images) == 1 and seg.images[0] is image
    first, second = server.received
    assert first.body["messages"][0]["role"] == "system"
    assert "segment the polyps" in first.last_user_text() and "96x72" in first.last_user_text()
    assert [i.shape for i in first.images()] == [(72, 96, 3)]
    # Round 1 feedback: input + numbered overlay + a zoomed crop of the small instance (number 2).
    assert [i.shape for i in second.images()] == [(72, 96, 3), (72, 96, 3), (96, 96, 3)]
    feedback = second.last_user_text()
    assert '1: "polyp", score 0.90' in feedback and '2: "polyp", score 0.70' in feedback
    assert "zoomed crops of the small instances 2" in feedback
    assert second.body["response_format"]["json_schema"]["schema"]["required"][0] == "action"
    # Outputs.
    out = tmp_path / "out"
    np.testing.assert_array_equal(read_png(out / "mask.png"), (BIG | SMALL).astype(np.uint8) * 255)
    overlay = read_png(out / "overlay.png")
    assert overlay.shape == (H, W, 3) and not np.array_equal(overlay[BIG], image[BIG])
    np.testing.assert_array_equal(overlay[~(BIG | SMALL)], image[~(BIG | SMALL)])
    summary = json.loads((out / "result.json").read_text())
    assert summary["stop_reason"] == "accepted" and summary["instruction"] == "segment the polyps"
    assert summary["mask_area"] == int((BIG | SMALL).sum()) and summary["llm"]["model"] == "scripted-mllm"
    trace = json.loads((out / "trace" / "trace.json").read_text())
    kinds = [e["kind"] for e in trace["events"]]
    assert kinds.count("llm_call") == 2 and kinds.count("segment") == 1 and kinds[-1] == "stop"
    # Every image sent is in the trace, byte for byte, in the order sent.
    sent = second.image_pngs()
    assert trace["images"] == sorted(trace["images"]) and len(trace["images"]) == len(sent)
    assert [(out / "trace" / name).read_bytes() for name in trace["images"]] == sent
    assert "base64" not in (out / "trace" / "trace.json").read_text()


def test_revise_with_a_box_then_accept():
    seg = FakeSegmenter()
    # The box is in pixels of the 96x72 image the LLM saw: around the small disc at (78, 60) there.
    script = [segment(["tumor"]), segment(["polyp"], [72, 54, 84, 66]), ACCEPT]
    with ScriptedLLMServer(script) as server:
        result = run_agent(make_image(), "the small polyp", seg, llm(server), score_threshold=0.4)
    assert (result.stop_reason, result.rounds) == ("accepted", 2)
    np.testing.assert_array_equal(result.mask, SMALL)
    (prompt,), threshold = seg.calls[1]
    assert prompt.text == "polyp" and threshold == 0.4
    np.testing.assert_allclose(prompt.boxes[0], (120, 90, 140, 110))  # scaled to the original pixels
    assert '1: "tumor"' in server.received[1].last_user_text()


def test_select_keeps_numbered_instances():
    with ScriptedLLMServer([SEGMENT_POLYP, select([2]), ACCEPT]) as server:
        result = run_agent(make_image(), "only the small polyp", FakeSegmenter(), llm(server))
    assert (result.stop_reason, result.rounds) == ("accepted", 2)
    np.testing.assert_array_equal(result.mask, SMALL)
    assert [i.id for i in result.instances] == [2]
    assert "Kept instances [2]" in server.received[2].last_user_text()


def test_instance_ids_that_do_not_exist_are_asked_again():
    with ScriptedLLMServer([SEGMENT_POLYP, select([7]), select(["1"]), ACCEPT]) as server:
        result = run_agent(make_image(), "the big polyp", FakeSegmenter(), llm(server))
    assert result.stop_reason == "accepted" and result.llm_calls == 4 and result.rounds == 2
    np.testing.assert_array_equal(result.mask, BIG)
    assert (
        "instance ids [7] do not exist; the numbered instances are [1, 2]"
        in server.received[2].last_user_text()
    )


def test_max_rounds_stop():
    script = [SEGMENT_POLYP, segment(["tumor"]), ACCEPT]
    with ScriptedLLMServer(script) as server:
        result = run_agent(make_image(), "the lesion", FakeSegmenter(), llm(server), max_rounds=2)
    assert (result.stop_reason, result.rounds, result.llm_calls) == ("max_rounds", 2, 2)
    np.testing.assert_array_equal(result.mask, SQUARE)
    assert len(server.received) == 2 and server.script == [ACCEPT]


def test_no_progress_stop():
    with ScriptedLLMServer([SEGMENT_POLYP, SEGMENT_POLYP, ACCEPT]) as server:
        result = run_agent(make_image(), "polyps", FakeSegmenter(), llm(server))
    assert (result.stop_reason, result.rounds) == ("no_progress", 2)
    np.testing.assert_array_equal(result.mask, BIG | SMALL)
    assert len(server.received) == 2


def test_malformed_output_then_recovery():
    script = [
        "Let me look at the image first.",
        {"action": "zoom"},
        '```json\n{"action": "segment", "concepts": "polyp"}\n```',  # fenced, one concept as a string
        ACCEPT,
    ]
    with ScriptedLLMServer(script) as server:
        result = run_agent(make_image(), "polyps", FakeSegmenter(), llm(server))
    assert (result.stop_reason, result.rounds, result.llm_calls) == ("accepted", 1, 4)
    np.testing.assert_array_equal(result.mask, BIG | SMALL)
    assert (
        server.received[1].last_user_text().startswith("Your answer could not be used: no JSON object found")
    )
    assert 'unknown action "zoom"' in server.received[2].last_user_text()
    assert len(result.trace.of_kind("invalid_answer")) == 2


def test_refusals_are_bounded_and_stop_with_a_reason(tmp_path):
    refusal = "I'm sorry, but I can't help with analysing medical images."
    with ScriptedLLMServer([refusal] * 5) as server:
        result = run_agent(
            make_image(), "polyps", FakeSegmenter(), llm(server), max_reasks=2, out_dir=tmp_path
        )
    assert (result.stop_reason, result.rounds, result.llm_calls) == ("refused", 0, 3)
    assert "after 3 answers" in result.detail and not result.mask.any()
    assert len(server.received) == 3
    assert json.loads((tmp_path / "result.json").read_text())["stop_reason"] == "refused"
    assert not read_png(tmp_path / "mask.png").any()


def test_absent_and_accept_before_anything_was_segmented():
    absent = {
        "action": "absent",
        "concepts": None,
        "box": None,
        "instance_ids": None,
        "reason": "no polyp here",
    }
    with ScriptedLLMServer([ACCEPT, absent]) as server:
        result = run_agent(make_image(), "polyps", FakeSegmenter(), llm(server))
    assert (result.stop_reason, result.detail, result.rounds) == ("absent", "no polyp here", 0)
    assert result.mask.shape == (H, W) and not result.mask.any()
    assert "nothing has been segmented yet" in server.received[1].last_user_text()


def test_server_error_then_retry_inside_the_loop():
    with ScriptedLLMServer([Fail(500, "overloaded"), SEGMENT_POLYP, Fail(503), ACCEPT]) as server:
        result = run_agent(make_image(), "polyps", FakeSegmenter(), llm(server))
    assert result.stop_reason == "accepted" and result.llm_calls == 2 and len(server.received) == 4
    assert [e["attempts"] for e in result.trace.of_kind("llm_call")] == [2, 2]


def test_empty_result_is_reported_and_repeating_it_stops():
    with ScriptedLLMServer([segment(["kidney"]), segment(["kidney"])]) as server:
        result = run_agent(make_image(), "the kidney", FakeSegmenter(), llm(server))
    assert result.stop_reason == "no_progress" and not result.mask.any()
    text = server.received[1].last_user_text()
    assert 'ran "kidney": presence 0.02, 0 instance(s)' in text and "No instance was found" in text


def test_bad_arguments():
    with ScriptedLLMServer([]) as server:
        with pytest.raises(PromptError, match="empty instruction"):
            run_agent(make_image(), "  ", FakeSegmenter(), llm(server))
        with pytest.raises(PromptError, match="max rounds"):
            run_agent(make_image(), "polyp", FakeSegmenter(), llm(server), max_rounds=0)
    assert server.received == []


@pytest.fixture(scope="module")
def normalizer() -> ConceptNormalizer:
    return ConceptNormalizer(["polyp", "breast tumor", "cell nucleus"], {"polyp": ["colonic polyp"]})


def test_normaliser_maps_llm_phrases_onto_the_vocabulary(normalizer):
    seg = FakeSegmenter()
    with ScriptedLLMServer([segment(["colorectal polyps"]), ACCEPT]) as server:
        result = run_agent(make_image(), "polyps", seg, llm(server), normalizer=normalizer)
    assert result.stop_reason == "accepted" and result.concepts == ("polyp",)
    assert seg.calls[0][0][0].text == "polyp"
    assert '"polyp", "breast tumor", "cell nucleus"' in server.received[0].body["messages"][0]["content"]
    assert (
        '"colorectal polyps" is not a trained concept; ran "polyp" instead'
        in server.received[1].last_user_text()
    )


def test_offline_path_normalises_the_instruction_and_runs_once(normalizer, tmp_path):
    seg = FakeSegmenter()
    result = run_offline(
        make_image(), "Please outline the colorectal polyps", seg, normalizer, out_dir=tmp_path
    )
    assert (result.stop_reason, result.rounds, result.concepts) == ("offline", 1, ("polyp",))
    np.testing.assert_array_equal(result.mask, BIG | SMALL)
    assert len(seg.calls) == 1 and len(seg.images) == 1
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["llm"] is None and summary["normalizer"][0]["concept"] == "polyp"
    assert summary["normalizer"][0]["via"] == "embedding" and summary["normalizer"][0]["similarity"] > 0.5
    np.testing.assert_array_equal(read_png(tmp_path / "mask.png") > 0, BIG | SMALL)


def test_overlay_outlines_and_numbers_each_instance():
    grey = np.full((H, W, 3), 100, dtype=np.uint8)
    drawn = draw_instances(grey, np.stack([BIG, SQUARE, SMALL]), [1, 2, 3])
    assert tuple(drawn[50, 35]) == colour(1)  # left edge of the big disc
    assert tuple(drawn[29, 12]) == colour(2)  # bottom edge of the square
    untouched = ~(BIG | SQUARE | SMALL)
    untouched[80:100, 110:150] = False  # where the small disc's tag goes (above it)
    untouched[30:46, 10:30] = False  # the square is too small for its tag: it sits below it
    np.testing.assert_array_equal(drawn[untouched], grey[untouched])
    # The big disc carries its tag at its centre: a patch of its colour with black digits.
    centre = drawn[45:56, 55:66].reshape(-1, 3)
    assert (centre == colour(1)).all(axis=1).sum() > 20 and (centre.max(axis=1) < 60).sum() > 5
    # The small disc's tag sits above it, so the disc itself stays visible (tinted, not covered).
    tag = drawn[80:95, 120:140].reshape(-1, 3)
    assert (tag == colour(3)).all(axis=1).sum() > 20
    assert not (drawn[100, 130] == 0).all() and tuple(drawn[100, 130]) != (100, 100, 100)
    crops = zoom_crops(grey, np.stack([BIG, SMALL]), [1, 2])
    assert [i for i, _ in crops] == [2] and crops[0][1].shape == (256, 256, 3)
    assert (crops[0][1] == np.array(colour(2), np.uint8)).all(axis=2).sum() > 100


def test_action_parsing():
    assert extract_json_object('Sure:\n```json\n{"action": "accept"}\n``` done') == {"action": "accept"}
    assert (
        extract_json_object('I think {"action": "accept", "reason": "ok {fine}"} is right')["reason"]
        == "ok {fine}"
    )
    parsed = parse_action(
        '{"action": "Segment", "concepts": ["Breast  Tumor", "breast tumor", "mass"], '
        '"box": [-5, 10, 50, 900]}',
        image_size=(96, 72),
    )
    assert parsed == SegmentAction(("breast tumor", "mass"), (0.0, 10.0, 50.0, 72.0))
    assert parse_action('{"action": "select", "instance_ids": [2, "3", 2]}', instance_ids=[1, 2, 3]) == (
        SelectAction((2, 3))
    )
    errors = {
        '{"action": "segment", "concepts": ["tumor in the left breast"]}': "has 5 words",
        '{"action": "segment", "concepts": ["a", "b", "c", "d"]}': "at most 3",
        '{"action": "segment", "concepts": []}': 'needs "concepts"',
        '{"action": "segment", "concepts": ["x"], "box": [10, 10, 5, 20]}': "x1 > x0",
        '{"action": "segment", "concepts": ["x"], "box": [100, 10, 120, 20]}': "outside the 96x72",
        '{"action": "select", "instance_ids": [1.5]}': "not a whole number",
        '{"action": "select", "instance_ids": [1]}': "no numbered instances",
        '{"concepts": ["x"]}': 'no "action"',
        '{"action": "segment", "concepts": ["x"],}': "does not parse",
    }
    for text, message in errors.items():
        shown = [1, 2] if "1.5" in text else []
        with pytest.raises(ActionError, match=message):
            parse_action(text, instance_ids=shown, image_size=(96, 72))
    with pytest.raises(ActionError) as info:
        parse_action("I cannot assist with that request.")
    assert info.value.refusal and looks_like_refusal("As an AI, I won't do that")
    assert not looks_like_refusal("The polyp is at the top left.")


@pytest.mark.slow
def test_agent_command_end_to_end_with_the_tiny_model(tmp_path):
    """``medsam3 agent``'s library call: a PNG file, the real predictor (random-weight ``tiny`` SAM 3),
    the real client and the scripted server; then the same image offline (``--llm none``)."""
    from medsam3.agent.command import agent_command

    path = tmp_path / "frame.png"
    Image.fromarray(make_image()).save(path)
    script = [segment(["polyp"], [24, 18, 72, 54]), ACCEPT]
    with ScriptedLLMServer(script) as server:
        result = agent_command(
            path,
            "the polyp",
            tmp_path / "out",
            llm_base_url=server.url,
            llm_model="scripted-mllm",
            api_key_env="MEDSAM3_TEST_NO_SUCH_KEY",
            model="tiny",
            device="cpu",
            threshold=0.0,
            max_image_side=96,
        )
    assert result.stop_reason == "accepted" and result.rounds == 1
    assert len(result.instances) >= 1  # threshold 0 keeps every query of the random model
    np.testing.assert_array_equal(result.mask, np.any([i.mask for i in result.instances], axis=0))
    np.testing.assert_array_equal(read_png(tmp_path / "out" / "mask.png") > 0, result.mask)
    sent = server.received[1].images()
    assert sent[0].shape == (72, 96, 3) and len(sent) >= 2
    segment_event = result.trace.of_kind("segment")[0]
    assert segment_event["results"][0]["boxes_in"] == [
        [40.0, 30.0, 120.0, 90.0]
    ]  # scaled to the file's pixels

    offline = agent_command(
        path, "segment the polyps", tmp_path / "offline", llm="none", model="tiny", device="cpu"
    )
    assert offline.stop_reason == "offline" and offline.concepts == ("polyp",)
    assert json.loads((tmp_path / "offline" / "result.json").read_text())["normalizer"][0]["via"] == "exact"


def test_agent_command_refuses_a_missing_endpoint_or_key_before_loading(tmp_path, monkeypatch):
    from medsam3.agent.command import agent_command
    from medsam3.agent.llm_client import LLMError

    path = tmp_path / "frame.png"
    Image.fromarray(make_image()).save(path)
    with pytest.raises(PromptError, match="--llm-base-url and --llm-model"):
        agent_command(path, "polyp", tmp_path / "out", model="no-such-model")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LLMError, match="no API key"):
        agent_command(
            path,
            "polyp",
            tmp_path / "out",
            llm_base_url="https://api.openai.com/v1",
            llm_model="gpt-4o",
            model="no-such-model",
        )
    assert not (tmp_path / "out").exists()


# -- reliability: deep nesting, one deadline, huge replies, no usable action ---------------------------

NESTED_LISTS = '{"action": ' + "[" * 100_000 + "]" * 100_000 + "}"  # 200 kB
DEEP_LISTS = '{"action": ' + "[" * 5_000 + "]" * 5_000 + "}"  # short, but deeper than Python recurses
DEEP_OBJECTS = '{"a": ' * 5_000 + "1" + "}" * 5_000  # 5000 starting points, each too deep


def test_deeply_nested_answers_are_re_asked_then_recovered():
    script = [NESTED_LISTS, DEEP_LISTS, DEEP_OBJECTS, SEGMENT_POLYP, ACCEPT]
    with ScriptedLLMServer(script) as server:
        start = time.monotonic()
        result = run_agent(make_image(), "polyps", FakeSegmenter(), llm(server), max_reasks=3)
    assert time.monotonic() - start < 10
    assert (result.stop_reason, result.rounds, result.llm_calls) == ("accepted", 1, 5)
    errors = [e["error"] for e in result.trace.of_kind("invalid_answer")]
    assert errors[0] == "the answer is 200012 characters long; answer with one short JSON object and nothing else"
    assert all(e.startswith("the JSON in the answer is nested too deeply to read") for e in errors[1:]), errors
    assert server.received[2].last_user_text().startswith("Your answer could not be used: the JSON in the answer")
    # The 200 kB answer is neither sent back whole nor kept whole in the trace.
    assert all(len(m["content"]) < 11_000 for m in server.received[4].messages if m["role"] == "assistant")
    assert all(len(e["text"]) < 11_000 for e in result.trace.of_kind("message"))


def test_only_nested_answers_stop_with_a_reason_not_a_recursion_error(tmp_path):
    with ScriptedLLMServer([DEEP_LISTS] * 3) as server:
        result = run_agent(make_image(), "polyps", FakeSegmenter(), llm(server), max_reasks=2, out_dir=tmp_path)
    assert (result.stop_reason, result.rounds, result.actions) == ("malformed", 0, 0)
    assert "nested too deeply" in result.detail and "after 3 answers" in result.detail
    with pytest.raises(AgentError, match=r"the LLM gave no usable action, so nothing was segmented \(malformed: "):
        require_action(result, tmp_path)
    assert (tmp_path / "trace" / "trace.json").stat().st_size < 200_000


def test_the_deadline_covers_the_whole_run_and_the_trace_is_written(tmp_path):
    """Round 1 answers at once; round 2's request hangs: the run ends at its 2 s deadline, not later."""
    seg = FakeSegmenter()
    with ScriptedLLMServer([SEGMENT_POLYP, Hang(30)]) as server:
        start = time.monotonic()
        with pytest.raises(LLMTimeoutError, match="--timeout of 2 s ran out"):
            run_agent(make_image(), "polyps", seg, llm(server, timeout_s=60), timeout_s=2, out_dir=tmp_path)
        took = time.monotonic() - start
    assert 1.9 < took < 3.5, took
    assert len(server.received) == 2 and len(seg.calls) == 1
    trace = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert trace["events"][0]["timeout_s"] == 2 and trace["events"][-1]["kind"] == "error"
    assert not (tmp_path / "result.json").exists()


def test_a_30_mb_reply_inside_the_loop_is_refused_and_the_trace_stays_small(tmp_path):
    huge = json.dumps({"choices": [{"message": {"content": "y" * (30 * 2**20)}}]}).encode()
    with ScriptedLLMServer([SEGMENT_POLYP, Raw(huge, content_type="application/json", content_length=False)]) as s:
        with pytest.raises(LLMError, match="larger than 2 MiB"):
            run_agent(make_image(), "polyps", FakeSegmenter(), llm(s), out_dir=tmp_path)
    trace = tmp_path / "trace" / "trace.json"
    assert trace.stat().st_size < 50_000 and "larger than 2 MiB" in trace.read_text()
    assert "yyyy" not in trace.read_text()


# -- the command line: exit codes and one-line errors -----------------------------------------------


@pytest.fixture()
def cli(tmp_path, monkeypatch, capsys):
    """``medsam3 agent`` on a PNG with the fake segmenter in place of MedSAM-3: returns run(args) ->
    (exit code, stderr lines, seconds)."""
    from medsam3.cli import main

    monkeypatch.setattr(
        "medsam3.agent.command.load_predictor", lambda model, **kw: (FakeSegmenter(), ["polyp", "breast tumor"])
    )
    path = tmp_path / "frame.png"
    Image.fromarray(make_image()).save(path)

    def run(*args: str, out: str = "out"):
        capsys.readouterr()
        start = time.monotonic()
        code = main(["agent", str(path), "-i", "segment the polyps", "-o", str(tmp_path / out), *args])
        took = time.monotonic() - start
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        return code, err, took

    return run


def endpoint(server: ScriptedLLMServer) -> list[str]:
    return ["--llm-base-url", server.url, "--llm-model", "scripted-mllm", "--max-image-side", "96"]


def test_cli_agent_succeeds_and_offline_still_works(cli, tmp_path):
    with ScriptedLLMServer([SEGMENT_POLYP, ACCEPT]) as server:
        code, err, _ = cli(*endpoint(server))
    assert code == 0 and err == []
    assert json.loads((tmp_path / "out" / "result.json").read_text())["stop_reason"] == "accepted"
    code, err, _ = cli("--llm", "none", out="offline")
    assert code == 0 and err == []
    summary = json.loads((tmp_path / "offline" / "result.json").read_text())
    assert summary["stop_reason"] == "offline" and summary["concepts"] == ["polyp"]


def test_cli_no_usable_action_exits_2_with_one_line(cli, tmp_path):
    refusal = "I'm sorry, but I can't help with analysing medical images."
    with ScriptedLLMServer([refusal] * 3) as server:
        code, err, _ = cli(*endpoint(server))
    assert code == 2 and len(err) == 1, err
    assert "the LLM gave no usable action, so nothing was segmented (refused: " in err[0]
    assert str(tmp_path / "out" / "trace" / "trace.json") in err[0]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["actions"] == 0


@pytest.mark.parametrize(
    "step", [Hang(30), Trickle(5.0, seconds=30), Trickle(0.1, seconds=30)], ids=["hang", "trickle-5s", "trickle-0.1s"]
)
def test_cli_timeout_bounds_the_whole_run(cli, step):
    with ScriptedLLMServer([SEGMENT_POLYP, step]) as server:
        code, err, _ = cli(*endpoint(server), "--timeout", "2")
        stopped = time.monotonic()
    assert code == 2 and len(err) == 1, err
    assert "--timeout of 2 s ran out" in err[0]
    # From the first request (the deadline starts after the model is loaded) to the exit: about 2 s.
    assert stopped - server.received[0].at < 3.5


def test_cli_redirect_to_another_host_exits_2_and_the_key_stays_home(cli, monkeypatch):
    monkeypatch.setenv("MEDSAM3_TEST_KEY", "sk-secret-key")
    with ScriptedLLMServer(["never asked"]) as other:
        location = {"Location": other.url + "/chat/completions"}
        redirect = Raw(b"", status=302, content_type="text/plain", headers=location)
        with ScriptedLLMServer([redirect]) as server:
            code, err, _ = cli(*endpoint(server), "--api-key-env", "MEDSAM3_TEST_KEY")
    assert code == 2 and len(err) == 1, err
    assert f"HTTP 302 from {server.url}/chat/completions: it redirects to {other.url}/chat/completions" in err[0]
    assert server.received[0].headers["Authorization"] == "Bearer sk-secret-key"
    assert other.received == []


def test_cli_huge_reply_exits_2_with_one_line(cli):
    huge = json.dumps({"choices": [{"message": {"content": "z" * (30 * 2**20)}}]}).encode()
    with ScriptedLLMServer([Raw(huge, content_type="application/json")]) as server:
        code, err, took = cli(*endpoint(server))
    assert code == 2 and len(err) == 1 and "is larger than 2 MiB" in err[0] and len(err[0]) < 400
    assert took < 10


def test_cli_rejects_a_bad_timeout(cli):
    code, err, _ = cli("--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--timeout", "0")
    assert code == 2 and len(err) == 1 and "--timeout 0.0: give the agent run a positive number" in err[0]
