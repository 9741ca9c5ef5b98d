"""``create_proxy_app``: SJF admission in front of a serial upstream (Ollama, llama.cpp's server, vLLM,
any OpenAI-compatible server).

Generation requests (``wire.ADMITTED_PATHS``) wait under the policy (SJF: by predicted service time,
the prompt's prefill plus the predicted answer's decode) and go upstream at most ``max_inflight`` at a
time; their responses stream back event by event as they arrive, checked so that a broken answer
never looks finished (``relay``). Every other route passes straight through. A request runs beside a
watcher for the client's disconnect (``call``), so a client that leaves is dropped from the queue, or
has its upstream request closed, at once, in whatever phase it is.

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
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeserve.admission import Admission
from edgeserve.errors import EdgeserveError, UpstreamError
from edgeserve.proxy import wire
from edgeserve.proxy.call import Call, open_upstream, until_disconnect, upstream_failed
from edgeserve.proxy.health import UpstreamHealth
from edgeserve.proxy.metrics import ProxyMetrics
from edgeserve.proxy.relay import Relay
from edgeserve.proxy.upstream import Timeouts, Upstream
from edgeserve.scheduler import INITIAL_AGING_S, UNKNOWN_TOKENS, AgingTracker
from edgeserve.server.guard import GuardMiddleware
from edgeserve.server.http_errors import edgeserve_error_response
from edgeserve.server.origins import OriginGuard, OriginPolicy
from edgeserve.service import LengthEstimator, LengthPrediction, LengthRecorder, ServiceModel
from edgeserve.settings import ProxySettings

log = logging.getLogger("edgeserve.proxy")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
#: Scope key: the generation handler was reached (it counts the request itself).
COUNTED = "edgeserve.proxy.counted"


@dataclass
class ProxyState:
    settings: ProxySettings
    admission: Admission
    upstream: Upstream
    metrics: ProxyMetrics
    predictor: LengthEstimator | None
    recorder: LengthRecorder | None
    aging: AgingTracker | None
    service: ServiceModel = field(default_factory=ServiceModel)
    health: UpstreamHealth = field(default_factory=UpstreamHealth)
    #: The one health probe running now, shared by every /health call meanwhile.
    probe: asyncio.Task[str | None] | None = None

    @property
    def upstream_auth(self) -> str | None:
        """The operator's credentials for the upstream (``headers``' order): a key, else the URL's."""
        key = self.settings.upstream_api_key
        return f"Bearer {key}" if key else self.upstream.target.basic_auth

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
    service = ServiceModel()
    admission = Admission(
        settings.policy,
        max_inflight=settings.max_inflight,
        capacity=settings.max_queue,
        aging_s=settings.aging_s or INITIAL_AGING_S,
        prior_service_s=service.estimate_s(0, UNKNOWN_TOKENS),
    )
    metrics = ProxyMetrics(settings.policy, lambda: admission.waiting, lambda: admission.inflight)
    timeouts = Timeouts(settings.connect_timeout_s, settings.first_byte_timeout_s, settings.chunk_timeout_s)
    upstream = upstream or Upstream(settings.upstream, timeouts=timeouts, keepalive_s=settings.upstream_keepalive_s)
    state = ProxyState(
        settings,
        admission,
        upstream,
        metrics,
        predictor if settings.policy != "fcfs" or recorder else None,
        recorder,
        AgingTracker(settings.aging_factor) if settings.aging_s is None else None,
        service,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    def guarded(app: ASGIApp) -> GuardMiddleware:
        return GuardMiddleware(
            app,
            api_key=settings.api_key,
            max_body_bytes=settings.max_body_bytes,
            limit_paths=wire.ADMITTED_PATHS,
            require_json=True,
            body_timeout_s=settings.body_timeout_s,
        )

    # The DNS-rebinding and foreign-page guard, as serve's (server/origins.py): without a key, a web
    # page could otherwise drive the upstream through the proxy.
    hosts = {h for h in settings.allowed_hosts.split(",") if h} | {settings.host.lower().strip("[]")}
    origins = OriginPolicy(frozenset(hosts), tuple(o for o in settings.allowed_origins.split(",") if o))

    route = AdmittedRoute(state)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", render_metrics, methods=["GET"]),
        Route("/queue", queue, methods=["GET"]),
        *(Route(path, route, methods=["POST"]) for path in sorted(wire.ADMITTED_PATHS)),
        Route("/{path:path}", PassThrough(state), methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.proxy = state
    app.add_middleware(guarded)
    app.add_middleware(OriginGuard, policy=origins)
    return ProxyApp(CountRejections(state, OriginGuard(guarded(route), policy=origins)), app)


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
    """200 while the upstream works, 503 with the reason while it fails (``health``)."""
    s = _state(request)
    if s.health.needs_probe(time.monotonic()):
        if s.probe is None or s.probe.done():
            s.probe = asyncio.ensure_future(s.upstream.probe())
        # shield: a caller that leaves does not cancel the probe the others wait on.
        s.health.probe_result(await asyncio.shield(s.probe), time.monotonic())
    reason = s.health.failing(time.monotonic())
    body: dict[str, Any] = {
        "status": "ok" if reason is None else "upstream_failing",
        "upstream": s.upstream.redacted,
        "policy": s.settings.policy,
        "waiting": s.admission.waiting,
        "inflight": s.admission.inflight,
    }
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if reason is None else 503)


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
    """Any other route: forwarded as is, streamed back raw as it arrives, no admission."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        path: str = scope["path"]
        try:
            upstream = await open_upstream(self.state, scope, body)
        except UpstreamError as exc:
            await edgeserve_error_response(path, upstream_failed(self.state, exc))(scope, receive, send)
            return
        try:
            relay = Relay(upstream, send, path=path)
            await until_disconnect(receive, relay.run, lambda: relay.responded)
        finally:  # also when the client left first: no pooled connection leaks
            upstream.close()


class AdmittedRoute:
    """A generation request: parse, then a ``Call`` (predict, wait for a slot, relay)."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if COUNTED in scope:
            scope[COUNTED][0] = True
        body = await _read_body(receive)
        if body is None:
            self.state.metrics.outcome("unknown", "cancelled")
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            admitted = wire.parse(path, body, headers)
        except EdgeserveError as exc:
            self.state.metrics.outcome("unknown", "invalid_request")
            await edgeserve_error_response(path, exc)(scope, receive, send)
            return
        call = Call(self.state, scope, receive, send, body, admitted)
        try:
            call.client_gone = await until_disconnect(receive, call.run, lambda: call.responded)
        finally:
            call.finish()  # however it ended: metrics and feedback are never skipped


class CountRejections:
    """Counts the generation requests the guard answered itself (401, 413, ...) in the metrics, as
    ``http_<status>``: every request to a generation route is counted once, whatever became of it."""

    def __init__(self, state: ProxyState, app: ASGIApp) -> None:
        self.state, self.app = state, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = scope[COUNTED] = [False]  # a list: the guard may pass on a copy of the scope
        await self.app(scope, receive, observe)
        if not counted[0] and status:
            self.state.metrics.outcome("unknown", f"http_{status}")


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
