"""One handed-off request, run on its own thread: the cloud answers first, the device takes over.

At the start: the device's prefill job (``device.start_prefill``; on a KV route only if the KV
state fails or is late), the cloud's streamed answer (token handoff) and/or the cloud's KV state
(KV handoff). With both, the KV job goes first and the answer is asked for when the KV's first bytes
show that the cloud has prefilled: the cloud's prefix cache then serves the answer's prefill, so the
cloud prefills the prompt once, not twice side by side. Everything that happens then arrives as a
message in one inbox, and this thread alone acts on it:

- a cloud delta goes to the pacer (one delta late: the newest may still change at the seam);
- the cloud's answer is asked for a little at a time (``refill``): when it ended at its cap, the
  device has not taken over and the pacer's queue falls below the low-water mark, the cloud is asked
  to continue (the prompt plus the answer so far, re-tokenized by the cloud as the device
  re-tokenizes it at the seam), so the stream never runs dry while the cloud generates little
  beyond what is shown;
- the first KV blob ready (the device's own or the cloud's) is the takeover: the cloud stream is
  closed, the seam found (``seam.find_seam``), and the device continues from the blob with the
  covered cloud tokens appended to the prompt;
- the device's tokens go through the overlap filter and the pacer to the user;
- a cloud fault only ends the cloud's part: the device's prefill goes on, and it takes over as if the
  cloud had stopped there. With greedy sampling the text is then the device-only text.

Stop sequences are checked over the whole answer (one ``TextStream`` across both halves);
``max_tokens`` counts the cloud's covered tokens; usage counts both halves. With penalties the
covered tokens are forced as the device's first answer tokens (``device.ForcedPrefix``), so the
device's penalty history holds the cloud's tokens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from edgeserve.engine import Engine, Handle
from edgeserve.handles import PrefillJob
from edgeserve.handoff import device
from edgeserve.handoff.cloud import CloudDelta, CloudEnd, CloudFailed, CloudMessage, CloudStream
from edgeserve.handoff.pacer import Pacer
from edgeserve.handoff.planner import Plan
from edgeserve.handoff.seam import OverlapFilter, find_seam
from edgeserve.handoff.telemetry import Telemetry
from edgeserve.running import Request
from edgeserve.settings import CloudSettings
from edgeserve.textstream import TextStream
from edgeserve.types import ErrorEvent, FinalEvent, FinishReason, GenerationResult, StreamEvent, TokenEvent

log = logging.getLogger("edgeserve.handoff")


#: A KV state later than this many times its predicted arrival, plus this many seconds, is given up
#: on as the device's only source: the device starts its own prefill (the KV may still win the race).
KV_LATE_FACTOR = 3.0
KV_LATE_S = 2.0


@dataclass(frozen=True)
class CloudTokenEvent(TokenEvent):
    """Text that came from the cloud (``edgeserve chat --cloud`` shows it dimmed)."""


@dataclass(frozen=True)
class HandoffReport:
    """What a handed-off request did, for metrics and benchmarks."""

    request_id: str
    route: str
    reason: str
    predicted_ttft_s: float
    local_ttft_s: float
    ttft_s: float | None
    #: Seconds from the start to the device taking over (None: it never did).
    takeover_s: float | None
    #: ``local`` (the device's own prefill), ``kv`` (the cloud's KV state), ``cloud`` (the cloud
    #: finished the answer) or None (it ended before any).
    taken_over_by: str | None
    #: Tokens the cloud sent, and those of them kept in the answer.
    cloud_tokens: int
    cloud_tokens_kept: int
    kv_wire_bytes: int
    cloud_error: str | None
    seam_diverged: bool
    #: Seconds from the start to the cloud's KV state's first bytes (the cloud had prefilled).
    kv_started_s: float | None = None
    #: Seconds from the start to the whole KV state's arrival (None: none came).
    kv_arrived_s: float | None = None
    #: Answers asked of the cloud: the first and its continuations (``refill``), and the tokens
    #: asked for in all (an answer closed at the takeover may have generated some never received).
    cloud_requests: int = 0
    cloud_tokens_asked: int = 0


@dataclass(frozen=True)
class _DeviceReady:
    future: concurrent.futures.Future[bytes]


@dataclass(frozen=True)
class KvArrived:
    """The cloud's KV state: a blob, or why there is none."""

    blob: bytes | None
    wire_bytes: int
    error: str | None = None


@dataclass(frozen=True)
class KvStarted:
    """The cloud's KV state started to arrive: the cloud has prefilled the prompt."""


@dataclass(frozen=True)
class _DeviceEvent:
    event: StreamEvent


class _Cancel:
    pass


Message = CloudMessage | _DeviceReady | KvStarted | KvArrived | _DeviceEvent | _Cancel
#: Starts a KV fetch that delivers at most one ``KvStarted`` and then one ``KvArrived``; returns its
#: closer.
KvStarter = Callable[[Callable[[KvStarted | KvArrived], None]], Callable[[], None]]


@dataclass(frozen=True)
class Piece:
    text: str
    cloud: bool
    token_ids: tuple[int, ...] = ()


class Session:
    def __init__(
        self,
        engine: Engine,
        settings: CloudSettings,
        telemetry: Telemetry,
        request: Request,
        plan: Plan,
        *,
        cloud_call: tuple[str, dict[str, Any]] | None,
        kv_start: KvStarter | None,
        on_report: Callable[[HandoffReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine, self._settings, self._telemetry = engine, settings, telemetry
        self._request, self._plan = request, plan
        self._cloud_call, self._kv_start, self._on_report = cloud_call, kv_start, on_report
        self._clock = clock
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._pacer: Pacer[Piece] = Pacer(1.0 / max(engine.service.decode_tok_s, 1e-3))
        self._text = TextStream(request.params.stop)
        self._output = ""
        self._received: list[str] = []
        self._held: str | None = None  # the newest cloud delta, not yet paced
        self._committed = ""  # cloud text released to the user
        self._cloud: CloudStream | None = None
        self._kv_close: Callable[[], None] | None = None
        self._job: PrefillJob | None = None
        self._device: Handle | None = None
        self._forced = False  # the covered cloud tokens are the device's first answer tokens
        self._overlap = OverlapFilter("")
        self._phase = "cloud"  # cloud -> device | cloud_final -> ended
        self._cloud_finish: str | None = None
        self._cloud_error: str | None = None
        self._kv_failed = False
        self._device_result: GenerationResult | None = None
        self._finish_override: FinishReason | None = None
        self._cloud_tokens = self._kept = self._kv_bytes = 0
        # Top-ups (``refill``): only for a text prompt without penalties (the orchestrator plans so).
        self._refill = plan.refill if cloud_call is not None and "prompt" in cloud_call[1] else None
        #: Cloud tokens received when its last answer ended at its cap (it may be continued); None
        #: while an answer streams or none may follow.
        self._idle_received: int | None = None
        self._continue_at: float | None = None  # when the pending continuation was asked for
        self._answer_timed = False
        self._cloud_requests = self._cloud_asked = 0
        self._started = self._first = self._last = 0.0
        self._first_set = False
        self._takeover_at: float | None = None
        self._local_at: float | None = None  # KV routes: when to start the device's own prefill
        self._taken_by: str | None = None
        self._kv_started_at: float | None = None
        self._kv_arrived_at: float | None = None
        self._seam_tokens = 0  # covered cloud tokens the device evaluates after the takeover
        self._load_timed = False
        self._thread = threading.Thread(target=self._run, name=f"handoff-{request.request_id}", daemon=True)

    # ---- the caller's side ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def cancel(self, _request: Request | None = None) -> None:
        self._inbox.put(_Cancel())

    # ---- the session thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._begin()
            while self._phase != "ended":
                wake = [t for t in (self._pacer.next_at(), self._local_at) if t is not None]
                timeout = max(min(wake) - self._clock(), 0.0) if wake else None
                try:
                    message: Message | None = self._inbox.get(timeout=timeout)
                except queue.Empty:
                    message = None
                if message is not None:
                    self._on(message)
                if self._local_at is not None and self._clock() >= self._local_at:
                    self._start_local()  # the KV state is late: the device starts on its own
                    self._start_cloud()
                self._release(self._clock())
                self._top_up()
                if self._ready_to_finish():
                    self._finish()
        except BaseException as exc:
            log.warning("%s: handoff failed: %s", self._request.request_id, exc)
            self._phase = "ended"
            self._request.sink(ErrorEvent(exc if isinstance(exc, Exception) else RuntimeError(str(exc))))
        finally:
            self._stop_all()

    def _begin(self) -> None:
        self._started = self._clock()
        # A KV route leaves the device's CPU to loading the cloud's state (decoding the wire, restoring)
        # and starts the device's own prefill only if the state fails or is late: past three times its
        # predicted arrival and 2 s. (Both at once would halve each on a device with one core to spare.)
        if self._plan.route.uses_kv:
            takeover = next((o.takeover_s for o in self._plan.options if o.route is self._plan.route), None)
            self._local_at = self._started + KV_LATE_FACTOR * (takeover or 0.0) + KV_LATE_S
        else:
            self._start_local()
        if self._kv_start is not None:
            self._kv_close = self._kv_start(self._inbox.put)
        else:
            self._start_cloud()

    def _start_cloud(self) -> None:
        """Ask the cloud for its answer (once; token routes)."""
        if self._cloud_call is not None and self._cloud is None and self._phase == "cloud":
            self._ask_cloud(*self._cloud_call)

    def _ask_cloud(self, path: str, body: dict[str, Any]) -> None:
        """Stream one answer from the cloud (the first, or a continuation), counted for the report."""
        self._cloud = CloudStream(self._settings, path, body, self._inbox.put, clock=self._clock)
        self._cloud_requests += 1
        self._cloud_asked += int(body["max_tokens"])

    def _start_local(self) -> None:
        self._local_at = None
        if self._job is None and self._phase == "cloud":
            self._job = device.start_prefill(self._engine, self._request.prompt_tokens)
            self._job.future.add_done_callback(lambda f: self._inbox.put(_DeviceReady(f)))

    def _on(self, message: Message) -> None:
        if isinstance(message, CloudDelta | CloudEnd | CloudFailed):
            self._on_cloud(message)
        elif isinstance(message, _DeviceReady):
            self._on_local_blob(message.future)
        elif isinstance(message, KvStarted):
            self._kv_started_at = self._clock()
            self._start_cloud()
        elif isinstance(message, KvArrived):
            self._on_kv(message)
        elif isinstance(message, _DeviceEvent):
            self._on_device(message.event)
        else:
            self._cancelled()

    def _on_cloud(self, message: CloudMessage) -> None:
        if self._phase != "cloud":
            return
        if isinstance(message, CloudDelta):
            self._time_cloud(message.at)
            self._received.append(message.text)
            if self._held is not None:
                self._pacer.push(Piece(self._held, cloud=True))
            self._held = message.text
        elif isinstance(message, CloudEnd):
            self._cloud_finish = message.finish_reason
            if message.finish_reason != "length":
                self._cloud_completes()
            elif self._refill is not None:
                received = self._count("".join(self._received))
                if received >= self._request.max_tokens:
                    self._cloud_completes()
                else:
                    self._idle_received = received  # ``_top_up`` asks for more when the queue runs low
            elif self._plan.cloud_max_tokens >= self._request.max_tokens:
                self._cloud_completes()
        else:
            self._cloud_error = str(message.error)
            self._telemetry.cloud_failed()
            log.info("%s: the cloud failed, the device goes on alone: %s", self._request.request_id, message.error)

    def _time_cloud(self, at: float) -> None:
        """Telemetry from an answer's first delta."""
        if self._continue_at is not None:
            self._telemetry.continued(at - self._continue_at)
            self._continue_at = None
        elif not self._answer_timed:
            self._answer_timed = True
            # With the KV job first (token+kv) its first bytes timed the cloud's prefill; this answer
            # was asked for later and found the prompt cached: no measure of the prefill rate.
            if self._kv_start is None:
                self._telemetry.cloud_ttft(len(self._request.prompt_tokens), at - self._started)
            elif self._kv_started_at is not None:
                self._telemetry.answer_after_kv(at - self._kv_started_at)

    def _count(self, text: str) -> int:
        return len(self._engine.tokenize(text, add_bos=False)) if text else 0

    def _top_up(self) -> None:
        """Ask the cloud to continue its answer when the pacer's queue runs low (``refill``)."""
        received = self._idle_received
        if self._refill is None or received is None or self._phase != "cloud" or self._cloud_call is None:
            return
        tokens = self._refill.ask(len(self._pacer), received, self._request.max_tokens - received)
        if tokens <= 0:
            return
        # The held delta stays held: the continuation's first delta releases it, as any next delta.
        path, body = self._cloud_call
        body = {**body, "prompt": str(body["prompt"]) + "".join(self._received), "max_tokens": tokens}
        self._idle_received = None
        self._continue_at = self._clock()
        self._ask_cloud(path, body)

    def _cloud_completes(self) -> None:
        """The cloud's answer is whole (it ended, not at the planner's cap): show it, stop the device."""
        if self._held is not None:
            self._pacer.push(Piece(self._held, cloud=True))
            self._held = None
        self._kept = self._count("".join(self._received))
        self._cloud_tokens = self._kept
        self._phase, self._taken_by = "cloud_final", "cloud"
        if self._cloud_finish == "length":
            self._finish_override = FinishReason.LENGTH
        if self._job is not None:
            self._job.cancel()
        if self._kv_close is not None:
            self._kv_close()

    def _on_local_blob(self, future: concurrent.futures.Future[bytes]) -> None:
        if self._phase != "cloud" or future.cancelled():
            return
        error = future.exception()
        if error is not None:
            raise error
        self._takeover(future.result(), "local")

    def _on_kv(self, message: KvArrived) -> None:
        self._kv_bytes = message.wire_bytes
        self._kv_arrived_at = self._clock() if message.blob is not None else None
        if message.blob is None:
            self._kv_failed = True
            self._start_local()
            self._start_cloud()
            log.info("%s: no KV from the cloud (%s); the device prefills", self._request.request_id, message.error)
            return
        if self._phase != "cloud":
            return
        try:
            self._takeover(message.blob, "kv")
        except Exception as exc:
            self._kv_failed = True
            self._phase = "cloud"
            log.warning("%s: the cloud's KV state was refused (%s)", self._request.request_id, exc)
            self._start_local()
            return
        if self._job is not None:
            self._job.cancel()

    def _takeover(self, blob: bytes, source: str) -> None:
        """Close the cloud, find the seam, and start the device's continuation from ``blob``."""
        if self._cloud is not None:
            self._cloud.close()
        received = "".join(self._received)
        seam = find_seam(
            received,
            self._committed,
            lambda text: self._engine.tokenize(text, add_bos=False),
            self._engine.backend.detokenize,
        )
        self._cloud_tokens = self._count(received)
        self._pacer.drain()  # cloud text not shown yet: re-queued below up to the covered part only
        self._held = None
        for piece in _split(seam.to_show, self._received, len(self._committed)):
            self._pacer.push(Piece(piece, cloud=True))
        self._forced = bool(seam.tokens) and device.has_penalties(self._request.params)
        # Forced tokens come back as device text: covered text, which the pacer already has.
        self._overlap = OverlapFilter(seam.covered + seam.overlap if self._forced else seam.overlap)
        self._kept = self._seam_tokens = len(seam.tokens)
        self._takeover_at, self._taken_by, self._phase = self._clock(), source, "device"
        self._local_at = None  # the device no longer needs its own prefill
        left = self._request.max_tokens - len(seam.tokens)
        if left <= 0:
            self._finish_override = FinishReason.LENGTH
            return
        params = replace(self._request.params, max_tokens=self._request.max_tokens if self._forced else left)
        tokens = self._request.prompt_tokens if self._forced else [*self._request.prompt_tokens, *seam.tokens]
        inbox = self._inbox

        def forward(event: StreamEvent) -> None:
            inbox.put(_DeviceEvent(event))

        self._device = device.continue_from(
            self._engine,
            tokens,
            params,
            blob,
            forward,
            f"{self._request.request_id}-device",
            forced=seam.tokens if self._forced else (),
        )

    def _on_device(self, event: StreamEvent) -> None:
        if isinstance(event, TokenEvent):
            if not self._load_timed:
                self._load_timed = True
                self._time_load()
            if self._phase == "cancelling":
                return
            text = self._overlap.feed(event.text)
            if text:
                self._pacer.push(Piece(text, cloud=False, token_ids=event.token_ids), paced=False)
        elif isinstance(event, FinalEvent):
            self._device_result = event.result
        else:
            raise event.error

    def _time_load(self) -> None:
        """The device's first token after the takeover: the blob's restore took the time since,
        less the covered cloud tokens' evaluation and one decode step (as the service model
        predicts them). The planner's KV routes wait for this restore."""
        if self._takeover_at is None:
            return
        service, n, k = self._engine.service, len(self._request.prompt_tokens), self._seam_tokens
        rest = 0.0 if self._forced else service.prefill_s(k, n)  # forced: the first token is one of them
        seconds = self._clock() - self._takeover_at - rest - 1.0 / service.decode_tok_s
        self._telemetry.restore(n, max(seconds, 0.0))

    def _cancelled(self) -> None:
        self._pacer.drain()
        self._finish_override = FinishReason.CANCELLED
        if self._device is not None:
            self._device.cancel()
        self._phase = "cancelling"

    def _release(self, now: float) -> None:
        for piece in self._pacer.pop_due(now):
            if piece.cloud:
                self._committed += piece.text
            out = self._text.push(piece.text.encode())
            if out:
                self._emit(out, piece, now)
            if self._text.stopped:
                self._pacer.drain()
                self._finish_override = FinishReason.STOP
                if self._device is not None:
                    self._device.cancel()
                break

    def _emit(self, text: str, piece: Piece, now: float) -> None:
        if not self._first_set:
            self._first, self._first_set = now, True
        self._last = now
        self._output += text
        kind = CloudTokenEvent if piece.cloud else TokenEvent
        self._request.sink(kind(text, piece.token_ids))

    def _ready_to_finish(self) -> bool:
        if len(self._pacer):
            return False
        if self._finish_override is not None and self._finish_override is not FinishReason.CANCELLED:
            return True
        if self._phase == "cancelling":
            return self._device is None or self._device_result is not None
        return self._phase == "cloud_final" or self._device_result is not None

    def _finish(self) -> None:
        tail = self._text.finish()
        now = self._clock()
        if tail:
            self._emit(tail, Piece(tail, cloud=False), now)
        device_result = self._device_result
        reason = self._finish_override
        if reason is None:
            reason = device_result.finish_reason if device_result is not None else FinishReason.STOP
        device_tokens = device_result.completion_tokens if device_result is not None else 0
        n_out = device_tokens if self._forced and device_result is not None else self._kept + device_tokens
        span = self._last - self._first
        result = GenerationResult(
            request_id=self._request.request_id,
            text=self._output,
            prompt_tokens=len(self._request.prompt_tokens),
            completion_tokens=n_out,
            finish_reason=reason,
            ttft_s=self._first - self._started if self._first_set else None,
            queue_wait_s=0.0,
            total_s=now - self._started,
            decode_tok_s=(n_out - 1) / span if n_out > 1 and span > 0 else None,
            chat_template=self._request.chat_template,
        )
        self._phase = "ended"
        self._request.sink(FinalEvent(result))
        if self._on_report is not None:
            self._on_report(self._report(result))

    def _report(self, result: GenerationResult) -> HandoffReport:
        plan = self._plan
        return HandoffReport(
            request_id=result.request_id,
            route=plan.route.value,
            reason=plan.reason,
            predicted_ttft_s=plan.predicted_ttft_s,
            local_ttft_s=plan.local_ttft_s,
            ttft_s=result.ttft_s,
            takeover_s=None if self._takeover_at is None else self._takeover_at - self._started,
            taken_over_by=self._taken_by,
            cloud_tokens=self._cloud_tokens,
            cloud_tokens_kept=self._kept,
            kv_wire_bytes=self._kv_bytes,
            cloud_error=self._cloud_error,
            seam_diverged=self._overlap.diverged,
            kv_started_s=None if self._kv_started_at is None else self._kv_started_at - self._started,
            kv_arrived_s=None if self._kv_arrived_at is None else self._kv_arrived_at - self._started,
            cloud_requests=self._cloud_requests,
            cloud_tokens_asked=self._cloud_asked,
        )

    def _stop_all(self) -> None:
        if self._cloud is not None:
            self._cloud.close()
        if self._kv_close is not None:
            self._kv_close()
        if self._job is not None:
            self._job.cancel()
        if self._device is not None and self._device_result is None:
            with contextlib.suppress(Exception):
                self._device.cancel()


def _split(text: str, pieces: list[str], start: int) -> list[str]:
    """``text`` (the received cloud text from offset ``start``) cut where the cloud's deltas were cut,
    so the pacer shows it at the same grain."""
    out: list[str] = []
    offset = 0
    for piece in pieces:
        end = offset + len(piece)
        lo, hi = max(offset, start), min(end, start + len(text))
        if hi > lo:
            out.append(text[lo - start : hi - start])
        offset = end
    return out
