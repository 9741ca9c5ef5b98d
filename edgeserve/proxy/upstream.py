"""Talking to the upstream server: one pooled aiohttp session, which headers cross, and what a
finished response said about its own length. Bytes are relayed untouched; only a bounded tail is
kept to read the usage from.

aiohttp rather than httpx: the relay handles every streamed chunk in Python, and aiohttp parses the
response (chunked framing included) in C where httpx goes through httpcore, h11 and an anyio timeout
scope per read; measured against a model-free upstream that is about a third of the CPU per request
and half a millisecond less to the first chunk. Its exceptions are mapped here, once, to
``UpstreamError``:

    UpstreamError           unreachable, refused, reset or malformed (502)
    └── UpstreamTimeout     no connection or no bytes within the timeout (504)
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from yarl import URL

#: Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the HTTP client recomputes.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
#: What aiohttp would otherwise add on the client's behalf: the upstream sees the client's own
#: headers (a gzip the client never asked for would also make the usage tail compressed bytes).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
TAIL_BYTES = 16 * 1024

# The usage fields as OpenAI (completion_tokens, finish_reason) and Ollama (eval_count, done_reason)
# write them; read from the response's last bytes, where both APIs put them.
_TOKENS = re.compile(rb'"(?:completion_tokens|eval_count)"\s*:\s*(\d+)')
_FINISH = re.compile(rb'"(?:finish_reason|done_reason)"\s*:\s*"([a-z_]+)"')


class UpstreamError(Exception):
    """The upstream could not be reached or failed mid-response."""


class UpstreamTimeout(UpstreamError):
    pass


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], *, strip_auth: bool, upstream_key: str | None
) -> list[tuple[str, str]]:
    """Client headers (ASGI: lower-case names) to send upstream. The client's Authorization is the
    proxy's own when the proxy checks a key, so it never travels on; an upstream key replaces it."""
    drop_auth = strip_auth or bool(upstream_key)
    out = []
    for k, v in headers:
        name = k.decode("latin-1")
        if name not in _NOT_FORWARDED and not (drop_auth and name == "authorization"):
            out.append((name, v.decode("latin-1")))
    if upstream_key:
        out.append(("authorization", f"Bearer {upstream_key}"))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the ASGI response: lower-case names, hop-by-hop ones dropped
    (the server frames the body itself; a Content-Length still holds, as the bytes are untouched)."""
    out = []
    for k, v in headers:
        name = k.lower()
        if name == b"content-length" or name.decode("latin-1") not in _NOT_FORWARDED:
            out.append((name, v))
    return out


class Upstream:
    """The upstream server behind one connection pool. The session is made on first use, inside the
    event loop that serves the requests (the app may be built before that loop runs)."""

    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        # sock_read bounds each silence, not the whole (possibly long) stream; connect covers the
        # wait for a pooled connection too.
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=connect_timeout_s, sock_read=timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                # A proxy must not keep one client's cookies and send them with everyone's requests.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
            )
        return self._session

    async def open(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send a request (``target``: the path and query as the client sent them, still encoded) and
        return once the response headers are in."""
        url = URL(self.base_url + target, encoded=True)
        try:
            response = await self._client().request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        return UpstreamResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class UpstreamResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response_headers(response.raw_headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, a read at a time (chunked framing already removed)."""
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Hand the connection back to the pool when the body was read to its end; otherwise close
        it, which also ends the upstream's work on this request at once. Never awaits, so it runs
        as it is under a cancellation."""
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

    def finish_reason(self) -> str | None:
        found = _FINISH.findall(self.tail)
        return found[-1].decode() if found else None
