"""A client for OpenAI-compatible chat-completions endpoints that take images, on the official ``openai`` package.

One ``POST {base_url}/chat/completions`` per attempt, so the agent talks to OpenAI, Gemini's
OpenAI-compatible endpoint, vLLM or Ollama alike. Answers are asked for as JSON through
``response_format`` (json_schema); a server that refuses that option with a 400 is asked again without
it (the system prompt always carries the same instructions). What this module adds around ``openai``:

* retries: the ``openai`` client's own retry loop is switched off (``max_retries=0``: it cannot see the
  agent's deadline and does not retry 425); rate limits, server errors, timeouts and dropped
  connections are retried here, a bounded number of times, with exponential backoff that honours
  ``Retry-After`` and never sleeps past the deadline;
* one deadline: every request's timeout is ``min(timeout_s, time left)``, and it bounds the whole
  request (a server that trickles a byte at a time is cut off too), not only each read;
* the API key goes to the ``--llm-base-url`` host only: redirects are not followed, and a request to
  any other origin is refused before it is sent;
* replies are capped (``max_reply_bytes``, after decompression) before anything is parsed or traced;
* other HTTP errors become one-line :class:`LLMError` messages that say what to fix.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import reprlib
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsam3.errors import MedSAM3Error

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_REPLY_BYTES = 2 * 1024 * 1024
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_DROPPED_HEADERS = ("OpenAI-Organization", "OpenAI-Project")  # only the key from --api-key-env is sent


class LLMError(MedSAM3Error):
    """The multimodal LLM endpoint could not be used (no key, wrong key, unreachable, bad answer)."""


class LLMTimeoutError(LLMError):
    """The agent run's overall deadline (``--timeout``) ran out while waiting for the LLM."""


@dataclass(frozen=True)
class Deadline:
    """A point in ``time.monotonic()`` time by which the whole agent run must be over."""

    seconds: float
    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        seconds = float(seconds)
        if not (seconds > 0 and seconds < float("inf")):
            raise ValueError(f"a deadline needs a positive, finite number of seconds, got {seconds}")
        return cls(seconds, time.monotonic() + seconds)

    def left(self) -> float:
        return self.at - time.monotonic()

    def describe(self) -> str:
        return f"the agent's --timeout of {self.seconds:g} s"


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
    def __init__(self, message: str, wait_s: float | None = None, timed_out: bool = False):
        super().__init__(message)
        self.wait_s = wait_s
        self.timed_out = timed_out


class _SchemaRejected(Exception):
    pass


class _Refused(Exception):
    """Raised inside the HTTP client's hooks (wrong origin, reply too large): becomes an LLMError."""


class _Aborted(Exception):
    """The request was abandoned (its deadline passed); the worker thread stops reading."""


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its whitespace (newlines included) collapsed, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_repr(value: Any, limit: int = 200) -> str:
    """A one-line repr of ``value`` that stays short however large or deeply nested it is."""
    shower = reprlib.Repr()
    shower.maxlevel, shower.maxstring, shower.maxother = 3, 80, 80
    return one_line(shower.repr(value), limit)


class ChatClient:
    """Chat-completions over HTTP with retries; one instance per endpoint and model.

    ``max_image_side`` bounds what is sent (images are shrunk, never the one segmented). The API key is
    read from the environment variable ``api_key_env`` when the client is made; it may be absent only
    for a loopback endpoint. ``timeout_s`` bounds each request as a whole; :meth:`chat` takes the run's
    :class:`Deadline` as well.
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
        max_reply_bytes: int = MAX_REPLY_BYTES,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LLMError(
                f"--llm-base-url {base_url!r} is not an http(s) URL (e.g. https://api.openai.com/v1)"
            )
        try:
            _ = parts.port
        except ValueError:
            raise LLMError(f"--llm-base-url {base_url!r} has a bad port number") from None
        if not model or not model.strip():
            raise LLMError("no LLM model name given (--llm-model)")
        if max_image_side < 64:
            raise LLMError(f"max image side {max_image_side} is too small to show anything (use >= 64)")
        if not timeout_s > 0:
            raise LLMError(f"the request timeout must be a positive number of seconds, got {timeout_s}")
        base = base_url.rstrip("/")
        if base.endswith("/chat/completions"):
            base = base[: -len("/chat/completions")]
        self.base_url = base
        self.url = base + "/chat/completions"
        self.host = parts.hostname.lower()
        self.model = model.strip()
        self.api_key_env = api_key_env
        env = os.environ if environ is None else environ
        self.api_key = env.get(api_key_env) or None
        if self.api_key is None and not is_loopback_url(base):
            raise LLMError(
                f"no API key: set the environment variable {api_key_env} (or name another with "
                f"--api-key-env); only a local endpoint ({parts.hostname} is not) may go without one"
            )
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_image_side = int(max_image_side)
        self.temperature = temperature
        self.use_json_schema = use_json_schema
        self.max_reply_bytes = int(max_reply_bytes)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._connection: tuple[Any, threading.Event] | None = None
        self._connect()  # a bad setting fails now, before a model is loaded

    # -- images --------------------------------------------------------------------------------
    def prepare_image(self, image: np.ndarray) -> bytes:
        """The PNG that will be sent for ``image``: shrunk to ``max_image_side``."""
        return encode_png(image, self.max_image_side)

    # -- requests ------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict],
        *,
        json_schema: dict | None = None,
        schema_name: str = "answer",
        deadline: Deadline | None = None,
    ) -> ChatReply:
        """Send ``messages``; return the first choice.

        At most ``max_retries`` transient failures are retried; nothing waits or runs past ``deadline``
        (then :class:`LLMTimeoutError`).
        """
        start = time.monotonic()
        use_schema = json_schema is not None and self.use_json_schema
        retried: list[str] = []
        failures = attempts = 0
        fell_back = False
        while True:
            timeout, by_deadline = self.timeout_s, False
            if deadline is not None:
                left = deadline.left()
                if left <= 0:
                    done = f" (after {attempts} attempt(s): {retried[-1]})" if retried else ""
                    raise LLMTimeoutError(f"{deadline.describe()} ran out before {self.url} answered{done}")
                if left < timeout:
                    timeout, by_deadline = left, True
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
                raw = self._post(body, timeout)
            except _SchemaRejected as exc:
                # The server does not do structured outputs: ask the same thing without the option
                # (the system prompt describes the JSON); remember it for the next calls.
                retried.append(str(exc))
                use_schema, fell_back = False, True
                continue
            except _Retryable as exc:
                if exc.timed_out and by_deadline:
                    raise LLMTimeoutError(
                        f"no answer from {self.url} before {deadline.describe()} ran out "
                        f"(attempt {attempts})"
                    ) from None
                retried.append(str(exc))
                failures += 1
                if failures > self.max_retries:
                    raise LLMError(f"{exc} (gave up after {attempts} attempts)") from None
                wait = self.backoff_s * 2 ** (failures - 1)
                if exc.wait_s is not None:
                    wait = max(wait, exc.wait_s)
                wait = min(wait, self.max_backoff_s)
                if deadline is not None and wait >= deadline.left():
                    raise LLMTimeoutError(
                        f"{exc}; waiting {wait:g} s to retry would pass {deadline.describe()} "
                        f"(gave up after {attempts} attempts)"
                    ) from None
                self._sleep(wait)
                continue
            reply = self._reply(self._decode(raw))
            if fell_back:  # the plain request worked: skip the option from now on
                self.use_json_schema = False
            reply.attempts = attempts
            reply.seconds = time.monotonic() - start
            reply.used_schema = use_schema
            reply.retried_errors = retried
            return reply

    # -- the openai client ---------------------------------------------------------------------
    def _connect(self) -> tuple[Any, threading.Event]:
        """The ``openai`` client (made anew after an abandoned request) and its abort flag."""
        with self._lock:
            if self._connection is not None:
                return self._connection
            import openai

            aborted = threading.Event()
            http_client = openai.DefaultHttpxClient(
                follow_redirects=False,  # a redirect would carry the key elsewhere: report it instead
                event_hooks={
                    "request": [self._on_request],
                    "response": [lambda response: self._on_response(response, aborted)],
                },
            )
            client = openai.OpenAI(
                # A keyless local endpoint still needs a placeholder here (the openai package insists);
                # _on_request removes the Authorization header it makes from it.
                api_key=self.api_key or "no-key",
                base_url=self.base_url,
                max_retries=0,  # retries are done by chat(), which knows the deadline
                timeout=self.timeout_s,
                http_client=http_client,
            )
            self._connection = (client, aborted)
            return self._connection

    def _abandon(self, connection: tuple[Any, threading.Event]) -> None:
        """Give up on the request in flight: flag it, close its sockets, make a new client next time."""
        client, aborted = connection
        aborted.set()
        with self._lock:
            if self._connection is connection:
                self._connection = None
        try:
            client.close()
        except Exception:  # closing is best effort; the worker thread ends on its own read timeout
            pass

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection[0].close()

    def _on_request(self, request) -> None:
        url = request.url
        base = type(url)(self.base_url)  # parsed by the same URL class: hosts and ports compare alike
        if (url.scheme, url.raw_host, url.port) != (base.scheme, base.raw_host, base.port):
            raise _Refused(
                f"refusing to send a request to {url.scheme}://{url.host}: the API key is only sent to "
                f"{self.base_url}"
            )
        if not self.api_key:
            request.headers.pop("Authorization", None)
        for name in _DROPPED_HEADERS:
            request.headers.pop(name, None)
        request.headers["Accept-Encoding"] = "gzip, deflate"

    def _on_response(self, response, aborted: threading.Event) -> None:
        """Cap the body (and its decompressed size) before anything reads it."""
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_reply_bytes:
            raise _Refused(self._too_large(f"{int(length)} bytes"))
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        wbits = None
        if encoding and encoding != "identity":
            if encoding not in _DECODERS:
                raise _Refused(
                    f"{self.url} answered with content encoding {one_line(encoding, 40)!r}, which this "
                    "client does not accept (gzip, deflate or none)"
                )
            wbits = _DECODERS[encoding]
            del response.headers["Content-Encoding"]  # decoded here, within the cap
        response.stream = _capped_stream(response.stream, self.max_reply_bytes, wbits, aborted, self._too_large)

    def _too_large(self, size: str) -> str:
        cap = self.max_reply_bytes
        shown = f"{cap / 2**20:g} MiB" if cap >= 2**20 else f"{cap} bytes"
        return (
            f"the reply from {self.url} is larger than {shown} ({size}), the cap on an LLM answer: "
            "refused unread; is --llm-base-url a chat-completions endpoint?"
        )

    def _post(self, body: dict, timeout: float) -> bytes:
        """The raw reply body, within ``timeout`` seconds for the whole request (else _Retryable)."""
        connection = self._connect()
        outcome: dict[str, Any] = {}
        finished = threading.Event()

        def work() -> None:
            try:
                outcome["body"] = self._send(connection[0], body, timeout)
            except BaseException as exc:  # handed to the waiting thread
                outcome["error"] = exc
            finally:
                finished.set()

        worker = threading.Thread(target=work, name="medsam3-llm-request", daemon=True)
        worker.start()
        if not finished.wait(timeout):
            self._abandon(connection)
            raise _Retryable(f"no answer from {self.url} within {timeout:g} s", timed_out=True)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["body"]

    def _send(self, client, body: dict, timeout: float) -> bytes:
        import openai

        try:
            raw = client.chat.completions.with_raw_response.create(**body, timeout=timeout)
            return raw.http_response.content
        except _Refused as exc:
            raise LLMError(str(exc)) from None
        except openai.APIStatusError as exc:
            self._raise_for_status(exc.response, "response_format" in body)
        except openai.APITimeoutError:
            raise _Retryable(f"no answer from {self.url} within {timeout:g} s", timed_out=True) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            if isinstance(cause, _Refused):
                raise LLMError(str(cause)) from None
            if isinstance(cause, _Aborted):
                raise cause from None
            reason = one_line(str(cause) or type(cause).__name__) if cause is not None else one_line(str(exc))
            raise _Retryable(f"cannot reach {self.url}: {reason}") from None
        raise AssertionError("unreachable")

    def _raise_for_status(self, response, sent_schema: bool):
        status = response.status_code
        try:
            text = response.text
        except Exception:
            text = ""
        message = server_message(text) or one_line(getattr(response, "reason_phrase", "") or "")
        where = f"HTTP {status} from {self.url}"
        if 300 <= status < 400:
            location = one_line(response.headers.get("Location", "") or "(no Location)", 200)
            raise LLMError(
                f"{where}: it redirects to {location}; redirects are not followed, so that the API key "
                f"goes only to {self.host} (give the final URL as --llm-base-url)"
            )
        if status in RETRYABLE_STATUS or status >= 500:
            raise _Retryable(f"{where}: {message}".rstrip(": "), retry_after(response.headers))
        if sent_schema and status in (400, 422):
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
        raise LLMError(f"{where}: {message}".rstrip(": "))

    # -- answers -------------------------------------------------------------------------------
    def _decode(self, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except RecursionError:
            raise LLMError(
                f"{self.url} answered with JSON nested too deeply to read: is it a chat-completions endpoint?"
            ) from None
        except (UnicodeDecodeError, ValueError):
            snippet = one_line(raw[:120].decode("utf-8", "replace"), 120)
            raise LLMError(
                f"{self.url} did not answer with JSON (got {snippet!r}): is it a chat-completions endpoint?"
            ) from None

    def _reply(self, data: Any) -> ChatReply:
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            shown = short_repr(data)
            raise LLMError(f"{self.url} answered without choices[0].message: {one_line(shown, 200)}")
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        usage = data.get("usage")
        if isinstance(usage, dict):
            usage = {
                str(k)[:60]: v for k, v in usage.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        else:
            usage = None
        return ChatReply(
            content=content if isinstance(content, str) else "",
            refusal=_short(message.get("refusal"), 2000),
            finish_reason=_short(choice.get("finish_reason"), 60),
            model=_short(data.get("model"), 200),
            usage=usage,
        )


def _short(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _capped_stream(inner, cap: int, wbits: int | None, aborted: threading.Event, too_large: Callable[[str], str]):
    """``inner`` (an httpx byte stream) that stops past ``cap`` bytes, decoded, or once ``aborted``."""
    base = next((c for c in type(inner).__mro__ if c.__name__ == "SyncByteStream"), object)

    class CappedStream(base):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Iterator[bytes]:
            decoder = zlib.decompressobj(wbits) if wbits is not None else None
            received = produced = 0
            for chunk in inner:
                if aborted.is_set():
                    raise _Aborted()
                received += len(chunk)
                if received > cap:
                    raise _Refused(too_large(f"more than {cap} bytes"))
                if decoder is not None:
                    try:
                        chunk = decoder.decompress(chunk, cap + 1 - produced)
                    except zlib.error as exc:
                        raise _Refused(f"the reply could not be decompressed ({exc})") from None
                    if decoder.unconsumed_tail:
                        raise _Refused(too_large(f"more than {cap} bytes once decompressed"))
                produced += len(chunk)
                if produced > cap:
                    raise _Refused(too_large(f"more than {cap} bytes once decompressed"))
                if chunk:
                    yield chunk

        def close(self) -> None:
            if hasattr(inner, "close"):
                inner.close()

    return CappedStream()


def server_message(text: str) -> str:
    """The human part of an error body, on one line: OpenAI ``{"error": {"message"}}``, Gemini lists, or raw text."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return one_line(text)
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
            if isinstance(message, str):
                return one_line(message)
            return one_line(short_repr(error))
        if isinstance(error, str):
            return one_line(error)
    return one_line(short_repr(data))


def retry_after(headers: Mapping[str, str] | str | None) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds; dates are ignored) or ``retry-after-ms`` headers."""
    if headers is None or isinstance(headers, str):
        headers = {"Retry-After": headers} if headers is not None else {}
    for name, scale in (("retry-after-ms", 1000.0), ("Retry-After", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except (TypeError, ValueError):
            continue
        if seconds == seconds and seconds != float("inf"):
            return max(0.0, seconds)
    return None
