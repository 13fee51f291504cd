"""A small client for OpenAI-compatible chat-completions endpoints that take images.

One ``POST {base_url}/chat/completions`` per call, standard library only, so the agent talks to OpenAI,
Gemini's OpenAI-compatible endpoint, vLLM or Ollama alike. Answers are asked for as JSON through
``response_format`` (json_schema); a server that refuses that option is asked again without it (the
system prompt always carries the same instructions). Rate limits, server errors, timeouts and dropped
connections are retried with bounded exponential backoff; other HTTP errors become one-line
:class:`LLMError` messages that say what to fix.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsam3.errors import MedSAM3Error

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_SCHEMA_WORDS = ("response_format", "json_schema", "schema", "structured output")


class LLMError(MedSAM3Error):
    """The multimodal LLM endpoint could not be used (no key, wrong key, unreachable, bad answer)."""


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` points at this machine (a local vLLM or Ollama needs no API key)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def encode_png(image: np.ndarray, max_side: int | None = None) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3) uint8 image, shrunk so its longest side is <= ``max_side``."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) image, got {array.dtype} {array.shape}")
    pil = Image.fromarray(array)
    if max_side is not None and max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG header."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def image_part(png: bytes) -> dict:
    """A chat-completions content part carrying ``png`` as a data: URL."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def user_message(text: str, pngs: list[bytes] = ()) -> dict:
    """A user message with text and images (plain string content when there are no images)."""
    if not pngs:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}] + [image_part(p) for p in pngs]}


@dataclass
class ChatReply:
    """The assistant's answer and how it was obtained."""

    content: str
    refusal: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    usage: dict | None = None
    attempts: int = 1
    seconds: float = 0.0
    used_schema: bool = False
    retried_errors: list[str] = field(default_factory=list)

    def trace_json(self) -> dict:
        return {
            "model": self.model,
            "finish_reason": self.finish_reason,
            "refusal": self.refusal,
            "usage": self.usage,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 3),
            "used_schema": self.used_schema,
            "retried_errors": self.retried_errors,
        }


class _Retryable(Exception):
    def __init__(self, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.wait_s = wait_s


class _SchemaRejected(Exception):
    pass


class ChatClient:
    """Chat-completions over HTTP with retries; one instance per endpoint and model.

    ``max_image_side`` bounds what is sent (images are shrunk, never the one segmented). The API key is
    read from the environment variable ``api_key_env`` when the client is made; it may be absent only
    for a loopback endpoint.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_image_side: int = 1024,
        temperature: float = 0.0,
        use_json_schema: bool = True,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LLMError(
                f"--llm-base-url {base_url!r} is not an http(s) URL (e.g. https://api.openai.com/v1)"
            )
        if not model or not model.strip():
            raise LLMError("no LLM model name given (--llm-model)")
        if max_image_side < 64:
            raise LLMError(f"max image side {max_image_side} is too small to show anything (use >= 64)")
        base = base_url.rstrip("/")
        if base.endswith("/chat/completions"):
            base = base[: -len("/chat/completions")]
        self.base_url = base
        self.url = base + "/chat/completions"
        self.model = model.strip()
        self.api_key_env = api_key_env
        env = os.environ if environ is None else environ
        self.api_key = env.get(api_key_env) or None
        if self.api_key is None and not is_loopback_url(base):
            raise LLMError(
                f"no API key: set the environment variable {api_key_env} (or name another with "
                f"--api-key-env); only a local endpoint ({parts.hostname} is not) may go without one"
            )
        self.timeout_s = timeout_s
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_image_side = int(max_image_side)
        self.temperature = temperature
        self.use_json_schema = use_json_schema
        self._sleep = sleep

    # -- images --------------------------------------------------------------------------------
    def prepare_image(self, image: np.ndarray) -> bytes:
        """The PNG that will be sent for ``image``: shrunk to ``max_image_side``."""
        return encode_png(image, self.max_image_side)

    # -- requests ------------------------------------------------------------------------------
    def chat(
        self, messages: list[dict], *, json_schema: dict | None = None, schema_name: str = "answer"
    ) -> ChatReply:
        """Send ``messages``; return the first choice. Retries are bounded by ``max_retries``."""
        start = time.monotonic()
        use_schema = json_schema is not None and self.use_json_schema
        retried: list[str] = []
        attempts = 0
        while True:
            attempts += 1
            body: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
            }
            if use_schema:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": schema_name, "schema": json_schema, "strict": True},
                }
            try:
                data = self._post(body)
            except _SchemaRejected as exc:
                # The server does not do structured outputs: ask the same thing without the option
                # (the system prompt describes the JSON); remember it for the next calls.
                retried.append(str(exc))
                use_schema = False
                self.use_json_schema = False
                continue
            except _Retryable as exc:
                retried.append(str(exc))
                if len(retried) > self.max_retries:
                    raise LLMError(f"{exc} (gave up after {attempts} attempts)") from None
                wait = self.backoff_s * 2 ** (len(retried) - 1)
                if exc.wait_s is not None:
                    wait = max(wait, exc.wait_s)
                self._sleep(min(wait, self.max_backoff_s))
                continue
            reply = self._reply(data)
            reply.attempts = attempts
            reply.seconds = time.monotonic() - start
            reply.used_schema = use_schema
            reply.retried_errors = retried
            return reply

    def _post(self, body: dict) -> dict:
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            self._raise_for_status(exc, "response_format" in body)
        except TimeoutError as exc:
            raise _Retryable(f"no answer from {self.url} within {self.timeout_s:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Retryable(f"no answer from {self.url} within {self.timeout_s:g} s") from exc
            raise _Retryable(f"cannot reach {self.url}: {exc.reason}") from exc
        except (ConnectionError, http.client.HTTPException) as exc:
            raise _Retryable(f"connection to {self.url} failed: {exc!r}") from exc
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            snippet = raw[:120].decode("utf-8", "replace")
            raise LLMError(
                f"{self.url} did not answer with JSON (got {snippet!r}): is it a chat-completions endpoint?"
            ) from exc

    def _raise_for_status(self, exc: urllib.error.HTTPError, sent_schema: bool):
        status = exc.code
        try:
            text = exc.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        message = server_message(text) or exc.reason or ""
        where = f"HTTP {status} from {self.url}"
        if status in RETRYABLE_STATUS or status >= 500:
            raise _Retryable(f"{where}: {message}".rstrip(": "), retry_after(exc.headers.get("Retry-After")))
        if sent_schema and status in (400, 422) and any(w in message.lower() for w in _SCHEMA_WORDS):
            raise _SchemaRejected(f"{where}: structured output refused ({message}); retrying without it")
        if status == 401:
            raise LLMError(f"{where}: the API key in {self.api_key_env} was not accepted ({message})")
        if status == 403:
            raise LLMError(f"{where}: this key may not use model {self.model!r} ({message})")
        if status == 404:
            raise LLMError(
                f"{where}: no such endpoint or model; check --llm-base-url (the part before "
                f"/chat/completions, e.g. https://api.openai.com/v1) and --llm-model {self.model!r} "
                f"({message})"
            )
        if status == 413:
            raise LLMError(
                f"{where}: request too large; send smaller images (max image side now {self.max_image_side})"
            )
        raise LLMError(f"{where}: {message}")

    def _reply(self, data: Any) -> ChatReply:
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(
                f"{self.url} answered without choices[0].message: {json.dumps(data)[:200]}"
            ) from None
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return ChatReply(
            content=content or "",
            refusal=message.get("refusal") or None,
            finish_reason=choice.get("finish_reason"),
            model=data.get("model"),
            usage=data.get("usage"),
        )


def server_message(text: str) -> str:
    """The human part of an error body: OpenAI ``{"error": {"message"}}``, Gemini lists, or raw text."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return " ".join(text.split())[:300]
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or json.dumps(error))[:300]
        return str(error)[:300]
    return str(data)[:300]


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; dates are ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
