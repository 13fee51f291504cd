"""The real chat-completions client against a scripted server on loopback."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from medsam3.agent.llm_client import (
    ChatClient,
    LLMError,
    encode_png,
    is_loopback_url,
    png_size,
    server_message,
    user_message,
)
from medsam3.errors import MedSAM3Error
from scripted_llm_server import Fail, Raw, ScriptedLLMServer, Slow

SCHEMA = {"type": "object", "properties": {"action": {"type": "string"}}, "required": ["action"]}


def client(url: str, **kwargs) -> ChatClient:
    waits: list[float] = []
    kwargs.setdefault("environ", {"MY_KEY": "sk-test-123"})
    kwargs.setdefault("api_key_env", "MY_KEY")
    c = ChatClient(url, "scripted-mllm", sleep=waits.append, backoff_s=0.5, **kwargs)
    c.waits = waits  # type: ignore[attr-defined]
    return c


def test_request_format_key_and_answer():
    with ScriptedLLMServer(['{"action": "accept"}']) as server:
        c = client(server.url + "/")  # a trailing slash is fine
        reply = c.chat([user_message("hello")], json_schema=SCHEMA, schema_name="act")
    assert reply.content == '{"action": "accept"}'
    assert reply.model == "scripted-mllm" and reply.finish_reason == "stop" and reply.attempts == 1
    assert reply.used_schema and reply.usage["total_tokens"] == 15
    (req,) = server.received
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer sk-test-123"
    assert req.body["model"] == "scripted-mllm" and req.body["temperature"] == 0.0
    assert req.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "act", "schema": SCHEMA, "strict": True},
    }
    assert req.body["messages"] == [{"role": "user", "content": "hello"}]


def test_images_are_downscaled_png_data_urls():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    with ScriptedLLMServer(["ok"]) as server:
        c = client(server.url, max_image_side=128)
        png = c.prepare_image(image)
        c.chat([user_message("look", [png, c.prepare_image(image[:50, :60])])])
    assert png_size(png) == (128, 85)
    sent = server.received[0].images()
    assert [s.shape for s in sent] == [(85, 128, 3), (50, 60, 3)]  # small images are not enlarged
    # What arrives is what the client encoded, and it looks like the image (same mean colour).
    assert server.received[0].image_pngs()[0] == png
    assert abs(float(sent[0].mean()) - float(image.mean())) < 3


def test_server_error_then_retry_succeeds():
    with ScriptedLLMServer([Fail(500, "upstream overloaded"), Fail(502), '{"action": "accept"}']) as server:
        c = client(server.url)
        reply = c.chat([user_message("hi")])
    assert reply.content == '{"action": "accept"}' and reply.attempts == 3
    assert "HTTP 500" in reply.retried_errors[0] and "upstream overloaded" in reply.retried_errors[0]
    assert c.waits == [0.5, 1.0]  # exponential backoff
    assert len(server.received) == 3


def test_rate_limit_honours_retry_after_within_the_cap():
    with ScriptedLLMServer(
        [Fail(429, "slow down", retry_after=7), Fail(429, retry_after=500), "ok"]
    ) as server:
        c = client(server.url, max_backoff_s=20)
        assert c.chat([user_message("hi")]).content == "ok"
    assert c.waits == [7.0, 20.0]


def test_retries_are_bounded():
    with ScriptedLLMServer([Fail(503)] * 10) as server:
        c = client(server.url, max_retries=2)
        with pytest.raises(LLMError, match=r"HTTP 503 .*gave up after 3 attempts"):
            c.chat([user_message("hi")])
    assert len(server.received) == 3 and c.waits == [0.5, 1.0]


def test_wrong_key_is_a_clear_error_and_not_retried():
    with ScriptedLLMServer([Fail(401, "Incorrect API key provided")]) as server:
        c = client(server.url)
        with pytest.raises(LLMError, match="API key in MY_KEY was not accepted.*Incorrect API key"):
            c.chat([user_message("hi")])
    assert len(server.received) == 1
    assert isinstance(LLMError("x"), MedSAM3Error)


def test_unknown_endpoint_names_the_base_url_option():
    with ScriptedLLMServer(["never used"]) as server:
        c = client(server.url.replace("/v1", "/v2"))
        with pytest.raises(LLMError, match="HTTP 404.*--llm-base-url"):
            c.chat([user_message("hi")])


def test_schema_refused_falls_back_to_plain_json_instructions():
    with ScriptedLLMServer(['{"action": "accept"}', '{"action": "absent"}'], reject_schema=True) as server:
        c = client(server.url)
        first = c.chat([user_message("hi")], json_schema=SCHEMA)
        second = c.chat([user_message("again")], json_schema=SCHEMA)
    assert (first.content, second.content) == ('{"action": "accept"}', '{"action": "absent"}')
    assert not first.used_schema and "structured output refused" in first.retried_errors[0]
    assert ["response_format" in r.body for r in server.received] == [True, False, False]
    assert c.waits == []  # not a transient error: no backoff


def test_missing_api_key():
    with pytest.raises(LLMError, match="no API key: set the environment variable GEMINI_API_KEY"):
        ChatClient(
            "https://generativelanguage.googleapis.com/v1beta/openai/",
            "gemini-x",
            api_key_env="GEMINI_API_KEY",
            environ={},
        )
    # A local server needs none, and no Authorization header is sent.
    with ScriptedLLMServer(["ok"]) as server:
        c = ChatClient(server.url, "m", api_key_env="NOT_SET_ANYWHERE", environ={})
        assert c.chat([user_message("hi")]).content == "ok"
    assert "Authorization" not in server.received[0].headers


def test_unreachable_server_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = client(f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(LLMError, match="cannot reach .*gave up after 2 attempts"):
        c.chat([user_message("hi")])
    assert c.waits == [0.5]


def test_timeout_is_retried():
    with ScriptedLLMServer([Slow(1.0), "fast"]) as server:
        c = client(server.url, timeout_s=0.2)
        reply = c.chat([user_message("hi")])
    assert reply.content == "fast" and reply.attempts == 2
    assert "within 0.2 s" in reply.retried_errors[0]


def test_non_json_and_odd_answers():
    with ScriptedLLMServer(
        [Raw(b"<html>proxy login</html>"), Raw(b'{"data": []}', content_type="x")]
    ) as server:
        c = client(server.url)
        with pytest.raises(LLMError, match="did not answer with JSON"):
            c.chat([user_message("hi")])
        with pytest.raises(LLMError, match="without choices"):
            c.chat([user_message("hi")])
    parts = {
        "choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}]
    }
    with ScriptedLLMServer([Raw(json.dumps(parts).encode(), content_type="application/json")]) as server:
        assert client(server.url).chat([user_message("hi")]).content == "ab"


def test_bad_configuration_and_helpers():
    with pytest.raises(LLMError, match="not an http"):
        ChatClient("api.openai.com/v1", "m", environ={"OPENAI_API_KEY": "k"})
    with pytest.raises(LLMError, match="--llm-model"):
        ChatClient("http://localhost:8000/v1", " ")
    c = ChatClient("http://localhost:11434/v1/chat/completions", "llava", environ={})
    assert c.url == "http://localhost:11434/v1/chat/completions" and c.base_url == "http://localhost:11434/v1"
    assert is_loopback_url("http://127.0.0.2:1/v1") and is_loopback_url("http://[::1]:8000")
    assert not is_loopback_url("https://api.openai.com/v1") and not is_loopback_url("http://10.0.0.5/v1")
    assert server_message('[{"error": {"message": "quota"}}]') == "quota"  # Gemini's list form
    assert server_message("<b>oops</b>") == "<b>oops</b>"
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), dtype=np.float32))
