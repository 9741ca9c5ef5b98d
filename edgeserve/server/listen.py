"""The HTTP side of ``serve``: uvicorn with the limits a slow or hostile client must not get around.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but nothing before a request's
head is complete: a connection that sends nothing, or half a head, is held for ever (issue 19 found
200 half-open heads all still held after 7 s). ``GuardedHTTP`` adds that bound, and a cap on open
connections; the body's read time is bounded in ``guard.GuardMiddleware``.

    uvicorn.run(app, **uvicorn_options(settings))   # what `edgeserve serve` runs
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeserve.settings import ServerSettings

log = logging.getLogger("edgeserve.server")

#: Sent when a request head does not arrive in time (the path, and so the API's error shape, is not
#: known yet: the OpenAI shape, which the Ollama clients also read as an error).
_HEAD_TIMEOUT_BODY = b'{"error":{"message":"the request head did not arrive in time","type":"invalid_request_error","param":null,"code":"request_timeout"}}'  # noqa: E501
HEAD_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_HEAD_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _HEAD_TIMEOUT_BODY
)


class GuardedHTTP(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with two more bounds (class attributes, set by ``protocol_for``):

    - a request head must be complete within ``header_timeout_s`` of the connection opening or of
      its first byte (after a keep-alive wait); else 408 (a plain close if no byte came) and close;
    - at most ``max_connections`` are open; one more is closed as soon as it is accepted.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 2048

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._bytes_seen = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("more than %d open connections: closing a new one", self.max_connections)
            transport.abort()
            return
        self._arm_head_timer()  # a connection that never sends a byte is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._bytes_seen = True
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()  # the first bytes of a new head (the idle wait before is keep-alive's)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()  # from here the body's read time is the guard's business
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._bytes_seen:
            self.transport.write(HEAD_TIMEOUT)
        self.transport.close()


def protocol_for(settings: ServerSettings) -> type[GuardedHTTP]:
    class Protocol(GuardedHTTP):
        header_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections

    return Protocol


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``: what ``serve`` runs with (tests
    take the same and override the address and log level)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": protocol_for(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        # On shutdown, streams still open after the grace period are cancelled (their requests too).
        "timeout_graceful_shutdown": 10,
        "backlog": max(2048, settings.max_connections),
    }


def raise_open_files_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` sockets (plus files) when the hard limit allows: a soft limit
    of 1024, common on Linux, would fail accepts long before ``max_connections``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + 256 if hard == resource.RLIM_INFINITY else min(hard, wanted + 256)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
