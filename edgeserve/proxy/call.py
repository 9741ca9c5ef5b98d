"""One proxied request's life: wait for a slot (admitted routes only), go upstream, relay, and the
account of it afterwards (metrics, upstream health, the service model, the length feedback).

A request runs beside a watcher for the client's disconnect, so a client that leaves is dropped
from the queue, or has its upstream request closed, at once, in whatever phase it is.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

from edgeserve.admission import Ticket
from edgeserve.errors import EdgeserveError, UpstreamError
from edgeserve.proxy import wire
from edgeserve.proxy.headers import request_headers
from edgeserve.proxy.relay import Relay
from edgeserve.proxy.upstream import UpstreamResponse
from edgeserve.scheduler import UNKNOWN_TOKENS
from edgeserve.server.http_errors import edgeserve_error_response
from edgeserve.service import LengthPrediction

if TYPE_CHECKING:
    from edgeserve.proxy.app import ProxyState

log = logging.getLogger("edgeserve.proxy")


async def until_disconnect(
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


async def open_upstream(state: ProxyState, scope: Scope, body: bytes) -> UpstreamResponse:
    """Send the client's request upstream; on failure the health record says so. Raises ``UpstreamError``."""
    headers = request_headers(
        scope["headers"], proxy_checks_key=state.settings.api_key is not None, upstream_auth=state.upstream_auth
    )
    # The target as the client sent it, still percent-encoded.
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    target = (raw_path + b"?" + query if query else raw_path).decode("latin-1")
    try:
        response = await state.upstream.open(scope["method"], target, headers, body)
    except UpstreamError as exc:
        state.health.failed(str(upstream_failed(state, exc)), time.monotonic())
        raise
    if response.retried:
        state.metrics.upstream_retries.inc()
    return response


def upstream_failed(state: ProxyState, exc: UpstreamError) -> EdgeserveError:
    """The client's view of an upstream failure: the status by class, the upstream's URL redacted."""
    what = "did not answer in time" if exc.http_status == 504 else "is unreachable or failed"
    return type(exc)(f"the upstream {state.upstream.redacted} {what} ({exc})")


class Call:
    """One admitted request: predict, wait for a slot, relay the upstream response, account for it."""

    def __init__(
        self, state: ProxyState, scope: Scope, receive: Receive, send: Send, body: bytes, admitted: wire.Admitted
    ) -> None:
        self.state, self.scope, self.receive, self.send = state, scope, receive, send
        self.body, self.admitted = body, admitted
        self._predicted = False
        self.prediction: LengthPrediction | None = None
        self.length_class = "unknown"
        self.request_id = f"px-{uuid.uuid4().hex[:16]}"
        self.arrived = time.monotonic()
        self.sent_at = 0.0
        self.ticket: Ticket | None = None
        self.relay: Relay | None = None
        self.outcome = "cancelled"
        self.client_gone = False
        #: The whole response has been sent.
        self.responded = False

    async def run(self) -> None:
        path: str = self.scope["path"]
        admission = self.state.admission
        cost_s = None
        if admission.waiting or admission.inflight >= self.state.settings.max_inflight:
            self._predict()  # it will wait: its place in the queue depends on the prediction
            cost_s = self.cost_s()
        expected = self.prediction.expected_tokens if self.prediction is not None else None
        try:
            self.ticket = await admission.acquire(
                self.request_id, priority=self.admitted.priority, predicted_tokens=expected, cost_s=cost_s
            )
        except EdgeserveError as exc:  # the queue is full
            self.outcome = "queue_full"
            await edgeserve_error_response(path, exc)(self.scope, self.receive, self.send)
            self.responded = True
            return
        try:
            await self._forward(path)
        finally:
            # The response is out: predicting now costs no client any time (see app's docstring). The
            # cost is the service model's after it learned from this very request, so the hold is
            # fitted against what the model now says.
            self._predict()
            complete = self.relay is not None and self.relay.complete
            admission.release(self.ticket, cost_s=self.cost_s(), measured=complete)

    def cost_s(self) -> float:
        """Predicted service seconds: the prompt's prefill plus the predicted answer's decode, at the
        rates measured on this upstream (issue 12: sjf orders by service time, not length alone)."""
        answer = UNKNOWN_TOKENS if self.prediction is None else self.prediction.expected_tokens
        if self.admitted.max_tokens is not None:
            answer = min(answer, self.admitted.max_tokens)
        return self.state.service.estimate_s(self.admitted.prompt_tokens(), answer)

    async def _forward(self, path: str) -> None:
        self.sent_at = time.monotonic()
        try:
            upstream = await open_upstream(self.state, self.scope, self.body)
        except UpstreamError as exc:
            await self._failed(path, exc)
            return
        try:
            self.outcome = "upstream_error"  # until the answer ends complete
            self.relay = Relay(upstream, self.send, self._queue_headers(), path=path, checked=True)
            try:
                await self.relay.run()
            except UpstreamError as exc:  # a buffered answer, failed before its head went out
                await self._failed(path, exc)
                return
            self.responded = True
            if self.relay.complete:
                self.outcome = "ok" if upstream.status < 400 else f"http_{upstream.status}"
                self.state.health.ok(time.monotonic())
                if self.outcome == "ok":  # before the slot's release measures the hold against it
                    self._observe_service()
            elif self.relay.failure is not None:
                reason = f"the upstream {self.state.upstream.redacted} failed mid-answer: {self.relay.failure}"
                self.state.health.failed(reason, time.monotonic())
        finally:
            # On a disconnect this closes the upstream request at once; after a complete response it
            # returns the connection to the pool.
            upstream.close()

    async def _failed(self, path: str, exc: UpstreamError) -> None:
        self.outcome = "upstream_timeout" if exc.http_status == 504 else "upstream_error"
        error = upstream_failed(self.state, exc)
        self.state.health.failed(str(error), time.monotonic())
        log.warning("upstream failed for %s: %s", self.request_id, exc)
        await edgeserve_error_response(path, error)(self.scope, self.receive, self.send)
        self.responded = True

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

    def _observe_service(self) -> None:
        """Feed the service model the upstream's rates where it reports its own timings (Ollama,
        llama.cpp's server). Nothing else measures them: a request's time is mostly what no token
        rate explains on a small model (``admission.HoldTimes`` fits that part), and a stream's
        first byte is no prefill measure (servers send the head, even a role chunk, before it)."""
        assert self.relay is not None
        prefill, decode = self.relay.tail.rates()
        if prefill is not None:
            self.state.service.observe_prefill(int(prefill[0]), prefill[1])
        if decode is not None:
            self.state.service.observe_decode(int(decode[0]), decode[1])
