"""The engine: one loop thread owns the backend; callers get a per-request stream of events.

Backends are serial (one model, one context), so every request goes through the admission queue
and the loop runs them one at a time. Work that needs no context (validation, tokenizing, chat
rendering) happens in the caller's thread before queueing, so bad input fails before any wait and
the loop only ever runs the model.

Errors travel as values (``ErrorEvent``) from the loop to the caller; the convenience methods
(``generate``, ``stream``, their async twins) raise them at the caller's side.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from edgeserve import chat
from edgeserve.backend import Backend
from edgeserve.errors import (
    BackendError,
    ContextLengthError,
    EdgeserveError,
    EngineClosedError,
    InvalidParameterError,
)
from edgeserve.scheduler import INITIAL_AGING_S, AgingTracker, Entry, QueueView, Scheduler
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

log = logging.getLogger(__name__)
R = TypeVar("R")
Sink = Callable[[StreamEvent], None]
PredictorInput = str | Sequence[Message]


class LengthPrediction(Protocol):
    @property
    def expected_tokens(self) -> float: ...

    @property
    def length_class(self) -> str: ...


class LengthEstimator(Protocol):
    """What SJF admission needs from a length predictor (``edgeserve.predictor.LengthPredictor``)."""

    def predict(self, prompt: PredictorInput) -> LengthPrediction: ...


class LengthRecorder(Protocol):
    """Where real answer lengths go for online adaptation (``edgeserve.predictor.AdaptationLog``)."""

    def record(self, request: PredictorInput, actual_tokens: int) -> None: ...


@dataclass
class _Request:
    """What the loop needs to run one request. Built in the caller's thread by ``Engine._prepare``."""

    request_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    #: ``params.max_tokens``, or what is left of the context when that is None.
    max_tokens: int
    chat_template: str | None
    submitted: float
    sink: Sink = field(repr=False)
    predicted_tokens: float | None = None
    #: Kept only while a LengthRecorder wants it, and only in memory.
    predictor_input: PredictorInput | None = field(default=None, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)


class _Handle:
    """What both handles share: identity, size, and cancellation."""

    def __init__(self, engine: Engine, request: _Request) -> None:
        self._engine = engine
        self._request = request

    @property
    def request_id(self) -> str:
        return self._request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_tokens)

    def cancel(self) -> None:
        """Remove the request if it waits, stop it within a decode step if it runs; a no-op once ended."""
        self._engine._cancel(self._request)


class RequestHandle(_Handle):
    """A submitted request. Iterate it for its events; ``cancel`` frees its slot at once.

    Iteration ends after exactly one ``FinalEvent`` or ``ErrorEvent``. Leaving the loop early (break,
    exception, garbage collection) cancels the request.
    """

    def __init__(self, engine: Engine, request: _Request, events: queue.SimpleQueue[StreamEvent]) -> None:
        super().__init__(engine, request)
        self._events = events

    def __iter__(self) -> Iterator[StreamEvent]:
        ended = False
        try:
            while not ended:
                event = self._events.get()
                # Set before yielding: a consumer that stops at the last event has not left early.
                ended = not isinstance(event, TokenEvent)
                yield event
        finally:
            if not ended:
                self.cancel()

    def result(self) -> GenerationResult:
        for event in self:
            if (result := outcome(event)) is not None:
                return result
        raise BackendError("stream ended without a result")  # unreachable by the handle's invariant


class AsyncRequestHandle(_Handle):
    """The asyncio twin of ``RequestHandle``; events arrive through the caller's event loop."""

    def __init__(self, engine: Engine, request: _Request, events: asyncio.Queue[StreamEvent]) -> None:
        super().__init__(engine, request)
        self._events = events

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        ended = False
        try:
            while not ended:
                event = await self._events.get()
                ended = not isinstance(event, TokenEvent)
                yield event
        finally:
            if not ended:  # the consumer left early or its task was cancelled (client disconnect)
                self.cancel()

    async def result(self) -> GenerationResult:
        async for event in self:
            if (result := outcome(event)) is not None:
                return result
        raise BackendError("stream ended without a result")  # unreachable by the handle's invariant


def outcome(event: StreamEvent) -> GenerationResult | None:
    """The result a final event carries; raises the error an error event carries; None for tokens."""
    if isinstance(event, FinalEvent):
        return event.result
    if isinstance(event, ErrorEvent):
        raise event.error
    return None


class Engine:
    """Runs requests on one backend, one at a time, in admission order.

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
        """``predictor`` scores requests for the sjf and priority policies (without one every request
        counts as medium-length, which makes them first come, first served); ``recorder`` receives
        the real length of every naturally ended answer."""
        self.settings = settings or EngineSettings()
        self.backend = backend
        #: Where the model came from, when the engine resolved it itself (``from_settings``).
        self.model: ResolvedModel | None = None
        self.capabilities: Capabilities = backend.capabilities()
        self._clock = clock
        self._predictor = predictor if self.settings.policy != "fcfs" else None
        self._predict_lock = threading.Lock()  # predictors reuse one feature buffer
        self._recorder = recorder
        self._aging = AgingTracker(self.settings.aging_factor) if self.settings.aging_s is None else None
        self._scheduler: Scheduler[_Request] = Scheduler(
            self.settings.policy, self.settings.max_queue, aging_s=self.settings.aging_s or INITIAL_AGING_S
        )
        self._cond = threading.Condition()
        self._control: collections.deque[Callable[[], None]] = collections.deque()
        self._running: _Request | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="edgeserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, model: ModelSettings | None = None, engine: EngineSettings | None = None) -> Engine:
        """Resolve the model, pick the backend, load it, and start the loop."""
        from edgeserve.backend import load_backend
        from edgeserve.hardware import choose_backend
        from edgeserve.models import resolve

        model = model or ModelSettings()
        engine = engine or EngineSettings()
        resolved = resolve(model.model, cache_dir=model.cache_dir)
        backend_name = choose_backend(model=resolved.path) if model.backend == "auto" else model.backend
        predictor = recorder = None
        if engine.policy != "fcfs" or engine.adapt_log:
            from edgeserve.predictor import AdaptationLog, LengthPredictor

            predictor = LengthPredictor.load(engine.predictor)
            if engine.adapt_log:
                recorder = AdaptationLog(engine.adapt_log, predictor.spec)
        backend = load_backend(backend_name, resolved, model)
        instance = cls(backend, engine, predictor=predictor, recorder=recorder)
        instance.model = resolved
        return instance

    # ---- submitting -------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
    ) -> RequestHandle:
        """Queue a request and return its handle. Raises at once on bad input or a full queue."""
        events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        request = self._prepare(prompt, messages, params, request_id, events.put)
        self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
        return RequestHandle(self, request, events)

    def submit_async(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
    ) -> AsyncRequestHandle:
        """Like ``submit``, from a coroutine: events are delivered through the running event loop."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        holder: list[_Request] = []

        def sink(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody will read this stream
                holder[0].cancelled.set()

        request = self._prepare(prompt, messages, params, request_id, sink)
        holder.append(request)
        self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
        return AsyncRequestHandle(self, request, events)

    # ---- convenience ------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Run one request to the end. ``sampling`` keywords build ``SamplingParams`` when ``params`` is None."""
        return self.submit(prompt, _params(params, sampling), messages=messages).result()

    def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> Iterator[TokenEvent | FinalEvent]:
        """Yield ``TokenEvent``s as text arrives, then one ``FinalEvent``; raises on error."""
        for event in self.submit(prompt, _params(params, sampling), messages=messages):
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event

    async def agenerate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        return await self.submit_async(prompt, _params(params, sampling), messages=messages).result()

    async def astream(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        **sampling: Any,
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        async for event in self.submit_async(prompt, _params(params, sampling), messages=messages):
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event

    # ---- state and lifecycle ----------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        # Tokenizers read only the vocabulary, so this needs no turn on the loop.
        return self.backend.tokenize(text, add_bos=add_bos)

    def call(self, fn: Callable[[Backend], R]) -> R:
        """Run ``fn(backend)`` on the loop thread between requests (KV export/import, warm-up)."""
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

    def export_state(self) -> bytes:
        return self.call(lambda b: b.export_state())

    def import_state(self, blob: bytes) -> list[int]:
        return self.call(lambda b: b.import_state(blob))

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
            return self._running is not None

    def snapshot(self) -> list[QueueView]:
        with self._cond:
            return self._scheduler.snapshot(self._clock())

    def close(self) -> None:
        """Stop taking requests, fail the waiting ones, cancel the running one, release the model."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        self._thread.join()
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals --------------------------------------------------------------------------

    def _prepare(
        self,
        prompt: str | Sequence[int] | None,
        messages: Sequence[Message] | None,
        params: SamplingParams | None,
        request_id: str | None,
        sink: Sink,
    ) -> _Request:
        params = params or SamplingParams()
        template = None
        if (prompt is None) == (messages is None):
            raise InvalidParameterError("give exactly one of prompt or messages", param="prompt")
        if messages is not None:
            rendered = chat.render(messages, self.capabilities)
            tokens = self._tokenize_rendered(rendered.prompt)
            template = rendered.template
        elif isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt must not be empty", param="prompt")
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
        return _Request(rid, tokens, params, max_tokens, template, self._clock(), sink)

    def _tokenize_rendered(self, text: str) -> list[int]:
        # Templates usually write the BOS token themselves; adding another would shift the model.
        bos = self.capabilities.bos_token
        return self.backend.tokenize(text, add_bos=not (bos and text.startswith(bos)))

    def _enqueue(
        self,
        request: _Request,
        priority: int,
        predicted_tokens: float | None,
        source: str | Sequence[int] | Sequence[Message] | None,
    ) -> None:
        # Token prompts carry no text to read: they wait as medium-length requests.
        readable: PredictorInput | None = source if isinstance(source, str) or _is_messages(source) else None  # type: ignore[assignment]
        if predicted_tokens is None and self._predictor is not None and readable is not None:
            try:
                with self._predict_lock:
                    predicted_tokens = self._predictor.predict(readable).expected_tokens
            except EdgeserveError:  # nothing it can read (e.g. only a system prompt): servable all the same
                predicted_tokens = None
        request.predicted_tokens = predicted_tokens
        if self._recorder is not None:
            request.predictor_input = readable
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._scheduler.add(Entry(request.request_id, request.submitted, request, priority, predicted_tokens))
            self._cond.notify()

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            request.cancelled.set()
            # By identity: another request may have reused this id once this one ended.
            waiting = self._scheduler.cancel(request.request_id, request) is not None
        if waiting:  # never started: answer it here; a running request is answered by the loop
            now = self._clock()
            request.sink(FinalEvent(_empty_result(request, now, FinishReason.CANCELLED)))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        self._fail_waiting()
                        return
                    if self._control:
                        job: Callable[[], None] | None = self._control.popleft()
                        request = None
                        break
                    entry = self._scheduler.next(self._clock())
                    if entry is not None:
                        job, request = None, entry.item
                        self._running = request
                        break
                    self._cond.wait()
            if job is not None:
                job()
                continue
            assert request is not None
            try:
                self._run(request)
            finally:
                with self._cond:
                    self._running = None

    def _fail_waiting(self) -> None:
        while (entry := self._scheduler.next(self._clock())) is not None:
            entry.item.sink(ErrorEvent(EngineClosedError("the engine was closed before this request ran")))
        for job in self._control:
            job()  # each job resolves its own future; closing must not strand a caller of call()
        self._control.clear()

    def _run(self, request: _Request) -> None:
        """Prefill, then decode until a stop condition; the only place the model runs."""
        started = self._clock()
        if request.cancelled.is_set():
            request.sink(FinalEvent(_empty_result(request, started, FinishReason.CANCELLED)))
            return
        params = request.params
        eog = frozenset() if params.ignore_eos else self.capabilities.eog_token_ids
        text = TextStream(params.stop)
        pieces: list[str] = []
        n_out = 0
        first_at: float | None = None
        last_at = started
        finish = FinishReason.LENGTH
        try:
            # A seed promises reproducible text, which only an identical evaluation path gives.
            cached = self.backend.prefill(request.prompt_tokens, reuse=params.seed is None)
            steps = self.backend.decode(params)
            try:
                for token in steps:
                    now = self._clock()
                    if first_at is None:
                        first_at = now
                    if request.cancelled.is_set():
                        finish = FinishReason.CANCELLED
                        break
                    if token in eog:
                        finish = FinishReason.STOP
                        break
                    # Only counted tokens move the end of the decode span (an EOS step is not output).
                    n_out += 1
                    last_at = now
                    out = text.push(self.backend.detokenize((token,)))
                    if out:
                        pieces.append(out)
                        request.sink(TokenEvent(out, (token,)))
                    if text.stopped:
                        finish = FinishReason.STOP
                        break
                    if n_out >= request.max_tokens:
                        break
            finally:
                steps.close()  # type: ignore[attr-defined]
        except EdgeserveError as exc:
            request.sink(ErrorEvent(exc))
            return
        except Exception as exc:  # a backend library failed: map it here, once, and keep the loop alive
            log.exception("backend failed on request %s", request.request_id)
            request.sink(ErrorEvent(BackendError(f"{type(exc).__name__}: {exc}")))
            return
        tail = text.finish()
        if tail and finish is not FinishReason.CANCELLED:
            pieces.append(tail)
            request.sink(TokenEvent(tail, ()))
        end = self._clock()
        decode_tok_s = None
        if first_at is not None and n_out >= 2 and last_at > first_at:
            decode_tok_s = (n_out - 1) / (last_at - first_at)
        request.sink(
            FinalEvent(
                GenerationResult(
                    request_id=request.request_id,
                    text="".join(pieces),
                    prompt_tokens=len(request.prompt_tokens),
                    completion_tokens=n_out,
                    finish_reason=finish,
                    ttft_s=None if first_at is None else first_at - request.submitted,
                    queue_wait_s=started - request.submitted,
                    total_s=end - request.submitted,
                    decode_tok_s=decode_tok_s,
                    chat_template=request.chat_template,
                    cached_prompt_tokens=cached,
                    predicted_tokens=request.predicted_tokens,
                )
            )
        )
        if finish is FinishReason.STOP:  # a natural end: the answer's real length is known
            self._learn(request, n_out, end - started)

    def _learn(self, request: _Request, n_out: int, service_s: float) -> None:
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


def _empty_result(request: _Request, now: float, finish: FinishReason) -> GenerationResult:
    return GenerationResult(
        request_id=request.request_id,
        text="",
        prompt_tokens=len(request.prompt_tokens),
        completion_tokens=0,
        finish_reason=finish,
        ttft_s=None,
        queue_wait_s=now - request.submitted,
        total_s=now - request.submitted,
        decode_tok_s=None,
        chat_template=request.chat_template,
        predicted_tokens=request.predicted_tokens,
    )


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
