"""The door of the server: bearer token and body size are checked before any byte is parsed.

A plain ASGI middleware, outermost, so an unauthorised or oversized upload costs the server
nothing: the 401/413 goes out before FastAPI reads the body. A body that arrives without a
``Content-Length`` (chunked) is counted as it streams and cut off at the limit.
"""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PUBLIC_API = ("/api/health",)
UPLOAD_PATHS = ("/api/sessions",)  # the only requests that carry files
SMALL_BODY = 1 << 20  # JSON requests: far more than any real one


class BodyTooLarge(HTTPException):
    def __init__(self, shown_limit: int):
        super().__init__(413, f"the request body is larger than the server's limit of {_size(shown_limit)}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


async def send_json(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """401 without the right bearer token on /api (except /api/health); 413 past ``max_body`` bytes (1 MB for JSON)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int, shown_limit: int | None = None):
        self.app = app
        self.token = None if token is None else token.encode()
        self.max_body = int(max_body)
        self.shown_limit = int(shown_limit if shown_limit is not None else max_body)

    def _authorised(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.token is not None and path.startswith("/api/") and path not in PUBLIC_API:
            if not self._authorised(scope):
                await send_json(
                    send, 401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                    {"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                return
        limit = self.max_body if path in UPLOAD_PATHS else min(self.max_body, SMALL_BODY)
        shown = self.shown_limit if path in UPLOAD_PATHS else limit
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_json(send, 400, "invalid Content-Length header")
                    return
                if declared > limit:
                    await send_json(send, 413, BodyTooLarge(shown).detail, {"Connection": "close"})
                    return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(shown)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as error:
            if not started:
                await send_json(send, 413, error.detail, {"Connection": "close"})
