"""``create_proxy_app``: SJF admission in front of a serial upstream (Ollama, llama.cpp's server, vLLM,
any OpenAI-compatible server).

Generation requests (``wire.ADMITTED_PATHS``) are predicted, queued under the policy and sent
upstream at most ``max_inflight`` at a time; their responses stream back chunk by chunk as they
arrive. Every other route passes straight through. A generation request runs as two tasks — the
relay and a watcher for the client's disconnect — so a client that leaves is dropped from the queue,
or has its upstream request closed, at once, in whatever phase it is.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edgeserve.admission import Admission, Ticket
from edgeserve.engine import LengthEstimator, LengthPrediction, LengthRecorder
from edgeserve.errors import EdgeserveError
from edgeserve.proxy import wire
from edgeserve.proxy.metrics import ProxyMetrics
from edgeserve.proxy.upstream import UsageTail, request_headers, response_headers
from edgeserve.scheduler import INITIAL_AGING_S, AgingTracker
from edgeserve.server.guard import GuardMiddleware
from edgeserve.server.http_errors import edgeserve_error_response, error_response
from edgeserve.settings import ProxySettings

log = logging.getLogger("edgeserve.proxy")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ProxyState:
    settings: ProxySettings
    admission: Admission
    client: httpx.AsyncClient
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
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """The proxy app. ``transport`` replaces the network in tests of pure proxy logic."""
    settings = settings or ProxySettings()
    admission = Admission(
        settings.policy,
        max_inflight=settings.max_inflight,
        capacity=settings.max_queue,
        aging_s=settings.aging_s or INITIAL_AGING_S,
    )
    metrics = ProxyMetrics(settings.policy, lambda: admission.waiting, lambda: admission.inflight)
    timeout = httpx.Timeout(settings.timeout_s, connect=10.0)
    client = httpx.AsyncClient(base_url=settings.upstream.rstrip("/"), timeout=timeout, transport=transport)
    state = ProxyState(
        settings,
        admission,
        client,
        metrics,
        predictor if settings.policy != "fcfs" or recorder else None,
        recorder,
        AgingTracker(settings.aging_factor) if settings.aging_s is None else None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", render_metrics, methods=["GET"]),
        Route("/queue", queue, methods=["GET"]),
        *(Route(path, AdmittedRoute(state), methods=["POST"]) for path in sorted(wire.ADMITTED_PATHS)),
        Route("/{path:path}", PassThrough(state), methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.proxy = state
    app.add_middleware(
        GuardMiddleware,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        limit_paths=wire.ADMITTED_PATHS,
    )
    return app


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
        request = Request(scope, receive)
        body = await request.body()
        try:
            upstream = await self.state.client.send(_upstream_request(self.state, request, body), stream=True)
        except httpx.HTTPError as exc:
            await _upstream_failed(request.url.path, self.state.settings.upstream, exc)(scope, receive, send)
            return

        response = StreamingResponse(
            upstream.aiter_raw(), upstream.status_code, response_headers(upstream.headers.items())
        )
        try:
            await response(scope, receive, send)
        finally:  # also when the body never started (the client left first): no pooled connection leaks
            with anyio.CancelScope(shield=True):
                await upstream.aclose()


class AdmittedRoute:
    """A generation request: predict, wait for a slot, relay the upstream response."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path = request.url.path
        body = await request.body()
        try:
            admitted = wire.parse(path, body, {k.lower(): v for k, v in request.headers.items()})
        except EdgeserveError as exc:
            await edgeserve_error_response(path, exc)(scope, receive, send)
            return
        prediction = self.state.predict(admitted.source)
        call = _Call(self.state, request, body, admitted, prediction, send)
        # The relay and a watcher for the client leaving race; whichever ends first stops the other.
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    # Servers also report a disconnect once the response is complete: not a client
                    # leaving, and the relay must be left to hand its upstream connection back to the pool.
                    if not call.responded:
                        call.client_gone = True
                        group.cancel_scope.cancel()

                async def serve() -> None:
                    await call.run()
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                group.start_soon(serve)
        finally:
            call.finish()  # however it ended: metrics and feedback are never skipped


class _Call:
    """One admitted request's life: queue, upstream, relay, and the account of it afterwards."""

    def __init__(
        self,
        state: ProxyState,
        request: Request,
        body: bytes,
        admitted: wire.Admitted,
        prediction: LengthPrediction | None,
        send: Send,
    ) -> None:
        self.state, self.request, self.body, self.admitted, self.send = state, request, body, admitted, send
        self.prediction = prediction
        self.length_class = prediction.length_class if prediction is not None else "unknown"
        self.request_id = f"px-{uuid.uuid4().hex[:16]}"
        self.arrived = time.monotonic()
        self.ticket: Ticket | None = None
        self.first_byte: float | None = None
        self.outcome = "cancelled"
        self.tail = UsageTail()
        self.client_gone = False
        #: The whole response has been sent.
        self.responded = False

    async def run(self) -> None:
        path = self.request.url.path
        admission = self.state.admission
        expected = self.prediction.expected_tokens if self.prediction is not None else None
        try:
            self.ticket = await admission.acquire(
                self.request_id, priority=self.admitted.priority, predicted_tokens=expected
            )
        except EdgeserveError as exc:  # the queue is full
            self.outcome = "queue_full"
            await edgeserve_error_response(path, exc)(self.request.scope, self.request.receive, self.send)
            self.responded = True
            return
        try:
            await self._forward(path)
        finally:
            admission.release()

    async def _forward(self, path: str) -> None:
        upstream_request = _upstream_request(self.state, self.request, self.body)
        try:
            upstream = await self.state.client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            self.outcome = "upstream_error"
            error = _upstream_failed(path, self.state.settings.upstream, exc)
            await error(self.request.scope, self.request.receive, self.send)
            self.responded = True
            return
        try:
            headers = response_headers(upstream.headers.items())
            assert self.ticket is not None
            headers.update(
                {
                    "x-request-id": self.request_id,
                    "x-queue-position": str(self.ticket.position),
                    "x-queue-wait-ms": f"{self.ticket.waited_s * 1000:.1f}",
                }
            )
            if self.prediction is not None:
                headers["x-predicted-tokens"] = f"{self.prediction.expected_tokens:.0f}"
            raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            await self.send({"type": "http.response.start", "status": upstream.status_code, "headers": raw})
            self.outcome = "upstream_error"  # until the stream ends cleanly
            try:
                async for chunk in upstream.aiter_raw():
                    if self.first_byte is None:
                        self.first_byte = time.monotonic()
                    self.tail.feed(chunk)
                    await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:  # the upstream died mid-stream: end ours cleanly
                log.warning("upstream stream broke for %s: %s", self.request_id, exc)
            else:
                self.outcome = "ok" if upstream.status_code < 400 else f"http_{upstream.status_code}"
            # Complete from here on: the client may hang up before this send even returns.
            self.responded = True
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # On a disconnect this closes the upstream request at once; after a complete response it
            # returns the connection to the pool, which a cancellation here would break (a new TCP
            # connection per request).
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

    def finish(self) -> None:
        """Account for the request once it is over, whichever way it ended."""
        s = self.state
        if self.client_gone and self.outcome in ("ok", "upstream_error"):
            self.outcome = "cancelled"
        s.metrics.outcome(self.length_class, self.outcome)
        if self.ticket is None or self.outcome != "ok":
            return
        now = time.monotonic()
        actual = self.tail.completion_tokens()
        s.metrics.served(
            self.length_class,
            queue_wait_s=self.ticket.waited_s,
            first_byte_s=None if self.first_byte is None else self.first_byte - self.arrived,
            e2e_s=now - self.arrived,
            predicted=self.prediction.expected_tokens if self.prediction is not None else None,
            actual=actual,
        )
        if actual is None or self.tail.finish_reason() != "stop":
            return  # a length cut short by max_tokens says nothing about the natural length
        service_s = now - self.arrived - self.ticket.waited_s
        if s.aging is not None and (aging_s := s.aging.observe(actual, service_s)) is not None:
            s.admission.scheduler.set_aging(aging_s)
        if s.recorder is not None and self.admitted.source is not None:
            try:
                s.recorder.record(self.admitted.source, actual)
            except (OSError, EdgeserveError) as exc:
                log.warning("could not record answer length: %s", exc)


def _upstream_request(state: ProxyState, request: Request, body: bytes) -> httpx.Request:
    headers = request_headers(
        request.headers.items(),
        strip_auth=state.settings.api_key is not None,
        upstream_key=state.settings.upstream_api_key,
    )
    url = httpx.URL(path=request.url.path, query=request.url.query.encode("latin-1"))
    return state.client.build_request(request.method, url, headers=headers, content=body)


def _upstream_failed(path: str, upstream: str, exc: httpx.HTTPError) -> Response:
    if isinstance(exc, httpx.TimeoutException):
        return error_response(path, 504, f"the upstream {upstream} did not answer in time ({type(exc).__name__})")
    return error_response(path, 502, f"the upstream {upstream} is unreachable or failed: {type(exc).__name__}: {exc}")
