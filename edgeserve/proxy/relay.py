"""Relaying an upstream response so that a broken answer never looks like a finished one.

A generation answer comes in one of three framings, told by its media type:

- ``text/event-stream`` (OpenAI streams): events end at a blank line, the last is ``data: [DONE]``;
- ``application/x-ndjson`` (Ollama streams): one JSON object a line, the last with ``"done": true``;
- ``application/json`` (non-streamed answers): one JSON object.

Streams are relayed event by event: only whole events go out (a partial one waits for its end), and
each is checked (a JSON object, or SSE's ``[DONE]``). If the upstream breaks off, falls silent, ends
without its end marker or sends what is not an event, the client gets an error in the API's own
shape (SSE: ``data: {"error": {...}}``; NDJSON: ``{"error": "..."}``) and the stream ends without
its end marker, so the official SDKs raise (``openai.APIError``, ``ollama.ResponseError``) rather
than return a truncated answer as if complete. A non-streamed answer is read whole and checked
before its head goes out, so a failure is still a plain 502. Any other body (an error status, a
pass-through route) is relayed raw; if it breaks off, the connection is aborted (no final chunk),
which every HTTP client reports as an error.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Sequence

from starlette.types import Send

from edgeserve.errors import UpstreamError
from edgeserve.proxy.upstream import UpstreamResponse, UsageTail
from edgeserve.server.http_errors import is_ollama_path

log = logging.getLogger("edgeserve.proxy")

#: A non-streamed answer larger than this is relayed raw, unchecked (no completion is near it).
MAX_CHECKED_BYTES = 16 << 20
_SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")


class Framing(enum.Enum):
    SSE = "sse"
    NDJSON = "ndjson"
    JSON = "json"
    RAW = "raw"


def framing_of(content_type: str) -> Framing:
    if content_type == "text/event-stream":
        return Framing.SSE
    if content_type in ("application/x-ndjson", "application/ndjson", "application/jsonl"):
        return Framing.NDJSON
    if content_type == "application/json":
        return Framing.JSON
    return Framing.RAW


class BadStream(Exception):
    """What the upstream sent is not a well-formed answer."""


class StreamCheck:
    """Splits a stream into whole events and checks each; remembers whether it was terminated."""

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self.pending = b""
        self.done = False
        #: The upstream itself sent an error event (then it needs no second one).
        self.upstream_error = False

    def feed(self, chunk: bytes) -> bytes:
        """The whole events in ``pending + chunk``, checked; the rest waits. Raises ``BadStream``."""
        data = self.pending + chunk if self.pending else chunk
        if self.framing is Framing.SSE:
            lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
            end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        else:
            end = data.rfind(b"\n") + 1
        whole, self.pending = data[:end], data[end:]
        if whole:
            if self.done:
                raise BadStream("events after the end of the stream")
            if self.framing is Framing.SSE:
                self._check_sse(whole)
            else:
                self._check_ndjson(whole)
        return whole

    def _check_sse(self, whole: bytes) -> None:
        for event in whole.replace(b"\r\n", b"\n").split(b"\n\n"):
            data = []
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif line and not line.startswith(_SSE_FIELDS):
                    raise BadStream(f"not a server-sent event line: {line[:40]!r}")
            if not data:
                continue  # a comment (keep-alive) or a blank
            payload = b"\n".join(data)
            if payload == b"[DONE]":
                self.done = True
            else:
                self._check_object(payload)

    def _check_ndjson(self, whole: bytes) -> None:
        for line in whole.split(b"\n"):
            if line.strip():
                obj = self._check_object(line)
                self.done = obj.get("done") is True

    def _check_object(self, payload: bytes) -> dict[str, object]:
        try:
            obj = json.loads(payload)
        except ValueError:
            raise BadStream(f"not JSON: {payload[:40]!r}") from None
        if not isinstance(obj, dict):
            raise BadStream(f"not a JSON object: {payload[:40]!r}")
        if "error" in obj:
            self.upstream_error = True
        return obj

    def unfinished(self) -> str | None:
        """Why the stream, now ended, is not a complete answer (None: it is)."""
        if self.upstream_error:
            return "the upstream sent an error event"
        if self.pending.strip():
            return "the stream broke off inside an event"
        if not self.done:
            marker = "data: [DONE]" if self.framing is Framing.SSE else '"done": true'
            return f"the stream ended without its end marker ({marker})"
        return None


def error_event(path: str, framing: Framing, message: str) -> bytes:
    """An in-stream error in the API's own shape, which the official SDKs raise on."""
    if framing is Framing.NDJSON or is_ollama_path(path):
        return json.dumps({"error": message}).encode() + b"\n"
    body = {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}
    return b"data: " + json.dumps({"error": body}).encode() + b"\n\n"


class Relay:
    """An upstream response sent on to the client as it arrives.

    ``checked``: a generation answer, framed and checked as the module says; otherwise raw.
    """

    def __init__(
        self,
        upstream: UpstreamResponse,
        send: Send,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        path: str = "",
        checked: bool = False,
    ) -> None:
        self.upstream, self.send, self.path = upstream, send, path
        self.headers = [*upstream.headers, *extra_headers]
        framing = framing_of(upstream.content_type) if checked and upstream.status == 200 else Framing.RAW
        self.framing = framing
        self.first_byte: float | None = None
        self.tail = UsageTail()
        #: The upstream's body ended cleanly and, where checked, well-formed.
        self.complete = False
        #: The whole response has been sent (or, for a buffered answer, it failed before its head).
        self.responded = False
        #: Why the answer is not complete, once it is known not to be.
        self.failure: str | None = None

    async def run(self) -> None:
        """Raises ``UpstreamError`` only for a buffered answer that failed before its head went out
        (the caller answers it with a 502); every other failure ends the response as the module says."""
        if self.framing is Framing.JSON:
            await self._buffered()
        elif self.framing is Framing.RAW:
            await self._raw()
        else:
            await self._stream()

    async def _start(self) -> None:
        await self.send({"type": "http.response.start", "status": self.upstream.status, "headers": self.headers})

    async def _end(self) -> None:
        # Complete from here on: the client may hang up before this send even returns.
        self.responded = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    def _arrived(self, chunk: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        self.tail.feed(chunk)

    async def _raw(self) -> None:
        await self._start()
        try:
            async for chunk in self.upstream.chunks():
                self._arrived(chunk)
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            # No final chunk: the server closes the connection, and the client sees a cut body.
            self.failure = str(exc)
            log.warning("upstream body broke off (%s); aborting the response", exc)
            self.responded = True
            return
        self.complete = True
        await self._end()

    async def _buffered(self) -> None:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.upstream.chunks():  # an UpstreamError here: nothing sent yet
            self._arrived(chunk)
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_CHECKED_BYTES:
                raise UpstreamError(f"a non-streamed answer over {MAX_CHECKED_BYTES} bytes")
        body = b"".join(parts)
        try:
            answer = json.loads(body)
        except ValueError:
            raise UpstreamError(f"the upstream's answer is not JSON: {body[:40]!r}") from None
        if not isinstance(answer, dict):
            raise UpstreamError(f"the upstream's answer is not a JSON object: {body[:40]!r}")
        await self._start()
        self.complete = True
        self.responded = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self) -> None:
        await self._start()
        check = StreamCheck(self.framing)
        try:
            async for chunk in self.upstream.chunks():
                self._arrived(chunk)
                whole = check.feed(chunk)
                if whole:
                    await self.send({"type": "http.response.body", "body": whole, "more_body": True})
            self.failure = check.unfinished()
        except UpstreamError as exc:
            self.failure = str(exc)
        except BadStream as exc:
            self.failure = f"the upstream sent a malformed stream: {exc}"
        if self.failure is None:
            self.complete = True
        else:
            log.warning("upstream stream failed: %s", self.failure)
            if not check.upstream_error:
                event = error_event(self.path, self.framing, f"the upstream failed mid-answer: {self.failure}")
                await self.send({"type": "http.response.body", "body": event, "more_body": True})
        await self._end()
