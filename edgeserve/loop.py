"""The device side of the engine: one thread owns the backend and runs requests in small units.

A unit is a prefill chunk or one decode step; between two units the loop asks the scheduler what
runs next (``edgeserve.scheduler``). Under ``srpt`` a shorter request displaces the running one at
a token boundary: the displaced sequence stays open while the backend has room, or is parked to
host memory until it runs again (least recently run first). A request's running state
(``edgeserve.running.Running``) belongs to this loop, not to the backend, so it resumes with the
text it would have produced without the pause.

Thread rules: the methods above ``# ---- the loop`` may be called from any thread and take
``_cond``; everything below runs on the loop thread only. Fields marked "loop thread only" are
never touched elsewhere, so the backend needs no locking.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from edgeserve.backend import Backend, SeqId, Step
from edgeserve.errors import BackendError, EdgeserveError, EngineClosedError
from edgeserve.running import UNKNOWN_TOKENS, Request, Running, Where, empty_result, final
from edgeserve.scheduler import Entry, QueueView, Scheduler
from edgeserve.service import ServiceModel
from edgeserve.settings import EngineSettings
from edgeserve.textstream import TextStream
from edgeserve.types import Capabilities, ErrorEvent, FinalEvent, FinishReason

log = logging.getLogger(__name__)
R = TypeVar("R")
#: Called on the loop thread after a request ended naturally: (request, tokens out, service seconds).
NaturalEnd = Callable[[Request, int, float], None]


class EngineLoop:
    """Owns the backend's thread, the admission queue and the running requests."""

    def __init__(
        self,
        backend: Backend,
        settings: EngineSettings,
        *,
        aging_s: float,
        clock: Callable[[], float],
        on_natural_end: NaturalEnd,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.capabilities: Capabilities = backend.capabilities()
        self._clock = clock
        self._on_natural_end = on_natural_end
        self._scheduler: Scheduler[Request] = Scheduler(
            settings.policy, settings.max_queue, aging_s=aging_s, hysteresis=settings.preempt_hysteresis
        )
        #: Measured prefill and decode rates: the scheduler's costs come from them.
        self.service = ServiceModel()
        #: Seconds one park and one restore take (running averages; None until one is measured).
        self._park_s: float | None = None
        self._restore_s: float | None = None
        #: Device seconds per unit of predicted cost, over ended requests (for Retry-After).
        self._seconds_per_cost: float | None = None
        self._seq_ids = itertools.count()
        self._cond = threading.Condition()
        # Guarded by _cond:
        self._control: collections.deque[Callable[[], None]] = collections.deque()
        self._current: Request | None = None
        #: Started requests cancelled while they waited to resume: the loop frees their KV state.
        self._dropped: list[Request] = []
        self._closed = False
        # Loop thread only: open sequences in least-recently-run order, and the parked count.
        self._open: collections.OrderedDict[SeqId, Request] = collections.OrderedDict()
        self._n_parked = 0
        self._thread = threading.Thread(target=self._loop, name="edgeserve-engine", daemon=True)
        self._thread.start()

    # ---- any thread -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a prepared request; ``QueueFullError`` (with an honest Retry-After) when full."""
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            answer = UNKNOWN_TOKENS if request.predicted_tokens is None else request.predicted_tokens
            request.cost = self.service.decode_equivalents(len(request.prompt_tokens), min(answer, request.max_tokens))
            if len(self._scheduler) >= self._scheduler.capacity:
                self._scheduler.retry_after_s = self._drain_estimate_s()
            entry = Entry(
                request.request_id, request.submitted, request, request.priority, request.predicted_tokens, request.cost
            )
            self._scheduler.add(entry)
            self._cond.notify()

    def call(self, fn: Callable[[Backend], R]) -> R:
        """Run ``fn(backend)`` on the loop thread while no request is running; ``fn`` must leave no
        sequence open."""
        future: Future[R] = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.backend))
                except BaseException as exc:
                    future.set_exception(exc)

        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._control.append(job)
            self._cond.notify()
        return future.result()

    def new_seq(self) -> SeqId:
        """A sequence id no request uses (for jobs that drive the backend through ``call``)."""
        return next(self._seq_ids)

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._scheduler)

    @property
    def aging_s(self) -> float:
        with self._cond:
            return self._scheduler.aging_s

    def set_aging(self, aging_s: float) -> None:
        with self._cond:
            self._scheduler.set_aging(aging_s)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._current is not None

    def snapshot(self) -> list[QueueView]:
        with self._cond:
            return self._scheduler.snapshot(self._clock())

    def close(self) -> None:
        """Stop taking requests, fail the waiting ones, cancel the running one, join the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if self._current is not None:
                self._current.cancelled.set()
            self._cond.notify_all()
        self._thread.join()

    def _drain_estimate_s(self) -> float:
        """Seconds a refused client should wait: from the work queued and running, at the measured
        decode rate. Called with ``_cond`` held, only when the queue is full."""
        backlog = self._scheduler.backlog_cost()
        current = self._current
        if current is not None and current.run is not None:
            backlog += current.run.remaining_cost(self.service)
        # Seconds per unit of predicted cost, as measured on requests that ended (it absorbs the
        # predictor's bias and per-request overhead); the decode rate until one has.
        per_unit = self._seconds_per_cost or 1.0 / self.service.decode_tok_s
        return max(1.0, backlog * per_unit)

    def cancel(self, request: Request) -> None:
        """Remove the request if it waits, stop it within a step if it runs (thread-safe)."""
        with self._cond:
            request.cancelled.set()
            # By identity: another request may have reused this id once this one ended.
            waiting = self._scheduler.cancel(request.request_id, request) is not None
            if waiting and request.run is not None:  # preempted: its KV state is the loop's to free
                self._dropped.append(request)
                self._cond.notify()
                return
        if waiting:  # never started: answer it here; a running request is answered by the loop
            request.sink(FinalEvent(empty_result(request, self._clock(), FinishReason.CANCELLED)))

    # ---- the loop (loop thread only) ---------------------------------------------------------

    def _loop(self) -> None:
        try:
            while (work := self._next_work()) is not None:
                if isinstance(work, Request):
                    self._advance(work)
                else:
                    work()
        except BaseException:  # a bug in the loop itself: refuse new work and answer everyone
            log.critical("the engine loop failed; the engine is closed", exc_info=True)
            with self._cond:
                self._closed = True
        finally:
            self._shut_down()

    def _next_work(self) -> Request | Callable[[], None] | None:
        """What the loop does next: a control job, dropped requests to free, or one unit of a
        request (the current one, or one that displaces it). None once the engine is closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._dropped:
                    dropped, self._dropped = self._dropped, []
                    return lambda: self._free_dropped(dropped)
                if self._current is None and self._control:
                    return self._control.popleft()
                now = self._clock()
                if self._current is not None:
                    if self._scheduler.preemptive:
                        self._maybe_preempt(self._current, now)
                    return self._current
                entry = self._scheduler.next(now)
                if entry is not None:
                    self._switch_to(entry.item, now)
                    return entry.item
                self._cond.wait()

    def _maybe_preempt(self, current: Request, now: float) -> None:
        """Displace ``current`` by a shorter waiting request, if the policy says so (``_cond`` held)."""
        run = current.run
        if run is None or run.finish is not None or now - run.slice_started < self.settings.preempt_quantum_s:
            return
        if len(self._open) >= self.capabilities.max_sequences and self._n_parked >= self.settings.max_parked:
            return  # displacing it would mean parking one more than allowed
        remaining = Entry(
            current.request_id,
            current.submitted,
            current,
            current.priority,
            current.predicted_tokens,
            run.remaining_cost(self.service),
        )
        switch_cost = self._switch_s() * self.service.decode_tok_s
        if self._scheduler.preempts(remaining, now, switch_cost=switch_cost) is None:
            return
        self._scheduler.add(remaining, readmit=True)
        entry = self._scheduler.next(now)
        assert entry is not None and entry.item is not current
        run.preemptions += 1
        self._switch_to(entry.item, now)

    def _switch_to(self, request: Request, now: float) -> None:
        self._current = request
        if request.run is not None:
            request.run.slice_started = now

    def _advance(self, request: Request) -> None:
        """One unit of work on ``request``: open or restore it, then one prefill chunk or one decode step."""
        try:
            run = request.run or self._start(request)
            if request.cancelled.is_set():
                run.finish = FinishReason.CANCELLED
            else:
                self._make_open(run)
                self._work(run)
        except Exception as exc:
            self._fail(request, exc)
            return
        if run.finish is not None:
            self._end(run)

    def _start(self, request: Request) -> Running:
        params = request.params
        now = self._clock()
        run = Running(
            request=request,
            seq=next(self._seq_ids),
            sampler=self.backend.sampler(params),
            text=TextStream(params.stop),
            eog=frozenset() if params.ignore_eos else self.capabilities.eog_token_ids,
            started=now,
            pending=request.prompt_tokens[-1],
            slice_started=now,
        )
        request.run = run
        return run

    def _make_open(self, run: Running) -> None:
        """Give ``run`` an open sequence: parking the least recently run other one if all slots are taken."""
        if run.where is Where.OPEN:
            self._open.move_to_end(run.seq)
            return
        while len(self._open) >= self.capabilities.max_sequences:
            victim = next(iter(self._open.values())).run
            assert victim is not None and victim is not run
            self._park(victim)
        request = run.request
        if run.where is Where.NEW:
            # A seed promises reproducible text, which only an identical evaluation path gives.
            run.cached = run.prefilled = self.backend.open(
                run.seq, request.prompt_tokens, reuse=request.params.seed is None
            )
        else:
            assert run.parked is not None
            t0 = self._clock()
            self.backend.restore(run.seq, run.parked)
            took = self._clock() - t0
            run.resume_s += took
            self._restore_s = _average(self._restore_s, took)
            run.parked = None
            self._n_parked -= 1
        run.where = Where.OPEN
        self._open[run.seq] = request

    def _park(self, run: Running) -> None:
        t0 = self._clock()
        blob = self.backend.park(run.seq)
        took = self._clock() - t0
        del self._open[run.seq]
        run.where, run.parked = Where.PARKED, blob
        run.parked_bytes += len(blob)
        run.park_s += took
        self._n_parked += 1
        self._park_s = _average(self._park_s, took)

    def _switch_s(self) -> float:
        """What displacing the running request costs: a park now and a restore later. A restore
        costs about what a park does (a copy each way) until one is measured; nothing before either."""
        park = self._park_s or 0.0
        return park + (self._restore_s if self._restore_s is not None else park)

    def _work(self, run: Running) -> None:
        request = run.request
        prompt = request.prompt_tokens
        t0 = self._clock()
        if run.prefilled < len(prompt) - 1:
            chunk = prompt[run.prefilled : min(run.prefilled + self.settings.prefill_chunk, len(prompt) - 1)]
            self.backend.prefill(run.seq, chunk)
            run.prefilled += len(chunk)
            took = self._clock() - t0
            run.active_s += took
            self.service.observe_prefill(len(chunk), took)
            return
        assert run.pending is not None
        (token,) = self.backend.decode([Step(run.seq, run.pending, run.sampler, request.constraint)])
        now = self._clock()
        run.active_s += now - t0
        first = run.first_at is None
        if first:
            run.first_at = now
            run.prefilled = len(prompt)
        run.accept(token, self.backend.detokenize)
        counted = token not in run.eog
        if not first and counted:  # the decode span: an end-of-generation step is not output
            run.decode_s += now - t0
            self.service.observe_decode(1, now - t0)

    def _end(self, run: Running) -> None:
        """Send the final event, free the sequence, and let the next request run."""
        request = run.request
        run.flush()
        self._free(run)
        now = self._clock()
        request.sink(FinalEvent(run.result(now)))
        with self._cond:
            if self._current is request:
                self._current = None
            if run.finish is not FinishReason.CANCELLED and request.cost > 0 and run.active_s > 0:
                self._seconds_per_cost = _average(self._seconds_per_cost, run.active_s / request.cost)
        if run.finish is FinishReason.STOP:  # a natural end: the answer's real length is known
            self._on_natural_end(request, len(run.generated), run.active_s)

    def _fail(self, request: Request, exc: Exception) -> None:
        if not isinstance(exc, EdgeserveError):  # a backend library failed: map it here, once
            log.exception("backend failed on request %s", request.request_id)
            exc = BackendError(f"{type(exc).__name__}: {exc}")
        if request.run is not None:
            try:
                self._free(request.run)
            except Exception:  # the backend is already failing; the sequence goes with it
                log.debug("could not release sequence %s", request.run.seq, exc_info=True)
                self._open.pop(request.run.seq, None)
        request.sink(ErrorEvent(exc))
        with self._cond:
            if self._current is request:
                self._current = None

    def _free(self, run: Running) -> None:
        """Release everything a request holds on the device side, once. Its handle may live on in
        the caller (with its result), so nothing heavy may stay reachable from it: llama.cpp's
        sampler chain alone keeps a candidates buffer of the whole vocabulary (3 MB for 262k)."""
        if run.where is Where.RELEASED:
            return
        if run.where is Where.OPEN:
            del self._open[run.seq]
            self.backend.release(run.seq)
        elif run.where is Where.PARKED:
            run.parked = None
            self._n_parked -= 1
        run.where = Where.RELEASED
        run.sampler.close()
        if run.request.constraint is not None:
            run.request.constraint.close()

    def _free_dropped(self, dropped: list[Request]) -> None:
        for request in dropped:
            assert request.run is not None
            request.run.finish = FinishReason.CANCELLED
            self._free(request.run)
            request.sink(final(request, self._clock()))

    def _shut_down(self) -> None:
        """Closing: answer everything still here, free every sequence, resolve control jobs."""
        with self._cond:
            current, self._current = self._current, None
            dropped, self._dropped = self._dropped, []
            waiting = []
            while (entry := self._scheduler.next(self._clock())) is not None:
                waiting.append(entry.item)
            control, self._control = list(self._control), collections.deque()
        if current is not None and current.run is not None:
            current.run.finish = FinishReason.CANCELLED
            current.run.flush()
            self._free(current.run)
            current.sink(final(current, self._clock()))
        self._free_dropped(dropped)
        for request in waiting:
            if request.run is not None:
                self._free(request.run)
            request.sink(ErrorEvent(EngineClosedError("the engine was closed before this request ended")))
        for job in control:
            job()  # each job resolves its own future; closing must not strand a caller of call()


def _average(old: float | None, new: float) -> float:
    """A running average that weighs the newest observation 0.2 (the first one stands alone)."""
    return new if old is None else 0.8 * old + 0.2 * new
