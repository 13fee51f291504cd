"""A chat-completions server on 127.0.0.1 that answers from a script and records what it received.

Test helper: the agent's real HTTP client talks to it exactly as it would to OpenAI, vLLM or Ollama.
Each POST to ``/v1/chat/completions`` consumes one step of the script: a string (sent as the
assistant's content), a dict (sent as its JSON), a :class:`Fail` (an HTTP error), a :class:`Slow`
answer (for timeouts) or a :class:`Raw` body. When the script runs out the server answers HTTP 400,
so a misbehaving client cannot loop forever.
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


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

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
                    server.received.append(Received(self.path, dict(self.headers), body))
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}', "application/json")
                    return
                step = server._next(body)
                if isinstance(step, Fail):
                    extra = {"Retry-After": str(step.retry_after)} if step.retry_after is not None else None
                    payload = json.dumps({"error": {"message": step.message, "code": step.status}}).encode()
                    self._send(step.status, payload, "application/json", extra)
                    return
                if isinstance(step, Raw):
                    self._send(step.status, step.body, step.content_type)
                    return
                if isinstance(step, Slow):
                    time.sleep(step.seconds)
                    step = step.content
                content = json.dumps(step) if isinstance(step, dict) else str(step)
                answer = {
                    "id": f"chatcmpl-{len(server.received)}",
                    "object": "chat.completion",
                    "model": server.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
                try:
                    self._send(200, json.dumps(answer).encode(), "application/json")
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        return Handler
