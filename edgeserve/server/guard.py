"""API key and body-size limit, checked before any route runs (plain ASGI, so streaming responses and
disconnect messages pass through untouched, which ``BaseHTTPMiddleware`` would not guarantee)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeserve.server.http_errors import error_response

#: Routes open without a key: load balancers and supervisors probe it.
OPEN_PATHS = frozenset({"/health"})
JSON_TYPE = (b"content-type", b"application/json")


class GuardMiddleware:
    """``limit_paths``: the paths whose bodies are read, capped and read as JSON (None: all). A proxy
    passes other routes' bodies (uploads, blobs) through untouched and unbounded."""

    def __init__(
        self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, limit_paths: frozenset[str] | None = None
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.limit_paths = limit_paths

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
        # Read the whole (bounded) body now, so a chunked upload without Content-Length is capped
        # too, then replay it; later receive() calls go to the server (the disconnect message).
        chunks: list[bytes] = []
        size = 0
        more = True
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
        body = b"".join(chunks)
        if body and b"json" not in headers.get(b"content-type", b""):
            # Every body this API takes is JSON, and Ollama's documented `curl -d` calls send it as
            # form data; Ollama and OpenAI read it as JSON whatever the header says, so do the same.
            scope = {**scope, "headers": [*_without(scope["headers"], b"content-type"), JSON_TYPE]}
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        assert self.api_key is not None
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than the limit of {self.max_body_bytes} bytes"
        await error_response(scope["path"], 413, message, code="request_too_large")(scope, receive, send)


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
