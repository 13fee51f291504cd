"""The real chat-completions client against a scripted server on loopback."""

from __future__ import annotations

import gzip
import json
import socket
import time

import numpy as np
import pytest

from medsam3.agent.llm_client import (
    ChatClient,
    Deadline,
    LLMError,
    LLMTimeoutError,
    encode_png,
    is_loopback_url,
    png_size,
    retry_after,
    server_message,
    user_message,
)
from medsam3.errors import MedSAM3Error
from scripted_llm_server import Fail, Hang, Raw, ScriptedLLMServer, Slow, Trickle

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


# -- reliability: retries, one deadline, redirects, reply size ---------------------------------------


def test_the_openai_clients_own_retries_are_off_and_ours_cover_425():
    with ScriptedLLMServer([Fail(500), "never sent"]) as server:
        c = client(server.url, max_retries=0)
        with pytest.raises(LLMError, match=r"HTTP 500 .*gave up after 1 attempts"):
            c.chat([user_message("hi")])
    assert len(server.received) == 1 and c.waits == []  # openai's max_retries is 0: no hidden retry
    with ScriptedLLMServer([Fail(425, "too early"), Fail(408), Fail(409), "ok"]) as server:
        c = client(server.url)
        reply = c.chat([user_message("hi")])
    assert reply.content == "ok" and reply.attempts == 4 and c.waits == [0.5, 1.0, 2.0]
    assert retry_after({"retry-after-ms": "1500"}) == 1.5 and retry_after({"Retry-After": "soon"}) is None


def test_retry_after_never_sleeps_past_the_deadline():
    with ScriptedLLMServer([Fail(429, "slow down", retry_after=20), "never sent"]) as server:
        c = client(server.url, max_backoff_s=30)
        with pytest.raises(LLMTimeoutError, match=r"HTTP 429 .*waiting 20 s to retry would pass .*--timeout of 3 s"):
            c.chat([user_message("hi")], deadline=Deadline.after(3))
    assert c.waits == [] and len(server.received) == 1
    expired = Deadline(1.0, time.monotonic() - 1)
    with ScriptedLLMServer(["never sent"]) as server:
        with pytest.raises(LLMTimeoutError, match="--timeout of 1 s ran out before"):
            client(server.url).chat([user_message("hi")], deadline=expired)
    assert server.received == []


def test_a_server_that_never_answers_is_cut_off_at_the_deadline():
    with ScriptedLLMServer([Hang(30)] * 3) as server:
        c = client(server.url, timeout_s=60)  # the per-request timeout alone would wait a minute
        start = time.monotonic()
        with pytest.raises(LLMTimeoutError) as info:
            c.chat([user_message("hi")], deadline=Deadline.after(1.5))
        took = time.monotonic() - start
    assert 1.4 < took < 3.0, took
    assert str(info.value).startswith("no answer from http://127.0.0.1:")
    assert "before the agent's --timeout of 1.5 s ran out" in str(info.value) and "\n" not in str(info.value)
    assert len(server.received) == 1 and c.waits == []


@pytest.mark.parametrize("interval", [5.0, 0.1])
def test_a_trickling_server_is_cut_off_at_the_deadline(interval):
    """One byte every 5 s outlasts any read timeout; one every 0.1 s never trips one at all: the
    deadline bounds the whole request either way."""
    with ScriptedLLMServer([Trickle(interval, seconds=20)]) as server:
        c = client(server.url, timeout_s=60)
        start = time.monotonic()
        with pytest.raises(LLMTimeoutError, match="--timeout of 1.5 s ran out"):
            c.chat([user_message("hi")], deadline=Deadline.after(1.5))
        took = time.monotonic() - start
    assert 1.4 < took < 3.0, took


def test_the_request_timeout_bounds_the_whole_request_and_is_retried():
    with ScriptedLLMServer([Trickle(0.05, seconds=20), "fast"]) as server:
        c = client(server.url, timeout_s=0.8)
        start = time.monotonic()
        reply = c.chat([user_message("hi")])
        took = time.monotonic() - start
    assert reply.content == "fast" and reply.attempts == 2 and took < 2.5
    assert "within 0.8 s" in reply.retried_errors[0]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_the_key_goes_nowhere_else(status):
    with ScriptedLLMServer(["the other host answers"]) as other:
        location = other.url + "/chat/completions"
        redirect = Raw(b"", status=status, content_type="text/plain", headers={"Location": location})
        with ScriptedLLMServer([redirect]) as server:
            c = client(server.url)
            with pytest.raises(LLMError) as info:
                c.chat([user_message("hi")])
    message = str(info.value)
    assert message.startswith(f"HTTP {status} from {server.url}/chat/completions: it redirects to {location}")
    assert "not followed" in message and "--llm-base-url" in message and "\n" not in message
    assert server.received[0].headers["Authorization"] == "Bearer sk-test-123"
    assert other.received == []  # nothing reached the other host: no request, no key


def test_requests_go_to_the_base_url_origin_only():
    import openai

    c = client("http://127.0.0.1:9/v1")
    with openai.DefaultHttpxClient() as http:
        for url in ("http://127.0.0.2:9/v1/chat/completions", "https://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"):
            with pytest.raises(Exception, match="API key is only sent to http://127.0.0.1:9/v1"):
                c._on_request(http.build_request("POST", url))
        c._on_request(http.build_request("POST", "http://127.0.0.1:9/v1/chat/completions"))


def test_no_stray_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-must-not-leak")
    with ScriptedLLMServer(["ok", "ok"]) as server:
        ChatClient(server.url, "m", api_key_env="MEDSAM3_NOT_SET").chat([user_message("hi")])
        ChatClient(server.url, "m", api_key_env="MY_KEY", environ={"MY_KEY": "sk-mine"}).chat([user_message("hi")])
    keyless, keyed = server.received
    assert "Authorization" not in keyless.headers and "OpenAI-Organization" not in keyless.headers
    assert keyed.headers["Authorization"] == "Bearer sk-mine" and "OpenAI-Organization" not in keyed.headers


def _big_answer(size: int) -> bytes:
    return json.dumps({"choices": [{"message": {"content": "x" * size}}]}).encode()


@pytest.mark.parametrize("content_length", [True, False])
def test_a_30_mb_reply_is_refused(content_length):
    body = _big_answer(30 * 2**20)
    with ScriptedLLMServer([Raw(body, content_type="application/json", content_length=content_length)]) as server:
        c = client(server.url)
        start = time.monotonic()
        with pytest.raises(LLMError) as info:
            c.chat([user_message("hi")])
        took = time.monotonic() - start
    message = str(info.value)
    assert message.startswith(f"the reply from {server.url}/chat/completions is larger than 2 MiB")
    assert "refused unread" in message and len(message) < 300 and took < 5
    assert len(server.received) == 1  # not retried


def test_compressed_replies_are_capped_after_decompression():
    bomb = gzip.compress(_big_answer(30 * 2**20), compresslevel=9)
    assert len(bomb) < 200_000
    small = gzip.compress(Raw_answer := _big_answer(10))
    script = [
        Raw(bomb, content_type="application/json", headers={"Content-Encoding": "gzip"}),
        Raw(small, content_type="application/json", headers={"Content-Encoding": "gzip"}),
        Raw(Raw_answer, content_type="application/json", headers={"Content-Encoding": "br"}),
    ]
    with ScriptedLLMServer(script) as server:
        c = client(server.url)
        with pytest.raises(LLMError, match="larger than 2 MiB .*once decompressed"):
            c.chat([user_message("hi")])
        assert c.chat([user_message("hi")]).content == "x" * 10
        with pytest.raises(LLMError, match="content encoding 'br'"):
            c.chat([user_message("hi")])


def test_a_reply_just_under_the_cap_is_read():
    with ScriptedLLMServer([Raw(_big_answer(1000), content_type="application/json")]) as server:
        assert client(server.url, max_reply_bytes=1100).chat([user_message("hi")]).content == "x" * 1000


def test_a_deeply_nested_reply_body_is_a_clear_error():
    nested = b"[" * 100_000 + b"]" * 100_000
    with ScriptedLLMServer([Raw(nested, content_type="application/json"), Fail(400, "x" * 10)]) as server:
        c = client(server.url)
        with pytest.raises(LLMError, match="nested too deeply"):
            c.chat([user_message("hi")])
    assert server_message(nested.decode()).startswith("[[[")  # an error body like it is shown, short
    assert len(server_message(nested.decode())) <= 300
