"""The device side of the engine: one thread owns the backend and runs a batch of requests.

Each turn of the loop is one unit of work on the batch: a chunk of prompt tokens (of one request,
or of several short ones), then one decode step of every request past its prefill in a single
backend call (continuous batching: requests join and leave the batch at any token). Between two
turns the loop asks the scheduler (``edgeserve.scheduler``) what runs: free places in the batch are
filled in the policy's order (shortest predicted first under ``sjf``/``srpt``), and under ``srpt`` a
shorter arrival displaces the longest-remaining request of a full batch at a token boundary, and a
batch the width rule has narrowed sheds the requests with the most work left. A displaced sequence
stays open while the backend has room, or is parked to host memory until it runs again (least
recently run first). How wide the batch may be is ``edgeserve.width.BatchWidth``'s call. A
request's running state (``edgeserve.running.Running``) belongs to this loop, not to the backend,
so it resumes with the text it would have produced without the pause.

Thread rules: the methods above ``# ---- the loop`` may be called from any thread and take
``_cond``; everything below runs on the loop thread only. Fields marked "loop thread only" are
never touched elsewhere, so the backend needs no locking.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from edgeserve.backend import Backend, SeqId, Step
from edgeserve.errors import BackendError, EdgeserveError, EngineClosedError, KVCacheFullError, KVStateError
from edgeserve.running import UNKNOWN_TOKENS, Request, Running, Where, empty_result, final
from edgeserve.scheduler import SHORT_TOKENS, Entry, QueueView, Scheduler
from edgeserve.service import ServiceModel
from edgeserve.settings import EngineSettings
from edgeserve.textstream import TextStream
from edgeserve.types import Capabilities, ErrorEvent, FinalEvent, FinishReason
from edgeserve.width import WORK_HORIZON, BatchWidth

#: Under ``srpt``, a prompt's chunks wait while a request at least this many times shorter (its
#: whole predicted answer against the prompt's remaining work) is decoding beside it.
YIELD_RATIO = 4.0

log = logging.getLogger(__name__)
R = TypeVar("R")
#: Called on the loop thread after a request ended naturally: (request, tokens out, service seconds).
NaturalEnd = Callable[[Request, int, float], None]


class EngineLoop:
    """Owns the backend's thread, the admission queue and the running batch."""

    def __init__(
        self,
        backend: Backend,
        settings: EngineSettings,
        *,
        aging_s: float,
        clock: Callable[[], float],
        on_natural_end: NaturalEnd,
        fixed_width: bool = False,
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
        caps = self.capabilities
        self.width = BatchWidth(
            min(caps.max_batch, caps.max_sequences), floor_tok_s=settings.parallel_floor_tok_s, fixed=fixed_width
        )
        #: Seconds one park and one restore take (running averages; None until one is measured).
        self._park_s: float | None = None
        self._restore_s: float | None = None
        #: Device seconds per unit of predicted cost, over ended requests (for Retry-After).
        self._seconds_per_cost: float | None = None
        self._seq_ids = itertools.count()
        self._cond = threading.Condition()
        # Guarded by _cond:
        self._control: collections.deque[Callable[[], None]] = collections.deque()
        #: The requests that get the device, in the order they joined (at most ``width.limit()``).
        self._batch: list[Request] = []
        #: Started requests cancelled while they waited to resume: the loop frees their KV state.
        self._dropped: list[Request] = []
        self._closed = False
        # Loop thread only: open sequences in least-recently-run order, and the parked count.
        self._open: collections.OrderedDict[SeqId, Request] = collections.OrderedDict()
        self._n_parked = 0
        #: The batch width the KV memory held when it last filled up (None: no limit). Guarded by
        #: _cond; a request that leaves frees cells, and lifts it.
        self._kv_width: int | None = None
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
            self._scheduler.add(_entry(request, request.cost))
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
            return bool(self._batch)

    @property
    def running(self) -> int:
        """Requests in the batch now."""
        with self._cond:
            return len(self._batch)

    def snapshot(self) -> list[QueueView]:
        with self._cond:
            return self._scheduler.snapshot(self._clock())

    def close(self) -> None:
        """Stop taking requests, fail the waiting ones, cancel the running ones, join the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for request in self._batch:
                request.cancelled.set()
            self._cond.notify_all()
        self._thread.join()

    def backlog_s(self) -> float:
        """Seconds of work queued and running, at the measured rate (0 when idle; any thread)."""
        with self._cond:
            return self._work_s()

    def _drain_estimate_s(self) -> float:
        """Seconds a refused client should wait: from the work queued and running, at the measured
        rate. Called with ``_cond`` held, only when the queue is full."""
        return max(1.0, self._work_s())

    def _work_s(self) -> float:
        backlog = self._scheduler.backlog_cost()
        for request in self._batch:
            # Taken from the queue but not started yet (the loop starts it outside the lock): its
            # queued cost, so the work does not vanish from the count for that moment.
            backlog += self._remaining(request)
        # Seconds per unit of predicted cost, as measured on requests that ended (it absorbs the
        # predictor's bias, per-request overhead and the batching gain); the decode rate until then.
        per_unit = self._seconds_per_cost or 1.0 / self.service.decode_tok_s
        return backlog * per_unit

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
                if isinstance(work, list):
                    self._turn(work)
                else:
                    work()
        except BaseException:  # a bug in the loop itself: refuse new work and answer everyone
            log.critical("the engine loop failed; the engine is closed", exc_info=True)
            with self._cond:
                self._closed = True
        finally:
            self._shut_down()

    def _next_work(self) -> list[Request] | Callable[[], None] | None:
        """What the loop does next: a control job, dropped requests to free, or a turn of the batch
        (filled from the queue, and displaced by shorter arrivals). None once the engine is closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._dropped:
                    dropped, self._dropped = self._dropped, []
                    return lambda: self._free_dropped(dropped)
                if not self._batch and self._control:
                    return self._control.popleft()
                now = self._clock()
                limit = self._limit(now)
                while len(self._batch) < limit and (entry := self._scheduler.next(now)) is not None:
                    self._join(entry.item, now)
                if self._scheduler.preemptive and self._batch:
                    self._shed(now, limit)
                    self._maybe_preempt(now, limit)
                if self._batch:
                    return list(self._batch)
                self._cond.wait()

    def _limit(self, now: float) -> int:
        """How wide the batch may be now: the width rule's, and no wider than the KV memory held
        when it last filled up (``_cond`` held)."""
        limit = self.width.limit(now, *self._present())
        return limit if self._kv_width is None else max(1, min(limit, self._kv_width))

    def _present(self) -> tuple[list[float], int]:
        """What the width rule weighs, where the policy runs the shortest first (nothing under
        ``fcfs``): the remaining work of the batch and of the shortest waiting requests, and how
        many requests present are predicted short, Clairvoyant's class: fewer than
        ``SHORT_TOKENS`` answer tokens, the prediction doubled each time an answer outgrows it
        (``_cond`` held)."""
        if self._scheduler.policy == "fcfs":
            return [], 0
        work: list[float] = []
        short = 0
        for r in self._batch:
            work.append(self._remaining(r))
            predicted = r.predicted_tokens if r.run is None else r.run.predicted_answer()
            short += predicted is not None and predicted < SHORT_TOKENS
        waiting, waiting_short = self._scheduler.present(WORK_HORIZON * self.width.most)
        return work + waiting, short + waiting_short

    def _remaining(self, request: Request) -> float:
        """A request's work left, in decode-token equivalents: its queued cost until it starts."""
        return request.cost if request.run is None else request.run.remaining_cost(self.service)

    def _join(self, request: Request, now: float) -> None:
        self._batch.append(request)
        if request.run is not None:
            request.run.slice_started = now

    def _shed(self, now: float, limit: int) -> None:
        """Under a preemptive policy, narrow a batch that is wider than its limit (the width rule
        narrowed it for the work present): the requests with the most work left go back to the
        queue until it fits, and resume as places free up (``_cond`` held).

        Where the answers present are about as long as one another, decoding them all together
        ends them all together, late; in narrower waves the first ones end much sooner and the
        last barely later. A request that has not had its quantum yet, or has waited past the
        aging bound, stays. A displaced sequence keeps its KV cells while the backend has room,
        so a later resume costs nothing."""
        if len(self._batch) <= limit:
            return
        candidates = [entry for entry in self._displaceable(now) if not self._scheduler.aged(entry, now)]
        candidates.sort(key=lambda entry: entry.effective_cost, reverse=True)  # stable: ties keep batch order
        for victim in candidates[: len(self._batch) - limit]:
            self._displace(victim)

    def _maybe_preempt(self, now: float, limit: int) -> None:
        """Displace the longest-remaining request of a full batch (``limit`` wide, this turn) by a
        shorter waiting one, if the policy says so (``_cond`` held). One displacement per turn:
        the next turn looks again."""
        if len(self._batch) < limit:
            return
        if len(self._open) >= self.capabilities.max_sequences and self._n_parked >= self.settings.max_parked:
            return  # displacing one would mean parking one more than allowed
        candidates = self._displaceable(now)
        if not candidates:
            return
        victim = max(candidates, key=lambda entry: entry.effective_cost)
        switch_cost = self._switch_s() * self.service.decode_tok_s
        if self._scheduler.preempts(victim, now, switch_cost=switch_cost) is None:
            return
        self._displace(victim)
        entry = self._scheduler.next(now)
        assert entry is not None and entry.item is not victim.item
        self._join(entry.item, now)

    def _displaceable(self, now: float) -> list[Entry[Request]]:
        """The batch's started, unfinished requests that have had their quantum, as queue entries
        at their remaining cost: what srpt may displace (``_cond`` held)."""
        quantum = self.settings.preempt_quantum_s
        return [
            _entry(request, run.remaining_cost(self.service))
            for request in self._batch
            if (run := request.run) is not None and run.finish is None and now - run.slice_started >= quantum
        ]

    def _displace(self, victim: Entry[Request]) -> None:
        """Send a running request back to the queue; its sequence stays open until room is
        needed (``_cond`` held)."""
        assert victim.item.run is not None
        victim.item.run.preemptions += 1
        self._batch.remove(victim.item)
        self._scheduler.add(victim, readmit=True)

    def _turn(self, batch: list[Request]) -> None:
        """One unit of work on the batch: start and open what needs it, a chunk's worth of prompt
        tokens (shared by the requests still prefilling, the least work left first: a burst of
        short prompts joins the decodes in one turn, not one a turn), then one decode step of every
        request past its prefill, in one backend call."""
        ready: list[Running] = []
        for request in batch:
            try:
                run = request.run or self._start(request)
                if request.cancelled.is_set():
                    run.finish = FinishReason.CANCELLED
                elif self._open_for_turn(run, batch):
                    ready.append(run)
            except Exception as exc:
                self._fail(request, exc)
                continue
            if run.finish is not None:
                self._end(run)
        prefilling = [run for run in ready if run.prefilled < len(run.request.prompt_tokens) - 1]
        decoding = [run for run in ready if run.prefilled >= len(run.request.prompt_tokens) - 1]
        budget = self._chunk(bool(decoding))
        hold_from = self._hold_from(decoding)
        now, aging_s = self._clock(), self.aging_s
        for run in sorted(prefilling, key=lambda run: run.remaining_cost(self.service)):
            if budget <= 0:
                break
            if run.where is not Where.OPEN:  # parked to make KV room for an earlier chunk
                continue
            if self._yields(run, hold_from, now - run.request.submitted < aging_s):
                continue
            chunk = min(budget, len(run.request.prompt_tokens) - 1 - run.prefilled)
            self._guarded([run], functools.partial(self._prefill, run, chunk=chunk))
            budget -= chunk
        decoding = [run for run in decoding if run.where is Where.OPEN and run.finish is None]
        exports = [run for run in decoding if run.request.export is not None]
        for run in exports:
            self._guarded([run], functools.partial(self._export, run))
        steps = [run for run in decoding if run.request.export is None]
        if steps:
            self._guarded(steps, functools.partial(self._decode, steps))

    def _hold_from(self, decoding: list[Running]) -> float | None:
        """The remaining work (decode-token equivalents) from which a prompt yields to the
        decodes this turn: ``YIELD_RATIO`` times the shortest answer decoding, taken whole (what it
        generated plus what it is still predicted to). None when no prompt yields."""
        if not self._scheduler.preemptive or not decoding:
            return None
        return YIELD_RATIO * min(run.predicted_answer() for run in decoding)

    def _yields(self, run: Running, hold_from: float | None, young: bool) -> bool:
        """Whether ``run``'s prompt waits this turn for a much shorter request's answer.

        A prompt chunk beside the decodes is the one part of a turn that batching does not share:
        every decoding request waits for it. Under SRPT a request with far less work should not
        wait for a long one's prompt, so the prompt yields while a request ``YIELD_RATIO`` times
        shorter decodes. It waits at most that short answer's life: the test uses the whole
        predicted answer, not what is left of it (a long answer near its end holds no prompt
        back), and an answer that outlives its prediction is predicted longer (doubling), so a
        mispredicted one soon stops holding prompts back. Aging bounds it too: a request that has
        waited ``aging_s`` (not ``young``) yields to nothing."""
        return hold_from is not None and young and run.remaining_cost(self.service) >= hold_from

    def _chunk(self, beside_decodes: bool) -> int:
        """Prompt tokens a turn prefills: fewer while other requests wait for their next token, so
        a long prompt does not stall everyone's stream for a whole chunk."""
        chunk = self.settings.prefill_chunk
        return max(16, chunk // 4) if beside_decodes else chunk

    def _guarded(self, runs: list[Running], work: Callable[[], None]) -> None:
        """Run backend work for ``runs``; a failure fails them (only them); ended ones end. When the
        KV memory is full, a sequence is parked to make room (perhaps one of ``runs``, which ``work``
        must read, as ``_decode`` reads its list) and the work runs again."""
        while True:
            try:
                work()
            except KVCacheFullError as exc:
                if self._make_room(runs):
                    continue
                for run in runs:
                    self._fail(run.request, exc)
                return
            except Exception as exc:
                for run in runs:
                    self._fail(run.request, exc)
                return
            break
        for run in runs:
            if run.finish is not None:
                self._end(run)

    def _open_for_turn(self, run: Running, batch: list[Request]) -> bool:
        """``_make_open``, with room made in a full KV memory: sequences outside the batch are
        parked first; False when the batch's own sequences fill it (``run`` goes back to the queue
        until a request leaves)."""
        while True:
            try:
                self._make_open(run, batch)
                return True
            except KVCacheFullError:
                outside = self._outside(batch)
                if outside is not None:
                    self._park(outside)
                    continue
                if not self._open:  # alone, it would never fit
                    raise
                self._requeue(run, len(self._open))
                return False

    def _outside(self, batch: list[Request]) -> Running | None:
        """The least recently run open sequence that is not in ``batch`` (a displaced one)."""
        return next((r.run for r in self._open.values() if r not in batch and r.run is not None), None)

    def _make_room(self, runs: list[Running]) -> bool:
        """The KV memory is full: park one open sequence to free its cells. One outside the batch
        first (least recently run), else the request in the batch with the most work left but one
        of ``runs`` (the work at hand goes on); it goes back to the queue and resumes where it
        stopped, and the batch stays this narrow until a request leaves. False: nothing to park."""
        with self._cond:
            batch = list(self._batch)
        outside = self._outside(batch)
        if outside is not None:
            self._park(outside)
            return True
        keep = min(runs, key=lambda run: run.remaining_cost(self.service), default=None)
        candidates = [run for r in batch if (run := r.run) is not None and run.where is Where.OPEN and run is not keep]
        if not candidates:
            return False
        victim = max(candidates, key=lambda run: run.remaining_cost(self.service))
        victim.preemptions += 1
        self._requeue(victim, len(batch) - 1)
        self._park(victim)
        if victim in runs:
            runs.remove(victim)
        return True

    def _requeue(self, run: Running, width: int) -> None:
        """Put a started request back in the queue for want of KV memory, and hold the batch to
        ``width`` until a request leaves (``_cond`` is taken here)."""
        request = run.request
        with self._cond:
            if request in self._batch:
                self._batch.remove(request)
            self._kv_width = max(1, width)
            self._scheduler.add(_entry(request, run.remaining_cost(self.service)), readmit=True)

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

    def _make_open(self, run: Running, batch: list[Request]) -> None:
        """Give ``run`` an open sequence: parking the least recently run one outside ``batch`` if
        all the backend's slots are taken."""
        if run.where is Where.OPEN:
            self._open.move_to_end(run.seq)
            return
        while len(self._open) >= self.capabilities.max_sequences:
            victim = next((r.run for r in self._open.values() if r not in batch), None)
            if victim is None:
                raise BackendError("no sequence slot is free for this request")
            self._park(victim)
        request = run.request
        if run.where is Where.NEW and request.kv_state is not None:
            self._open_from_state(run, request.kv_state)
        elif run.where is Where.NEW:
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

    def _open_from_state(self, run: Running, blob: bytes) -> None:
        """Start a request from a KV state made elsewhere (``Engine.prefill_state``, another
        process): it must cover a prefix of the prompt short of its last token."""
        tokens = self.backend.restore(run.seq, blob)
        prompt = run.request.prompt_tokens
        if len(tokens) >= len(prompt) or prompt[: len(tokens)] != tokens:
            self.backend.release(run.seq)
            raise KVStateError(
                f"the KV state covers {len(tokens)} tokens that are not a prefix of this prompt "
                f"({len(prompt)} tokens) short of its last token"
            )
        run.cached = run.prefilled = len(tokens)

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
        """What displacing a running request costs: a park now and a restore later. A restore
        costs about what a park does (a copy each way) until one is measured; nothing before either."""
        park = self._park_s or 0.0
        return park + (self._restore_s if self._restore_s is not None else park)

    def _prefill(self, run: Running, *, chunk: int) -> None:
        prompt = run.request.prompt_tokens
        t0 = self._clock()
        tokens = prompt[run.prefilled : min(run.prefilled + chunk, len(prompt) - 1)]
        self.backend.prefill(run.seq, tokens)
        run.prefilled += len(tokens)
        took = self._clock() - t0
        run.active_s += took
        self.service.observe_prefill(len(tokens), took, start=run.prefilled - len(tokens))

    def _export(self, run: Running) -> None:
        """A prefill-only request (``Engine.prefill_state``) has its prompt: hand its KV state over."""
        export = run.request.export
        assert export is not None
        blob = self.backend.park(run.seq)
        del self._open[run.seq]
        run.where = Where.RELEASED  # the blob leaves with the caller; the slot is free
        run.sampler.close()
        export(blob)
        run.finish = FinishReason.STOP

    def _decode(self, runs: list[Running]) -> None:
        """One decode step of every run, in one backend call."""
        steps = []
        for run in runs:
            assert run.pending is not None
            steps.append(Step(run.seq, run.pending, run.sampler, run.request.constraint))
        t0 = self._clock()
        tokens = self.backend.decode(steps)
        now = self._clock()
        took = now - t0
        self.width.observe(len(steps), took, now)
        share = took / len(steps)  # what each request's service costs the device
        counted = 0
        for run, token in zip(runs, tokens, strict=True):
            run.active_s += share
            first = run.first_at is None
            if first:
                run.first_at = now
                run.prefilled = len(run.request.prompt_tokens)
            run.accept(token, self.backend.detokenize)
            if not first and token not in run.eog:  # the decode span: an end-of-generation step is not output
                run.decode_s += took
                counted += 1
        if counted == len(runs):
            self.service.observe_decode(counted, took)

    def _end(self, run: Running) -> None:
        """Send the final event, free the sequence, and give its place in the batch to the next."""
        request = run.request
        run.flush()
        self._free_or_log(run)  # a failed release loses nothing of the answer
        now = self._clock()
        request.sink(FinalEvent(run.result(now)))
        self._leave(request)
        with self._cond:
            if run.finish is not FinishReason.CANCELLED and request.cost > 0 and run.active_s > 0:
                self._seconds_per_cost = _average(self._seconds_per_cost, run.active_s / request.cost)
        if run.finish is FinishReason.STOP and request.export is None:  # the answer's real length is known
            self._on_natural_end(request, len(run.generated), run.active_s)

    def _leave(self, request: Request) -> None:
        with self._cond:
            if request in self._batch:
                self._batch.remove(request)
            self._kv_width = None  # it freed cells: a request may join again

    def _fail(self, request: Request, exc: Exception) -> None:
        if not isinstance(exc, EdgeserveError):  # a backend library failed: map it here, once
            log.exception("backend failed on request %s", request.request_id)
            exc = BackendError(f"{type(exc).__name__}: {exc}")
        if request.run is not None:
            self._free_or_log(request.run)
        request.sink(ErrorEvent(exc))
        self._leave(request)

    def _free(self, run: Running) -> None:
        """Release everything a request holds on the device side, once. Its handle may live on in
        the caller (with its result), so nothing heavy may stay reachable from it: llama.cpp's
        sampler chain alone keeps a candidates buffer of the whole vocabulary (3 MB for 262k)."""
        if run.where is Where.RELEASED:
            return
        # Released first: a backend that fails to release leaves nothing for a second try to trip on.
        where, run.where = run.where, Where.RELEASED
        try:
            if where is Where.OPEN:
                del self._open[run.seq]
                self.backend.release(run.seq)
            elif where is Where.PARKED:
                run.parked = None
                self._n_parked -= 1
        finally:
            run.sampler.close()
            if run.request.constraint is not None:
                run.request.constraint.close()

    def _free_or_log(self, run: Running) -> None:
        """``_free`` where the request is being answered anyway (it ended, failed, was cancelled, or
        the engine closes, perhaps because the backend broke): a backend that cannot release the
        sequence is logged, and the caller still gets its answer."""
        try:
            self._free(run)
        except Exception:
            log.warning("could not release sequence %s of request %s", run.seq, run.request.request_id, exc_info=True)

    def _free_dropped(self, dropped: list[Request]) -> None:
        for request in dropped:
            assert request.run is not None
            request.run.finish = FinishReason.CANCELLED
            self._free_or_log(request.run)
            request.sink(final(request, self._clock()))

    def _shut_down(self) -> None:
        """Closing: answer everything still here, free every sequence, resolve control jobs."""
        with self._cond:
            batch, self._batch = self._batch, []
            dropped, self._dropped = self._dropped, []
            waiting = []
            while (entry := self._scheduler.next(self._clock())) is not None:
                waiting.append(entry.item)
            control, self._control = list(self._control), collections.deque()
        for request in batch:
            if request.run is not None:
                request.run.finish = FinishReason.CANCELLED
                request.run.flush()
                self._free_or_log(request.run)
            request.sink(final(request, self._clock()))
        self._free_dropped(dropped)
        for request in waiting:
            if request.run is not None:
                self._free_or_log(request.run)
            request.sink(ErrorEvent(EngineClosedError("the engine was closed before this request ended")))
        for job in control:
            job()  # each job resolves its own future; closing must not strand a caller of call()


def _entry(request: Request, cost: float) -> Entry[Request]:
    return Entry(request.request_id, request.submitted, request, request.priority, request.predicted_tokens, cost)


def _average(old: float | None, new: float) -> float:
    """A running average that weighs the newest observation 0.2 (the first one stands alone)."""
    return new if old is None else 0.8 * old + 0.2 * new
