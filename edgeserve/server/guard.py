"""API key, body size, body media type and body read time, checked before any route runs (plain ASGI,
so streaming responses and disconnect messages pass through untouched, which ``BaseHTTPMiddleware``
would not guarantee).

``require_json``: a body must come as ``application/json`` (or ``application/*+json``), else 415.
A web page can send a cross-origin POST without a preflight only as ``text/plain``, form data or with
no type at all; refusing those keeps any page from driving generations even where the Origin check
is opened up. (``curl -d`` sends form data: add ``-H 'Content-Type: application/json'``.)

``body_timeout_s``: the whole body must arrive within this time, else 408 and the connection closes,
so a client that declares more bytes than it sends holds nothing for long.
"""

from __future__ import annotations

import hmac
import math

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeserve.server.http_errors import error_response

#: Routes open without a key: load balancers and supervisors probe it.
OPEN_PATHS = frozenset({"/health"})
JSON_TYPE = (b"content-type", b"application/json")


class GuardMiddleware:
    """``limit_paths``: the paths whose bodies are read, capped and read as JSON (None: all). A proxy
    passes other routes' bodies (uploads, blobs) through untouched and unbounded."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        limit_paths: frozenset[str] | None = None,
        require_json: bool = False,
        body_timeout_s: float = math.inf,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.limit_paths = limit_paths
        self.require_json = require_json
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(headers):
            response = error_response(
                path,
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return

        if self.limit_paths is not None and path not in self.limit_paths:
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(scope, receive, send)
            return
        has_body = (declared is not None and int(declared) > 0) or b"transfer-encoding" in headers
        if self.require_json and has_body and not is_json(headers.get(b"content-type", b"")):
            text = "send the request body as JSON, with 'Content-Type: application/json'"
            await error_response(path, 415, text, code="unsupported_media_type")(scope, receive, send)
            return
        # Read the whole (bounded) body now, so a chunked upload without Content-Length is capped
        # too, then replay it; later receive() calls go to the server (the disconnect message).
        chunks: list[bytes] = []
        size = 0
        more = True
        with anyio.move_on_after(self.body_timeout_s) as reading:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._too_large(scope, receive, send)
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
        if reading.cancelled_caught:
            text = f"the request body did not arrive within {self.body_timeout_s:g} s"
            late = error_response(path, 408, text, code="request_timeout", headers={"Connection": "close"})
            await late(scope, receive, send)
            return
        body = b"".join(chunks)
        if body and b"json" not in headers.get(b"content-type", b""):
            # Only without require_json (the proxy): Ollama's documented `curl -d` calls send JSON as
            # form data, and Ollama and OpenAI read it as JSON whatever the header says.
            scope = {**scope, "headers": [*_without(scope["headers"], b"content-type"), JSON_TYPE]}
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        assert self.api_key is not None
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than the limit of {self.max_body_bytes} bytes"
        await error_response(scope["path"], 413, message, code="request_too_large")(scope, receive, send)


def is_json(content_type: bytes) -> bool:
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _without(headers: list[tuple[bytes, bytes]], name: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k != name]


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
