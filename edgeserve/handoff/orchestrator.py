"""``Handoff``: the engine's front door when a cloud is configured. Per request it asks the planner,
then either queues the request on the device as usual or runs a ``Session`` (cloud first, device
takes over). Either way the caller gets the engine's own handle types and event stream.

Which requests may use the cloud at all: text and chat prompts (a token prompt means this model's
vocabulary, which a cloud need not share), without a logit bias (token ids mean nothing to another
tokenizer), and not opted out (``cloud_allowed=False``: the privacy switch). Penalties span the
seam: the cloud applies them to its part, and the device's sampler takes the cloud's tokens into
its history (``device.ForcedPrefix``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from edgeserve.engine import AsyncRequestHandle, Engine, Handle, RequestHandle, sampling_params
from edgeserve.handoff import device, planner
from edgeserve.handoff.backlog import Backlog
from edgeserve.handoff.cloud import request_body
from edgeserve.handoff.session import HandoffReport, KvStarter, Session
from edgeserve.handoff.telemetry import Telemetry
from edgeserve.running import Request
from edgeserve.settings import CloudSettings
from edgeserve.types import FinalEvent, Message, SamplingParams, StreamEvent

log = logging.getLogger("edgeserve.handoff")

Sink = Callable[[StreamEvent], None]


class _Output(NamedTuple):
    """Structured output, as ``Engine.submit`` takes it."""

    response_format: Any
    tools: Sequence[Mapping[str, Any]] | None
    tool_choice: str | Mapping[str, Any] | None


class Handoff:
    def __init__(self, engine: Engine, settings: CloudSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.settings = settings
        self.telemetry = Telemetry(clock=clock)
        #: The device work queued and running (the planner's device estimates wait behind it).
        self.backlog = Backlog()
        self._clock = clock
        #: Called with every request's report (the server's metrics listen here).
        self.listeners: list[Callable[[HandoffReport], None]] = []
        #: Starts a KV fetch for a request's tokens (set by ``kvwire`` once the cloud proves to be an
        #: edgeserve on the same model).
        self.kv_fetcher: Callable[[Sequence[int], bool], KvStarter] | None = None
        model = engine.model.name if engine.model is not None else engine.capabilities.model
        self.cloud_model = settings.cloud_model or model
        if settings.kv_handoff and settings.cloud and engine.capabilities.kv_state:
            threading.Thread(target=self._probe_kv, name="edgeserve-kv-probe", daemon=True).start()

    def _probe_kv(self) -> None:
        """KV handoff needs the cloud to run this very model file: checked once, in the background
        (the first requests plan without it)."""
        from edgeserve.handoff import kvclient

        path = self.engine.model.path if self.engine.model is not None else None
        if kvclient.probe(self.settings, self.engine.capabilities.backend, path, self.telemetry):
            self.kv_fetcher = kvclient.fetcher(self.settings, self.telemetry)
            self.telemetry.kv_available = True

    # ---- planning -----------------------------------------------------------------------------

    def plan(self, request: Request, kind: str, cloud_allowed: bool) -> planner.Plan:
        why = _why_local(request.params, kind, cloud_allowed, self.settings)
        ask = planner.Ask(
            prompt_tokens=len(request.prompt_tokens),
            max_tokens=request.max_tokens,
            ttft_target_s=self.settings.ttft_target_s,
            mode=self.settings.handoff,
            cloud_allowed=not why,
            why_not=why,
            device_queue_s=self._device_queue_s(),
            cloud_token_share=self.settings.cloud_token_share,
            # A chat turn cannot be extended portably, and a continuation's penalties would not count
            # the tokens before it: those are asked for with a margin instead of topped up.
            cloud_continues=kind == "text" and not device.has_penalties(request.params),
        )
        measured = self.telemetry.measured(self.engine.service)
        if not (self.settings.kv_handoff and self.kv_fetcher is not None):
            measured = _without_kv(measured)
        return planner.plan(ask, measured)

    def _device_queue_s(self) -> float:
        """The device work ahead of a new request: the engine's queue and batch (every request,
        the handoff's and those submitted with ``cloud=False``), or the handoff's own count when
        larger (it also holds sessions whose device part has not reached the engine yet: a KV route
        waiting for its state, whose decoding will share the device)."""
        handoff = self.backlog.seconds(self.engine.service, self.engine.parallel)
        return max(self.engine.backlog_s(), handoff)

    def plan_for(self, prompt: str, params: SamplingParams | None = None) -> planner.Plan:
        """The route the planner would choose for ``prompt`` now (benchmarks compare it with the best)."""
        request = self._prepare(prompt, None, params, None, lambda _event: None, _Output(None, None, None))
        return self.plan(request, "text", True)

    # ---- submitting ---------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        on_event: Sink | None = None,
        cloud_allowed: bool = True,
        route: planner.Route | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> Handle:
        """Like ``Engine.submit``: a ``RequestHandle`` to iterate, or with ``on_event`` a ``Handle``.
        Structured output (``response_format``, ``tools``) runs on the device alone. ``route``
        overrides the planner's choice (benchmarks and tests compare the routes)."""
        params = sampling_params(params, sampling)
        out = _Output(response_format, tools, tool_choice)
        if on_event is not None:
            request = self._prepare(prompt, messages, params, request_id, on_event, out)
            cancel = self._start(request, prompt, messages, priority, cloud_allowed, out, route)
            return Handle(request, cancel)
        events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        request = self._prepare(prompt, messages, params, request_id, events.put, out)
        cancel = self._start(request, prompt, messages, priority, cloud_allowed, out, route)
        return RequestHandle(request, cancel, events)

    def submit_async(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cloud_allowed: bool = True,
        route: planner.Route | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> AsyncRequestHandle:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def sink(event: StreamEvent) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody reads this stream
                loop.call_soon_threadsafe(events.put_nowait, event)

        out = _Output(response_format, tools, tool_choice)
        request = self._prepare(prompt, messages, sampling_params(params, sampling), request_id, sink, out)
        cancel = self._start(request, prompt, messages, priority, cloud_allowed, out, route)
        return AsyncRequestHandle(request, cancel, events)

    def _prepare(
        self,
        prompt: str | Sequence[int] | None,
        messages: Sequence[Message] | None,
        params: SamplingParams | None,
        request_id: str | None,
        sink: Sink,
        out: _Output,
    ) -> Request:
        # The engine's own validation, rendering and tokenizing: bad input fails here, before any work.
        return self.engine.prepare(prompt, messages, params, request_id, sink, out)

    def _start(
        self,
        request: Request,
        prompt: str | Sequence[int] | None,
        messages: Sequence[Message] | None,
        priority: int,
        cloud_allowed: bool,
        out: _Output,
        route: planner.Route | None = None,
    ) -> Callable[[Request], None]:
        kind = "chat" if messages is not None else ("text" if isinstance(prompt, str) else "tokens")
        if any(x is not None for x in out):
            kind = "structured"
        plan = self.plan(request, kind, cloud_allowed)
        if route is not None and (route is planner.Route.LOCAL or plan.options[1:]):
            plan = planner.forced(plan, route)
        # The cloud never generates past the request's own max_tokens.
        plan = replace(plan, cloud_max_tokens=min(plan.cloud_max_tokens, request.max_tokens))
        log.debug("%s: %s (%s)", request.request_id, plan.route.value, plan.reason)
        self.backlog.track(request, prompt_on_device=not plan.route.uses_kv)
        if plan.route is planner.Route.LOCAL:
            return self._local(request, plan, priority, prompt, messages, out)
        cloud_call = None
        if plan.route.uses_tokens and plan.cloud_max_tokens > 0:  # 0: token+kv whose answer would come too late
            text = prompt if isinstance(prompt, str) else None
            cloud_call = request_body(
                self.cloud_model, request.params, plan.cloud_max_tokens, prompt=text, messages=messages
            )
        kv_start = None
        if plan.route.uses_kv and self.kv_fetcher is not None:
            kv_start = self.kv_fetcher(request.prompt_tokens, cloud_call is not None)
        session = Session(
            self.engine,
            self.settings,
            self.telemetry,
            request,
            plan,
            cloud_call=cloud_call,
            kv_start=kv_start,
            on_report=self._report,
            clock=self._clock,
        )
        session.start()
        return session.cancel

    def _local(
        self,
        request: Request,
        plan: planner.Plan,
        priority: int,
        prompt: str | Sequence[int] | None,
        messages: Sequence[Message] | None,
        out: _Output,
    ) -> Callable[[Request], None]:
        sink = request.sink

        def observe(event: StreamEvent) -> None:
            sink(event)
            if isinstance(event, FinalEvent):
                self._report(_local_report(plan, event))

        handle = self.engine.submit(
            prompt,
            request.params,
            messages=messages,
            request_id=request.request_id,
            priority=priority,
            on_event=observe,
            response_format=out.response_format,
            tools=out.tools,
            tool_choice=out.tool_choice,
            cloud=False,  # the local route: the engine must not plan it again
        )
        return lambda _request: handle.cancel()

    def _report(self, report: HandoffReport) -> None:
        for listener in list(self.listeners):
            try:
                listener(report)
            except Exception:  # a metrics hiccup must not fail a request
                log.exception("handoff report listener failed")


def _why_local(params: SamplingParams, kind: str, cloud_allowed: bool, settings: CloudSettings) -> str:
    if not cloud_allowed:
        return "the request opted out of the cloud"
    if settings.cloud is None:
        return "no cloud configured"
    if kind == "tokens":
        return "a token prompt cannot go to a cloud"
    if kind == "structured":
        return "structured output runs on the device"
    if params.logit_bias:
        return "a logit bias names this model's token ids"
    return ""


def _without_kv(measured: planner.Measured) -> planner.Measured:
    return replace(measured, kv_available=False)


def _local_report(plan: planner.Plan, event: FinalEvent) -> HandoffReport:
    r = event.result
    return HandoffReport(
        request_id=r.request_id,
        route=plan.route.value,
        reason=plan.reason,
        predicted_ttft_s=plan.predicted_ttft_s,
        local_ttft_s=plan.local_ttft_s,
        ttft_s=r.ttft_s,
        takeover_s=None,
        taken_over_by=None,
        cloud_tokens=0,
        cloud_tokens_kept=0,
        kv_wire_bytes=0,
        cloud_error=None,
        seam_diverged=False,
    )
