"""``create_proxy_app``: SJF admission in front of a serial upstream (Ollama, llama.cpp's server, vLLM,
any OpenAI-compatible server).

Generation requests (``wire.ADMITTED_PATHS``) wait under the policy (SJF: by predicted answer length)
and go upstream at most ``max_inflight`` at a time; their responses stream back chunk by chunk as they
arrive. Every other route passes straight through. A request runs beside a watcher for the client's
disconnect, so a client that leaves is dropped from the queue, or has its upstream request closed,
at once, in whatever phase it is.

The proxy's own time sits on every request's time to first token, so the path is kept short: a
request that finds a free slot and nobody waiting goes upstream at once, and its length prediction
(which only orders a queue) is made after its response, for the metrics. Making it on the way would
put it on the time to first token wherever the upstream sends its headers with the first token (Go's
net/http, so Ollama, sends them with the first write). So ``x-predicted-tokens`` comes with the
requests that waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeserve.admission import Admission, Ticket
from edgeserve.errors import EdgeserveError
from edgeserve.proxy import wire
from edgeserve.proxy.metrics import ProxyMetrics
from edgeserve.proxy.upstream import (
    Upstream,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UsageTail,
    request_headers,
)
from edgeserve.scheduler import INITIAL_AGING_S, AgingTracker
from edgeserve.server.guard import GuardMiddleware
from edgeserve.server.http_errors import edgeserve_error_response, error_response
from edgeserve.service import LengthEstimator, LengthPrediction, LengthRecorder
from edgeserve.settings import ProxySettings

log = logging.getLogger("edgeserve.proxy")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ProxyState:
    settings: ProxySettings
    admission: Admission
    upstream: Upstream
    metrics: ProxyMetrics
    predictor: LengthEstimator | None
    recorder: LengthRecorder | None
    aging: AgingTracker | None

    def predict(self, source: Any) -> LengthPrediction | None:
        if source is None or self.predictor is None:
            return None
        try:
            return self.predictor.predict(source)
        except EdgeserveError:  # nothing readable: it waits as a medium request
            return None


def create_proxy_app(
    settings: ProxySettings | None = None,
    *,
    predictor: LengthEstimator | None = None,
    recorder: LengthRecorder | None = None,
    upstream: Upstream | None = None,
) -> ProxyApp:
    """The proxy app. ``upstream`` replaces the client to ``settings.upstream`` (a double in tests)."""
    settings = settings or ProxySettings()
    admission = Admission(
        settings.policy,
        max_inflight=settings.max_inflight,
        capacity=settings.max_queue,
        aging_s=settings.aging_s or INITIAL_AGING_S,
    )
    metrics = ProxyMetrics(settings.policy, lambda: admission.waiting, lambda: admission.inflight)
    upstream = upstream or Upstream(settings.upstream, timeout_s=settings.timeout_s)
    state = ProxyState(
        settings,
        admission,
        upstream,
        metrics,
        predictor if settings.policy != "fcfs" or recorder else None,
        recorder,
        AgingTracker(settings.aging_factor) if settings.aging_s is None else None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    def guarded(app: ASGIApp) -> GuardMiddleware:
        return GuardMiddleware(
            app, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, limit_paths=wire.ADMITTED_PATHS
        )

    admitted = AdmittedRoute(state)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", render_metrics, methods=["GET"]),
        Route("/queue", queue, methods=["GET"]),
        *(Route(path, admitted, methods=["POST"]) for path in sorted(wire.ADMITTED_PATHS)),
        Route("/{path:path}", PassThrough(state), methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.proxy = state
    app.add_middleware(guarded)
    return ProxyApp(guarded(admitted), app)


class ProxyApp:
    """The ASGI entry point. A generation request goes to its handler behind the guard alone; the
    Starlette app (routing, exception middleware) serves the rest. Every streamed chunk passes back
    through each layer's ``send``, and the generation routes are where that cost is paid per token."""

    def __init__(self, admitted: ASGIApp, app: Starlette) -> None:
        self.admitted, self.app = admitted, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in wire.ADMITTED_PATHS:
            await self.admitted(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _state(request: Request) -> ProxyState:
    state: ProxyState = request.app.state.proxy
    return state


async def health(request: Request) -> Response:
    s = _state(request)
    return JSONResponse(
        {
            "status": "ok",
            "upstream": s.settings.upstream,
            "policy": s.settings.policy,
            "waiting": s.admission.waiting,
            "inflight": s.admission.inflight,
        }
    )


async def render_metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=PROMETHEUS_TEXT)


async def queue(request: Request) -> Response:
    """The waiting requests in the order they will run: ids, predictions and waits, never text."""
    s = _state(request)
    return JSONResponse(
        {
            "policy": s.settings.policy,
            "max_inflight": s.settings.max_inflight,
            "inflight": s.admission.inflight,
            "aging_s": s.admission.scheduler.aging_s,
            "waiting": [
                {
                    "id": v.request_id,
                    "position": v.position,
                    "waited_ms": round(v.waited_s * 1000, 1),
                    "predicted_tokens": None if v.predicted_tokens is None else round(v.predicted_tokens, 1),
                    "priority": v.priority,
                    "aged": v.aged,
                }
                for v in s.admission.snapshot()
            ],
        }
    )


class PassThrough:
    """Any other route: forwarded as is, streamed back as it arrives, no admission."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            upstream = await _open_upstream(self.state, scope, body)
        except UpstreamError as exc:
            await _upstream_failed(scope["path"], self.state.settings.upstream, exc)(scope, receive, send)
            return
        try:
            relay = _Relay(upstream, send)
            await _until_disconnect(receive, relay.run, lambda: relay.responded)
        finally:  # also when the client left first: no pooled connection leaks
            upstream.close()


class AdmittedRoute:
    """A generation request: predict, wait for a slot, relay the upstream response."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        body = await _read_body(receive)
        if body is None:
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            admitted = wire.parse(path, body, headers)
        except EdgeserveError as exc:
            await edgeserve_error_response(path, exc)(scope, receive, send)
            return
        call = _Call(self.state, scope, receive, send, body, admitted)
        try:
            call.client_gone = await _until_disconnect(receive, call.run, lambda: call.responded)
        finally:
            call.finish()  # however it ended: metrics and feedback are never skipped


async def _until_disconnect(
    receive: Receive, work: Callable[[], Awaitable[None]], responded: Callable[[], bool]
) -> bool:
    """Run ``work`` while watching for the client leaving; True when it left before the response was
    complete, and ``work`` was cancelled where it stood (waiting in the queue, or upstream)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        # Servers also report a disconnect once the response is complete: not a client leaving,
        # and the relay must be left to hand its upstream connection back to the pool.
        if not responded():
            gone = True
            task.cancel()

    # The watcher can only run while ``work`` is suspended, so its cancellation always lands in
    # ``work``; asyncio rather than an anyio task group, whose cancel() formats the task's repr.
    watcher = asyncio.ensure_future(watch())
    try:
        await work()
    except asyncio.CancelledError:
        if not gone:
            raise  # the server is shutting down
        if sys.version_info >= (3, 11):
            task.uncancel()
    finally:
        watcher.cancel()
    return gone


class _Relay:
    """An upstream response sent on to the client as it arrives, chunk by chunk."""

    def __init__(
        self, upstream: UpstreamResponse, send: Send, extra_headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self.upstream, self.send = upstream, send
        self.headers = [*upstream.headers, *extra_headers]
        self.first_byte: float | None = None
        self.tail = UsageTail()
        #: The upstream's body ended cleanly (not cut by an upstream failure).
        self.complete = False
        #: The whole response has been sent.
        self.responded = False

    async def run(self) -> None:
        send = self.send
        await send({"type": "http.response.start", "status": self.upstream.status, "headers": self.headers})
        try:
            async for chunk in self.upstream.chunks():
                if self.first_byte is None:
                    self.first_byte = time.monotonic()
                self.tail.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:  # the upstream died mid-stream: end ours cleanly
            log.warning("upstream stream broke: %s", exc)
        else:
            self.complete = True
        # Complete from here on: the client may hang up before this send even returns.
        self.responded = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Call:
    """One admitted request's life: queue, upstream, relay, and the account of it afterwards."""

    def __init__(
        self,
        state: ProxyState,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        admitted: wire.Admitted,
    ) -> None:
        self.state, self.scope, self.receive, self.send = state, scope, receive, send
        self.body, self.admitted = body, admitted
        self._predicted = False
        self.prediction: LengthPrediction | None = None
        self.length_class = "unknown"
        self.request_id = f"px-{uuid.uuid4().hex[:16]}"
        self.arrived = time.monotonic()
        self.ticket: Ticket | None = None
        self.relay: _Relay | None = None
        self.outcome = "cancelled"
        self.client_gone = False
        #: The whole response has been sent.
        self.responded = False

    async def run(self) -> None:
        path: str = self.scope["path"]
        admission = self.state.admission
        if admission.waiting or admission.inflight >= self.state.settings.max_inflight:
            self._predict()  # it will wait: its place in the queue depends on the prediction
        expected = self.prediction.expected_tokens if self.prediction is not None else None
        try:
            self.ticket = await admission.acquire(
                self.request_id, priority=self.admitted.priority, predicted_tokens=expected
            )
        except EdgeserveError as exc:  # the queue is full
            self.outcome = "queue_full"
            await edgeserve_error_response(path, exc)(self.scope, self.receive, self.send)
            self.responded = True
            return
        try:
            await self._forward(path)
        finally:
            admission.release()

    async def _forward(self, path: str) -> None:
        try:
            upstream = await _open_upstream(self.state, self.scope, self.body)
        except UpstreamError as exc:
            self.outcome = "upstream_error"
            await _upstream_failed(path, self.state.settings.upstream, exc)(self.scope, self.receive, self.send)
            self.responded = True
            return
        try:
            self.outcome = "upstream_error"  # until the stream ends cleanly
            self.relay = _Relay(upstream, self.send, self._queue_headers())
            await self.relay.run()
            self.responded = True
            if self.relay.complete:
                self.outcome = "ok" if upstream.status < 400 else f"http_{upstream.status}"
        finally:
            # On a disconnect this closes the upstream request at once; after a complete response it
            # returns the connection to the pool.
            upstream.close()

    def _predict(self) -> None:
        if not self._predicted:
            self._predicted = True
            self.prediction = self.state.predict(self.admitted.source)
            if self.prediction is not None:
                self.length_class = self.prediction.length_class

    def _queue_headers(self) -> list[tuple[bytes, bytes]]:
        assert self.ticket is not None
        headers = [
            (b"x-request-id", self.request_id.encode()),
            (b"x-queue-position", str(self.ticket.position).encode()),
            (b"x-queue-wait-ms", f"{self.ticket.waited_s * 1000:.1f}".encode()),
        ]
        if self.prediction is not None:
            headers.append((b"x-predicted-tokens", f"{self.prediction.expected_tokens:.0f}".encode()))
        return headers

    def finish(self) -> None:
        """Account for the request once it is over, whichever way it ended."""
        s = self.state
        self._predict()  # the metrics are labelled by predicted class, however far it got
        if self.client_gone and self.outcome in ("ok", "upstream_error"):
            self.outcome = "cancelled"
        s.metrics.outcome(self.length_class, self.outcome)
        if self.ticket is None or self.relay is None or self.outcome != "ok":
            return
        now = time.monotonic()
        first_byte = self.relay.first_byte
        actual = self.relay.tail.completion_tokens()
        s.metrics.served(
            self.length_class,
            queue_wait_s=self.ticket.waited_s,
            first_byte_s=None if first_byte is None else first_byte - self.arrived,
            e2e_s=now - self.arrived,
            predicted=self.prediction.expected_tokens if self.prediction is not None else None,
            actual=actual,
        )
        if actual is None or self.relay.tail.finish_reason() != "stop":
            return  # a length cut short by max_tokens says nothing about the natural length
        service_s = now - self.arrived - self.ticket.waited_s
        if s.aging is not None and (aging_s := s.aging.observe(actual, service_s)) is not None:
            s.admission.scheduler.set_aging(aging_s)
        if s.recorder is not None and self.admitted.source is not None:
            try:
                s.recorder.record(self.admitted.source, actual)
            except (OSError, EdgeserveError) as exc:
                log.warning("could not record answer length: %s", exc)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client left before sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _open_upstream(state: ProxyState, scope: Scope, body: bytes) -> UpstreamResponse:
    headers = request_headers(
        scope["headers"],
        strip_auth=state.settings.api_key is not None,
        upstream_key=state.settings.upstream_api_key,
    )
    # The target as the client sent it, still percent-encoded.
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    target = (raw_path + b"?" + query if query else raw_path).decode("latin-1")
    return await state.upstream.open(scope["method"], target, headers, body)


def _upstream_failed(path: str, upstream: str, exc: UpstreamError) -> Response:
    if isinstance(exc, UpstreamTimeout):
        return error_response(path, 504, f"the upstream {upstream} did not answer in time ({exc})")
    return error_response(path, 502, f"the upstream {upstream} is unreachable or failed: {exc}")
