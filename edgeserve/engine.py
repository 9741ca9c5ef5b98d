"""The engine: one loop thread owns the backend; callers get a per-request stream of events.

Work that needs no model (validation, tokenizing, chat rendering, length prediction) happens in the
caller's thread before queueing, so bad input fails before any wait and the loop only runs the
model. The loop works in small units, a prefill chunk or one decode step, and decides between two
units what runs next (``edgeserve.scheduler``): under ``srpt`` a shorter request displaces the
running one at a token boundary, and the displaced one's sequence stays open while the backend has
room, or is parked to host memory until it runs again. A request's running state
(``edgeserve.running.Running``) belongs to the loop, not to the backend, so it resumes with the
same text it would have produced without the pause.

Errors travel as values (``ErrorEvent``) from the loop to the caller; the convenience methods
(``generate``, ``stream``, their async twins) raise them at the caller's side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar, overload

from edgeserve import chat
from edgeserve.backend import Backend, SeqId, Step
from edgeserve.errors import (
    BackendError,
    ContextLengthError,
    EdgeserveError,
    EngineClosedError,
    InvalidParameterError,
)
from edgeserve.handles import AsyncRequestHandle, Handle, RequestHandle, outcome
from edgeserve.running import Request, Running, Sink, Where, empty_result, final
from edgeserve.scheduler import INITIAL_AGING_S, UNKNOWN_TOKENS, AgingTracker, Entry, QueueView, Scheduler
from edgeserve.service import LengthEstimator, LengthRecorder, PredictorInput, ServiceModel
from edgeserve.settings import EngineSettings, ModelSettings
from edgeserve.textstream import TextStream
from edgeserve.types import (
    Capabilities,
    ErrorEvent,
    FinalEvent,
    FinishReason,
    GenerationResult,
    Message,
    ResolvedModel,
    SamplingParams,
    StreamEvent,
    TokenEvent,
)

if TYPE_CHECKING:
    from edgeserve.progress import ProgressCallback

__all__ = ["AsyncRequestHandle", "Engine", "Handle", "RequestHandle", "outcome"]

log = logging.getLogger(__name__)
R = TypeVar("R")
PromptArg = str | Sequence[int] | None


class Engine:
    """Runs requests on one backend in the order of its policy, one unit of work at a time.

    Thread-safe: any thread may submit, cancel or read state. Use as a context manager, or call
    ``close()``, to stop the loop and release the model.
    """

    def __init__(
        self,
        backend: Backend,
        settings: EngineSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        predictor: LengthEstimator | None = None,
        recorder: LengthRecorder | None = None,
    ) -> None:
        """``predictor`` scores requests for the sjf, srpt and priority policies (without one every
        answer counts as equally long); ``recorder`` receives the real length of every naturally
        ended answer."""
        self.settings = settings or EngineSettings()
        self.backend = backend
        #: Where the model came from, when the engine resolved it itself (``from_settings``).
        self.model: ResolvedModel | None = None
        self.capabilities: Capabilities = backend.capabilities()
        self._clock = clock
        predicts = self.settings.policy != "fcfs" and self.settings.predict_lengths
        self._predictor = predictor if predicts else None
        self._predict_lock = threading.Lock()  # predictors reuse one feature buffer
        self._recorder = recorder
        self._aging = AgingTracker(self.settings.aging_factor) if self.settings.aging_s is None else None
        self._scheduler: Scheduler[Request] = Scheduler(
            self.settings.policy, self.settings.max_queue, aging_s=self.settings.aging_s or INITIAL_AGING_S
        )
        self._service = ServiceModel()
        #: Seconds one park plus one restore cost (measured); a preemption must be worth it.
        self._switch_s = 0.0
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

    @classmethod
    def from_settings(
        cls,
        model: ModelSettings | None = None,
        engine: EngineSettings | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> Engine:
        """Resolve the model, pick the backend, load it (``progress`` hears about a first-use
        conversion), and start the loop."""
        from edgeserve.backend import load_backend
        from edgeserve.hardware import choose_backend
        from edgeserve.models import resolve
        from edgeserve.progress import loading

        model = model or ModelSettings()
        engine = engine or EngineSettings()
        resolved = resolve(model.model, cache_dir=model.cache_dir)
        backend_name = choose_backend(model=resolved.path) if model.backend == "auto" else model.backend
        predictor = recorder = None
        if (engine.policy != "fcfs" and engine.predict_lengths) or engine.adapt_log:
            from edgeserve.predictor import AdaptationLog, LengthPredictor

            predictor = LengthPredictor.load(engine.predictor)
            if engine.adapt_log:
                recorder = AdaptationLog(engine.adapt_log, predictor.spec)
        with loading(progress, resolved.name, resolved.path):
            backend = load_backend(backend_name, resolved, model, progress)
        instance = cls(backend, engine, predictor=predictor, recorder=recorder)
        instance.model = resolved
        return instance

    # ---- submitting -------------------------------------------------------------------------

    @overload
    def submit(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        on_event: None = None,
        **sampling: Any,
    ) -> RequestHandle: ...

    @overload
    def submit(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        on_event: Callable[[StreamEvent], None],
        **sampling: Any,
    ) -> Handle: ...

    def submit(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        on_event: Callable[[StreamEvent], None] | None = None,
        **sampling: Any,
    ) -> Handle:
        """Queue a request and return its handle; raises at once on bad input or a full queue.
        ``sampling`` keywords build ``SamplingParams`` when ``params`` is None.

        Without ``on_event``, iterate the returned ``RequestHandle`` for the events. With it, each
        event is passed to ``on_event`` as it happens, on the engine's thread (or the cancelling
        thread, for a request cancelled while it waits): for event loops that are not asyncio, such
        as a GUI toolkit's, which forwards them with its own thread-safe signal."""
        params = _params(params, sampling)
        if on_event is not None:
            request = self._prepare(prompt, messages, params, request_id, on_event)
            self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
            return Handle(request, self._cancel)
        events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        request = self._prepare(prompt, messages, params, request_id, events.put)
        self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
        return RequestHandle(request, self._cancel, events)

    def submit_async(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        **sampling: Any,
    ) -> AsyncRequestHandle:
        """Like ``submit``, from a coroutine: events are delivered through the running event loop."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        holder: list[Request] = []

        def sink(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody will read this stream
                holder[0].cancelled.set()

        request = self._prepare(prompt, messages, _params(params, sampling), request_id, sink)
        holder.append(request)
        self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
        return AsyncRequestHandle(request, self._cancel, events)

    # ---- convenience ------------------------------------------------------------------------

    def generate(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Run one request to the end."""
        return self.submit(prompt, params, messages=messages, on_event=None, **sampling).result()

    def stream(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> Iterator[TokenEvent | FinalEvent]:
        """Yield ``TokenEvent``s as text arrives, then one ``FinalEvent``; raises on error."""
        for event in self.submit(prompt, params, messages=messages, on_event=None, **sampling):
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event

    async def agenerate(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        return await self.submit_async(prompt, params, messages=messages, **sampling).result()

    async def astream(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        async for event in self.submit_async(prompt, params, messages=messages, **sampling):
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event

    # ---- state and lifecycle ----------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        # Tokenizers read only the vocabulary, so this needs no turn on the loop.
        return self.backend.tokenize(text, add_bos=add_bos)

    def call(self, fn: Callable[[Backend], R]) -> R:
        """Run ``fn(backend)`` on the loop thread while no request is running (warm-up, KV moves).
        ``fn`` must leave no sequence open."""
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

    def export_state(self, prompt: str | Sequence[int]) -> bytes:
        """Prefill ``prompt`` and return its KV state as a blob another engine on the same model
        (another process, another machine) can ``import_state`` to skip that prefill."""
        tokens = self.backend.tokenize(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)

        def export(backend: Backend) -> bytes:
            seq = next(self._seq_ids)
            cached = backend.open(seq, tokens, reuse=True)
            try:
                backend.prefill(seq, tokens[cached:])
                return backend.park(seq)
            except BaseException:
                backend.release(seq)
                raise

        return self.call(export)

    def import_state(self, blob: bytes) -> list[int]:
        """Load a blob from ``export_state`` as the prefix cache: the next request whose prompt
        starts with its tokens evaluates only the rest (the last token at least). Returns them."""

        def restore(backend: Backend) -> list[int]:
            seq = next(self._seq_ids)
            tokens = backend.restore(seq, blob)
            backend.release(seq)
            return tokens

        return self.call(restore)

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._scheduler)

    @property
    def aging_s(self) -> float:
        """The aging threshold in force (set, or derived from measured short requests)."""
        with self._cond:
            return self._scheduler.aging_s

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._current is not None

    @property
    def service(self) -> ServiceModel:
        """The measured prefill and decode rates the scheduler's costs come from."""
        return self._service

    def snapshot(self) -> list[QueueView]:
        with self._cond:
            return self._scheduler.snapshot(self._clock())

    def close(self) -> None:
        """Stop taking requests, fail the waiting ones, cancel the running one, join the loop
        thread and release the model."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if self._current is not None:
                self._current.cancelled.set()
            self._cond.notify_all()
        self._thread.join()
        self.backend.close()
        _return_freed_memory()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the caller's side ------------------------------------------------------------------

    def _prepare(
        self,
        prompt: PromptArg,
        messages: Sequence[Message] | None,
        params: SamplingParams | None,
        request_id: str | None,
        sink: Sink,
    ) -> Request:
        params = params or SamplingParams()
        template = None
        if (prompt is None) == (messages is None):
            raise InvalidParameterError("give exactly one of prompt or messages", param="prompt")
        if messages is not None:
            rendered = chat.render(messages, self.capabilities)
            _check_unicode(rendered.prompt, "messages")
            tokens = self._tokenize_rendered(rendered)
            template = rendered.template
        elif isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt must not be empty", param="prompt")
            _check_unicode(prompt, "prompt")
            tokens = self.backend.tokenize(prompt, add_bos=True)
        else:
            tokens = list(prompt)  # type: ignore[arg-type]
            if not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
                raise InvalidParameterError("a token prompt must be a non-empty list of token ids", param="prompt")
        n_vocab = self.capabilities.n_vocab
        if max(tokens) >= n_vocab:
            raise InvalidParameterError(f"token ids must be below the vocabulary size ({n_vocab})", param="prompt")
        if any(t >= n_vocab for t in params.logit_bias):
            raise InvalidParameterError(f"logit_bias token ids must be below {n_vocab}", param="logit_bias")
        n_ctx = self.capabilities.n_ctx
        max_tokens = params.max_tokens if params.max_tokens is not None else n_ctx - len(tokens)
        if len(tokens) >= n_ctx or len(tokens) + max_tokens > n_ctx:
            raise ContextLengthError(
                f"this model's context is {n_ctx} tokens, but {len(tokens)} prompt tokens plus max_tokens="
                f"{params.max_tokens} need {len(tokens) + max_tokens}; shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        return Request(rid, tokens, params, max_tokens, template, self._clock(), sink)

    def _tokenize_rendered(self, rendered: chat.RenderedChat) -> list[int]:
        """Template markers become special tokens; message content never does (no forged turns)."""
        tokens: list[int] = []
        bos = self.capabilities.bos_token
        for i, (text, special) in enumerate(rendered.parts):
            # Templates usually write the BOS token themselves; adding another would shift the model.
            add_bos = i == 0 and not (bos and text.startswith(bos))
            tokens += self.backend.tokenize(text, add_bos=add_bos, special=special)
        return tokens

    def _enqueue(self, request: Request, priority: int, predicted_tokens: float | None, source: object) -> None:
        # Token prompts carry no text to read: they wait as medium-length requests.
        readable: PredictorInput | None = source if isinstance(source, str) or _is_messages(source) else None  # type: ignore[assignment]
        if predicted_tokens is None and self._predictor is not None and readable is not None:
            try:
                with self._predict_lock:
                    predicted_tokens = self._predictor.predict(readable).expected_tokens
            except EdgeserveError:  # nothing it can read (e.g. only a system prompt): servable all the same
                predicted_tokens = None
        request.predicted_tokens = predicted_tokens
        request.priority = priority
        if self._recorder is not None:
            request.predictor_input = readable
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            answer = UNKNOWN_TOKENS if predicted_tokens is None else predicted_tokens
            cost = self._service.decode_equivalents(len(request.prompt_tokens), min(answer, request.max_tokens))
            if len(self._scheduler) >= self._scheduler.capacity:
                self._scheduler.retry_after_s = self._drain_estimate_s()
            self._scheduler.add(Entry(request.request_id, request.submitted, request, priority, predicted_tokens, cost))
            self._cond.notify()

    def _drain_estimate_s(self) -> float:
        """Seconds a refused client should wait: from the work queued and running, at the measured
        decode rate. Called with ``_cond`` held, only when the queue is full."""
        backlog = self._scheduler.backlog_cost()
        current = self._current
        if current is not None and current.run is not None:
            backlog += current.run.remaining_cost(self._service)
        # A slot frees when the request at the head ends, but a retry that finds the queue refilled
        # fails again; half the backlog is the honest middle between the two.
        return max(1.0, backlog / self._service.decode_tok_s / 2)

    def _cancel(self, request: Request) -> None:
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

    # ---- the loop ---------------------------------------------------------------------------

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
            run.remaining_cost(self._service),
        )
        switch_cost = self._switch_s * self._service.decode_tok_s
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
            run.resume_s += self._clock() - t0
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
        # A restore costs about what a park does here (a copy each way) until one is measured.
        restore_s = run.resume_s / run.preemptions if run.preemptions and run.resume_s else took
        self._switch_s = 0.8 * self._switch_s + 0.2 * (took + restore_s) if self._switch_s else took + restore_s

    def _work(self, run: Running) -> None:
        request = run.request
        prompt = request.prompt_tokens
        t0 = self._clock()
        if run.prefilled < len(prompt) - 1:
            chunk = prompt[run.prefilled : min(run.prefilled + self.settings.prefill_chunk, len(prompt) - 1)]
            self.backend.prefill(run.seq, chunk)
            run.prefilled += len(chunk)
            self._service.observe_prefill(len(chunk), self._clock() - t0)
            return
        assert run.pending is not None
        (token,) = self.backend.decode([Step(run.seq, run.pending, run.sampler)])
        now = self._clock()
        first = run.first_at is None
        if first:
            run.first_at = now
            run.prefilled = len(prompt)
        run.accept(token, self.backend.detokenize)
        counted = token not in run.eog
        if not first and counted:  # the decode span: an end-of-generation step is not output
            run.decode_s += now - t0
            self._service.observe_decode(1, now - t0)

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
        if run.finish is FinishReason.STOP:  # a natural end: the answer's real length is known
            self._learn(request, len(run.generated), now - run.started)

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
        if run.where is Where.OPEN:
            del self._open[run.seq]
            self.backend.release(run.seq)
        elif run.where is Where.PARKED:
            run.parked = None
            self._n_parked -= 1
        run.where = Where.RELEASED

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

    def _learn(self, request: Request, n_out: int, service_s: float) -> None:
        """Feed a finished request back: its service time into derived aging, its real length into
        the recorder. Runs on the loop thread after the caller already has its result."""
        aging_s = self._aging.observe(n_out, service_s) if self._aging is not None else None
        if aging_s is not None:
            with self._cond:
                self._scheduler.set_aging(aging_s)
        if self._recorder is not None and request.predictor_input is not None:
            try:
                self._recorder.record(request.predictor_input, n_out)
            except (OSError, EdgeserveError) as exc:  # losing a log line must never fail serving
                log.warning("could not record answer length: %s", exc)


def _return_freed_memory() -> None:
    """Hand the model's freed heap back to the OS (glibc keeps freed arenas mapped otherwise: RSS
    after close stayed ~65 MB above the baseline for Gemma 3 270M), so an app that closes one
    engine and opens another does not grow. A no-op where there is no glibc."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        ctypes.CDLL(libc_name).malloc_trim(0)


def _check_unicode(text: str, param: str) -> None:
    """Text must be encodable: a lone surrogate (``"\\ud800"``, which JSON can carry) has no UTF-8
    form, and no tokenizer can read it. Refused here, before any work, like any bad value."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = f"U+{ord(text[exc.start]):04X}"
        raise InvalidParameterError(
            f"{param} holds a lone surrogate ({bad} at character {exc.start}), which is not valid Unicode text",
            param=param,
        ) from None


def _is_messages(source: object) -> bool:
    return isinstance(source, Sequence) and not isinstance(source, str) and all(hasattr(m, "get") for m in source)


def _params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams | None:
    if params is not None and sampling:
        raise InvalidParameterError("give either params or sampling keywords, not both", param="params")
    if sampling:
        try:
            return SamplingParams(**sampling)
        except TypeError as exc:
            raise InvalidParameterError(f"unknown sampling parameter: {exc}", param="params") from exc
    return params
