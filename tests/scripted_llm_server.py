"""A chat-completions server on 127.0.0.1 that answers from a script and records what it received.

Test helper: the agent's real HTTP client talks to it exactly as it would to OpenAI, vLLM or Ollama.
Each POST to ``/v1/chat/completions`` consumes one step of the script: a string (sent as the
assistant's content), a dict (sent as its JSON), a :class:`Fail` (an HTTP error), a :class:`Slow`
answer (for timeouts), a :class:`Raw` body (any status and headers, e.g. a redirect), a :class:`Hang`
(the answer never comes) or a :class:`Trickle` (the answer one byte at a time). When the script runs
out the server answers HTTP 400, so a misbehaving client cannot loop forever. Hangs and trickles are
bounded in time and end as soon as the server is closed; it listens on 127.0.0.1, port 0, only.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Fail:
    status: int
    message: str = "scripted failure"
    retry_after: float | None = None


@dataclass
class Slow:
    seconds: float
    content: str = '{"action": "accept"}'


@dataclass
class Raw:
    body: bytes
    status: int = 200
    content_type: str = "text/html"
    headers: dict[str, str] | None = None
    content_length: bool = True  # False: no Content-Length; the body ends when the connection closes


@dataclass
class Hang:
    """Read the request, then send nothing for ``seconds`` (or until the server is closed)."""

    seconds: float = 30.0


@dataclass
class Trickle:
    """Send a normal answer one byte every ``interval`` s, status line first, for at most ``seconds``."""

    interval: float
    seconds: float = 30.0
    content: str = '{"action": "accept"}'


class Headers(dict):
    """Request headers, looked up case-insensitively (HTTP clients differ in how they spell them)."""

    def __init__(self, items):
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


@dataclass
class Received:
    path: str
    headers: Headers
    body: dict[str, Any]
    at: float = 0.0  # time.monotonic() when the request had arrived

    @property
    def messages(self) -> list[dict]:
        return self.body.get("messages", [])

    def image_pngs(self) -> list[bytes]:
        """Every image in this request, decoded from its data: URL, in message order."""
        pngs = []
        for message in self.messages:
            content = message.get("content")
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        url = part["image_url"]["url"]
                        assert url.startswith("data:image/png;base64,"), url[:40]
                        pngs.append(base64.b64decode(url.split(",", 1)[1]))
        return pngs

    def images(self) -> list[np.ndarray]:
        return [np.asarray(Image.open(io.BytesIO(p))) for p in self.image_pngs()]

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message["role"] == "user":
                content = message["content"]
                if isinstance(content, str):
                    return content
                return "".join(p.get("text", "") for p in content if p.get("type") == "text")
        return ""


class ScriptedLLMServer:
    """Use as a context manager; ``url`` is the base URL to give the client (``.../v1``)."""

    def __init__(self, script: list[Any], *, reject_schema: bool = False, model: str = "scripted-mllm"):
        self.script = list(script)
        self.reject_schema = reject_schema
        self.model = model
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()  # wakes hanging and trickling handlers at exit
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, body: dict) -> Any:
        with self._lock:
            if self.reject_schema and "response_format" in body:
                return Fail(400, "response_format json_schema is not supported by this model")
            if not self.script:
                return Fail(400, "script exhausted: the client asked more often than the test allows")
            return self.script.pop(0)

    def answer(self, step: Any) -> bytes:
        """A chat-completions answer whose assistant content is ``step`` (a dict is sent as its JSON)."""
        content = json.dumps(step) if isinstance(step, dict) else str(step)
        answer = {
            "id": f"chatcmpl-{len(self.received)}",
            "object": "chat.completion",
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        return json.dumps(answer).encode()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: bytes, content_type: str, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.received.append(Received(self.path, Headers(self.headers.items()), body, time.monotonic()))
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}', "application/json")
                    return
                step = server._next(body)
                try:
                    self._reply(step)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out or refused to read
                    self.close_connection = True

            def _reply(self, step: Any) -> None:
                if isinstance(step, Fail):
                    extra = {"Retry-After": str(step.retry_after)} if step.retry_after is not None else None
                    payload = json.dumps({"error": {"message": step.message, "code": step.status}}).encode()
                    self._send(step.status, payload, "application/json", extra)
                    return
                if isinstance(step, Raw):
                    if step.content_length:
                        self._send(step.status, step.body, step.content_type, step.headers)
                        return
                    self.close_connection = True
                    self.send_response(step.status)
                    self.send_header("Content-Type", step.content_type)
                    for key, value in (step.headers or {}).items():
                        self.send_header(key, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(step.body)
                    return
                if isinstance(step, Hang):
                    server._closed.wait(step.seconds)
                    self.close_connection = True
                    return
                if isinstance(step, Trickle):
                    self._trickle(step)
                    return
                if isinstance(step, Slow):
                    time.sleep(step.seconds)
                    step = step.content
                self._send(200, server.answer(step), "application/json")

            def _trickle(self, step: Trickle) -> None:
                payload = server.answer(step.content)
                head = f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                data = head.encode() + payload
                self.close_connection = True
                end = time.monotonic() + step.seconds
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    if server._closed.wait(step.interval) or time.monotonic() > end:
                        return

        return Handler
