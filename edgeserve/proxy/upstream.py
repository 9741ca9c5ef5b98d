"""Talking to the upstream server: one pooled aiohttp session, three timeouts, one retry, and what a
finished response said about its own length. Bytes are relayed untouched; only a bounded tail is
kept to read the usage from.

aiohttp rather than httpx: the relay handles every streamed chunk in Python, and aiohttp parses the
response (chunked framing included) in C where httpx goes through httpcore, h11 and an anyio timeout
scope per read; measured against a model-free upstream that is about a third of the CPU per request
and half a millisecond less to the first chunk. Its exceptions are mapped here, once, to
``edgeserve.errors.UpstreamError`` (502) and ``UpstreamTimeout`` (504).

Timeouts (``Timeouts``): connecting; the first byte (the response head and the first body bytes:
a stream's prefill, or a whole non-streamed answer); and the silence between two body chunks.

Pooled connections: a request that fails before any byte came back (the upstream closed a pooled
connection as the request went out, or reset it) is sent once more, on a connection of its own.
Connections idle longer than ``keepalive_s`` are not reused, and one whose response announced a
shorter ``Keep-Alive`` timeout, or its last request (``max``), is closed rather than pooled.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from yarl import URL

from edgeserve.errors import UpstreamError, UpstreamTimeout
from edgeserve.proxy.headers import UpstreamTarget, keep_alive_limits, response_headers

__all__ = ["Timeouts", "Upstream", "UpstreamError", "UpstreamResponse", "UpstreamTimeout", "UsageTail"]

log = logging.getLogger("edgeserve.proxy")

#: What aiohttp would otherwise add on the client's behalf: the upstream sees the client's own
#: headers (a gzip the client never asked for would also make the usage tail compressed bytes).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
TAIL_BYTES = 16 * 1024

# The usage fields as OpenAI (completion_tokens, finish_reason) and Ollama (eval_count, done_reason)
# write them; read from the response's last bytes, where both APIs put them.
_TOKENS = re.compile(rb'"(?:completion_tokens|eval_count)"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"(?:prompt_tokens|prompt_eval_count)"\s*:\s*(\d+)')
_FINISH = re.compile(rb'"(?:finish_reason|done_reason)"\s*:\s*"([a-z_]+)"')
# The upstream's own timings, where it reports them: Ollama's durations (nanoseconds) and
# llama.cpp server's "timings" (milliseconds).
_TIMINGS = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*([0-9.]+)')
    for name in (
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
        "prompt_n",
        "prompt_ms",
        "predicted_n",
        "predicted_ms",
    )
}


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    first_byte_s: float = 120.0
    chunk_s: float = 30.0


class Upstream:
    """The upstream server behind one connection pool. The session is made on first use, inside the
    event loop that serves the requests (the app may be built before that loop runs)."""

    def __init__(self, url: str, *, timeouts: Timeouts | None = None, keepalive_s: float = 4.0) -> None:
        self.target = UpstreamTarget.parse(url)
        self.timeouts = timeouts or Timeouts()
        self.keepalive_s = keepalive_s
        # sock_read bounds the wait for the head; the body's reads get chunk_s once it is in.
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=self.timeouts.connect_s, sock_read=self.timeouts.first_byte_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    @property
    def redacted(self) -> str:
        return self.target.redacted

    def _client(self, *, fresh: bool = False) -> aiohttp.ClientSession:
        session = self._fresh if fresh else self._session
        if session is None or session.closed:
            # force_close: every request on its own new connection, for the retry.
            connector = aiohttp.TCPConnector(force_close=fresh, keepalive_timeout=None if fresh else self.keepalive_s)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                # A proxy must not keep one client's cookies and send them with everyone's requests.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
            )
            if fresh:
                self._fresh = session
            else:
                self._session = session
        return session

    async def open(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send a request (``target``: the path and query as the client sent them, still encoded) and
        return once the response head is in. Raises ``UpstreamError``."""
        url = URL(self.target.base_url + target, encoded=True)
        try:
            return await self._send(self._client(), method, url, headers, body, retried=False)
        except _BeforeAnyByte as first:
            log.info("upstream connection failed before any byte (%s); retrying on a new one", first.cause)
        try:
            return await self._send(self._client(fresh=True), method, url, headers, body, retried=True)
        except _BeforeAnyByte as second:
            raise UpstreamError(self._describe(second.cause)) from second.cause

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        retried: bool,
    ) -> UpstreamResponse:
        try:
            response = await session.request(method, url, headers=headers, data=body or None, allow_redirects=False)
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamTimeout(f"no connection within {self.timeouts.connect_s:g} s") from exc
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"no response within {self.timeouts.first_byte_s:g} s") from exc
        except aiohttp.ClientConnectorError as exc:  # a new connection refused: retrying changes nothing
            raise UpstreamError(self._describe(exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise _BeforeAnyByte(exc) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(self._describe(exc)) from exc
        return UpstreamResponse(response, self.timeouts, self.keepalive_s, retried=retried)

    def _describe(self, exc: BaseException) -> str:
        # aiohttp's messages name the host and port, never the credentials (they are not in the URL).
        return f"{type(exc).__name__}: {exc}"

    async def probe(self) -> str | None:
        """Whether the upstream answers HTTP at all (any status): None if it does, else why not."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(self.timeouts.connect_s, 5.0), sock_read=min(self.timeouts.first_byte_s, 5.0)
        )
        try:
            async with self._client().get(self.target.base_url + "/", timeout=timeout, allow_redirects=False) as r:
                await r.content.read(64 * 1024)
        except asyncio.TimeoutError:
            return "the upstream accepts connections but does not answer"
        except (aiohttp.ClientError, OSError) as exc:
            return f"the upstream is unreachable ({self._describe(exc)})"
        return None

    async def aclose(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()


class _BeforeAnyByte(Exception):
    """The request failed before the upstream sent a byte: safe to send once more."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class UpstreamResponse:
    def __init__(
        self, response: aiohttp.ClientResponse, timeouts: Timeouts, keepalive_s: float, *, retried: bool = False
    ) -> None:
        self._response = response
        self._timeouts = timeouts
        self.status = response.status
        self.retried = retried
        self.headers = response_headers(response.raw_headers)
        self.content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        idle_s, left = keep_alive_limits(response.raw_headers)
        #: Reuse the connection only if the upstream said it keeps it long enough, for one more request.
        self.reusable = (idle_s is None or idle_s > keepalive_s) and (left is None or left > 0)
        self._first = True
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            # Takes effect from the next bytes on: the first body bytes still get first_byte_s.
            connection.protocol.read_timeout = timeouts.chunk_s
            if not self.reusable:
                connection.protocol.force_close()  # closed, not pooled, when the body ends
        elif not self.reusable:
            # aiohttp pools a connection itself the moment its body ends, which for a small body is
            # before request() returns; closing the transport makes the pool discard it.
            protocol = getattr(response, "_protocol", None)
            if protocol is not None:
                protocol.close()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, a read at a time (chunked framing already removed)."""
        content = self._response.content
        try:
            while chunk := await content.readany():
                self._first = False
                yield chunk
        except asyncio.TimeoutError as exc:
            if self._first:
                raise UpstreamTimeout(f"no first byte within {self._timeouts.first_byte_s:g} s") from exc
            raise UpstreamTimeout(f"silent for {self._timeouts.chunk_s:g} s in mid-answer") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Hand the connection back to the pool when the body was read to its end and the upstream
        keeps it; otherwise close it, which also ends the upstream's work on this request at once.
        Never awaits, so it runs as it is under a cancellation."""
        self._response.release()


@dataclass
class UsageTail:
    """The last bytes of a relayed response, enough to read how many tokens it generated."""

    tail: bytes = b""

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-TAIL_BYTES:]

    def completion_tokens(self) -> int | None:
        found = _TOKENS.findall(self.tail)
        return int(found[-1]) if found else None

    def prompt_tokens(self) -> int | None:
        found = _PROMPT_TOKENS.findall(self.tail)
        return int(found[-1]) if found else None

    def _last(self, name: str) -> float | None:
        found = _TIMINGS[name].findall(self.tail)
        return float(found[-1]) if found else None

    def rates(self) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        """(prompt tokens, prefill seconds) and (answer tokens, decode seconds), as the upstream
        measured them itself, where it says (Ollama, llama.cpp's server); None where it does not."""
        out: list[tuple[float, float] | None] = []
        for ollama, llama in (("prompt_eval", "prompt"), ("eval", "predicted")):
            n, ns = self._last(f"{ollama}_count"), self._last(f"{ollama}_duration")
            if n is not None and ns is not None:
                out.append((n, ns / 1e9))
                continue
            n, ms = self._last(f"{llama}_n"), self._last(f"{llama}_ms")
            out.append((n, ms / 1e3) if n is not None and ms is not None else None)
        return out[0], out[1]

    def finish_reason(self) -> str | None:
        found = _FINISH.findall(self.tail)
        return found[-1].decode() if found else None
