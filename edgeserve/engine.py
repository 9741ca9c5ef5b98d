"""The engine: the caller's side of edgeserve. Requests come in from any thread; events go out
through a per-request stream.

Work that needs no model (validation, tokenizing, chat rendering, length prediction) happens here,
in the caller's thread, before queueing, so bad input fails before any wait; the device side
(``edgeserve.loop.EngineLoop``: one thread that owns the backend, the queue, preemption and parking)
only ever runs the model.

Errors travel as values (``ErrorEvent``) from the loop to the caller; the convenience methods
(``generate``, ``stream``, their async twins) raise them at the caller's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any, TypeVar, overload

from edgeserve import chat
from edgeserve.backend import Backend
from edgeserve.errors import (
    ContextLengthError,
    EdgeserveError,
    InvalidParameterError,
)
from edgeserve.handles import AsyncRequestHandle, Handle, PrefillJob, RequestHandle, outcome
from edgeserve.loop import EngineLoop
from edgeserve.running import Request, Sink
from edgeserve.scheduler import INITIAL_AGING_S, AgingTracker, QueueView
from edgeserve.service import LengthEstimator, LengthRecorder, PredictorInput, ServiceModel
from edgeserve.settings import CloudSettings, EngineSettings, ModelSettings
from edgeserve.structured import StructuredOutput, expects_calls, with_tool_calls
from edgeserve.types import (
    Capabilities,
    ErrorEvent,
    FinalEvent,
    GenerationResult,
    Message,
    ResolvedModel,
    SamplingParams,
    StreamEvent,
    TokenEvent,
)

if TYPE_CHECKING:
    from edgeserve.handoff import Handoff
    from edgeserve.progress import ProgressCallback

__all__ = ["AsyncRequestHandle", "Engine", "Handle", "RequestHandle", "outcome"]

log = logging.getLogger(__name__)
R = TypeVar("R")
PromptArg = str | Sequence[int] | None


class Engine:
    """Runs requests on one backend in the order of its policy (see ``edgeserve.loop``).

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
        fixed_width: bool = False,
    ) -> None:
        """``predictor`` scores requests for the sjf, srpt and priority policies (without one every
        answer counts as equally long); ``recorder`` receives the real length of every naturally
        ended answer. ``fixed_width`` batches as many sequences as the backend holds (``--parallel``
        given); otherwise the width follows the measured decode rate (``edgeserve.width``)."""
        self.settings = settings or EngineSettings()
        self.backend = backend
        #: Where the model came from, when the engine resolved it itself (``from_settings``).
        self.model: ResolvedModel | None = None
        #: The cloud-device handoff, when a cloud is configured (``from_settings(cloud=...)``).
        self.handoff: Handoff | None = None
        self.capabilities: Capabilities = backend.capabilities()
        self._clock = clock
        predicts = self.settings.policy != "fcfs" and self.settings.predict_lengths
        self._predictor = predictor if predicts else None
        self._closed = False
        self._predict_lock = threading.Lock()  # predictors reuse one feature buffer
        self._recorder = recorder
        #: Structured output and tool calling: grammars compiled per schema, the vocabulary on first use.
        self._structured = StructuredOutput(backend)
        self._aging = AgingTracker(self.settings.aging_factor) if self.settings.aging_s is None else None
        self._loop = EngineLoop(
            backend,
            self.settings,
            aging_s=self.settings.aging_s or INITIAL_AGING_S,
            clock=clock,
            on_natural_end=self._learn,
            fixed_width=fixed_width,
        )

    @classmethod
    def from_settings(
        cls,
        model: ModelSettings | None = None,
        engine: EngineSettings | None = None,
        *,
        progress: ProgressCallback | None = None,
        cloud: CloudSettings | None = None,
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
        instance = cls(backend, engine, predictor=predictor, recorder=recorder, fixed_width=model.parallel is not None)
        instance.model = resolved
        if cloud is not None and cloud.cloud:  # a cloud answers first, the device takes over
            from edgeserve.handoff import Handoff

            instance.handoff = Handoff(instance, cloud)
        return instance

    # ---- submitting -------------------------------------------------------------------------

    @overload
    def submit(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        on_event: None = None,
        cloud: bool = True,
        kv_state: bytes | None = None,
        **sampling: Any,
    ) -> RequestHandle: ...

    @overload
    def submit(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        on_event: Callable[[StreamEvent], None],
        cloud: bool = True,
        kv_state: bytes | None = None,
        **sampling: Any,
    ) -> Handle: ...

    def submit(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        on_event: Callable[[StreamEvent], None] | None = None,
        cloud: bool = True,
        kv_state: bytes | None = None,
        **sampling: Any,
    ) -> Handle:
        """Queue a request and return its handle; raises at once on bad input or a full queue.
        ``sampling`` keywords build ``SamplingParams`` when ``params`` is None.

        Without ``on_event``, iterate the returned ``RequestHandle`` for the events. With it, each
        event is passed to ``on_event`` as it happens, on the engine's thread (or the cancelling
        thread, for a request cancelled while it waits): for event loops that are not asyncio, such
        as a GUI toolkit's, which forwards them with its own thread-safe signal.

        ``response_format`` (OpenAI's: ``{"type": "json_object"}``, ``{"type": "json_schema",
        "json_schema": {"schema": ...}}``, or a Pydantic model class) constrains the answer to JSON
        that follows the schema; ``tools`` (OpenAI's function list) and ``tool_choice`` (``auto``,
        ``none``, ``required``, a named function) let it call a tool instead (see
        ``edgeserve.structured``).

        ``kv_state`` (a blob of ``prefill_state``, from this engine or another on the same model)
        starts the request from that KV state instead of prefilling what it covers: a prefix of the
        prompt, short of its last token; with greedy sampling the text is the from-scratch text."""
        # The cloud-device handoff plans it (edgeserve.handoff); a KV continuation is device work.
        if cloud and kv_state is None and self.handoff is not None:
            out: dict[str, Any] = {"response_format": response_format, "tools": tools, "tool_choice": tool_choice}
            route: dict[str, Any] = {"messages": messages, "request_id": request_id, "priority": priority}
            return self.handoff.submit(prompt, params, on_event=on_event, **route, **out, **sampling)
        params = sampling_params(params, sampling)
        output = (response_format, tools, tool_choice)
        if on_event is not None:
            request = self.prepare(prompt, messages, params, request_id, on_event, output)
            request.kv_state = kv_state
            self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
            return Handle(request, self._loop.cancel)
        events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        request = self.prepare(prompt, messages, params, request_id, events.put, output)
        request.kv_state = kv_state
        self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
        return RequestHandle(request, self._loop.cancel, events)

    def submit_prepared(self, request: Request, *, priority: int = 0) -> Handle:
        """Queue a request built by ``prepare`` and then adjusted by a wrapper (the handoff sets its
        KV state and a constraint that forces the cloud's tokens); its events go to the sink given
        to ``prepare``."""
        self._enqueue(request, priority, None, request.prompt_tokens)
        return Handle(request, self._loop.cancel)

    def submit_async(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        predicted_tokens: float | None = None,
        cloud: bool = True,
        kv_state: bytes | None = None,
        **sampling: Any,
    ) -> AsyncRequestHandle:
        """Like ``submit``, from a coroutine: events are delivered through the running event loop."""
        if cloud and kv_state is None and self.handoff is not None:
            out: dict[str, Any] = {"response_format": response_format, "tools": tools, "tool_choice": tool_choice}
            route: dict[str, Any] = {"messages": messages, "request_id": request_id, "priority": priority}
            return self.handoff.submit_async(prompt, params, **route, **out, **sampling)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        holder: list[Request] = []

        def sink(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody will read this stream
                holder[0].cancelled.set()

        output = (response_format, tools, tool_choice)
        request = self.prepare(prompt, messages, sampling_params(params, sampling), request_id, sink, output)
        request.kv_state = kv_state
        holder.append(request)
        self._enqueue(request, priority, predicted_tokens, messages if messages is not None else prompt)
        return AsyncRequestHandle(request, self._loop.cancel, events)

    # ---- convenience ------------------------------------------------------------------------

    def generate(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Run one request to the end; ``result.tool_calls`` holds the calls when tools were offered."""
        output = {"response_format": response_format, "tools": tools, "tool_choice": tool_choice}
        result = self.submit(prompt, params, messages=messages, on_event=None, **output, **sampling).result()
        return with_tool_calls(result) if expects_calls(tools, tool_choice) else result

    def stream(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> Iterator[TokenEvent | FinalEvent]:
        """Yield ``TokenEvent``s as text arrives, then one ``FinalEvent``; raises on error."""
        output = {"response_format": response_format, "tools": tools, "tool_choice": tool_choice}
        calls = expects_calls(tools, tool_choice)
        for event in self.submit(prompt, params, messages=messages, on_event=None, **output, **sampling):
            if isinstance(event, ErrorEvent):
                raise event.error
            yield FinalEvent(with_tool_calls(event.result)) if calls and isinstance(event, FinalEvent) else event

    async def agenerate(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        output = {"response_format": response_format, "tools": tools, "tool_choice": tool_choice}
        result = await self.submit_async(prompt, params, messages=messages, **output, **sampling).result()
        return with_tool_calls(result) if expects_calls(tools, tool_choice) else result

    async def astream(
        self,
        prompt: PromptArg = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        output = {"response_format": response_format, "tools": tools, "tool_choice": tool_choice}
        calls = expects_calls(tools, tool_choice)
        async for event in self.submit_async(prompt, params, messages=messages, **output, **sampling):
            if isinstance(event, ErrorEvent):
                raise event.error
            yield FinalEvent(with_tool_calls(event.result)) if calls and isinstance(event, FinalEvent) else event

    # ---- state and lifecycle ----------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        # Tokenizers read only the vocabulary, so this needs no turn on the loop.
        return self.backend.tokenize(text, add_bos=add_bos)

    def call(self, fn: Callable[[Backend], R]) -> R:
        """Run ``fn(backend)`` on the loop thread while no request is running (warm-up, KV moves).
        ``fn`` must leave no sequence open."""
        return self._loop.call(fn)

    def prefill_state(self, prompt: str | Sequence[int], *, priority: int = 0) -> PrefillJob:
        """Prefill ``prompt`` on the device and hand its KV state over as a blob (``job.future``)
        that ``submit(..., kv_state=blob)`` on this engine, or another on the same model (another
        process, another machine), continues from without that prefill. The blob covers every
        token but the last, which a request always evaluates itself (its first decode step).

        The prefill is a job in the scheduler like any request (its cost is the prefill alone), so
        it runs beside the batch instead of stopping it; ``job.cancel()`` withdraws it."""
        tokens = self.backend.tokenize(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        future: Future[bytes] = Future()
        future.set_running_or_notify_cancel()

        def export(blob: bytes) -> None:
            if not future.done():
                future.set_result(blob)

        def sink(event: StreamEvent) -> None:  # runs after export() when the prefill succeeded
            if not future.done():
                future.set_exception(event.error if isinstance(event, ErrorEvent) else CancelledError())

        # Greedy and seeded: the prompt is evaluated from scratch, on the path a seeded request takes.
        request = self.prepare(tokens, None, SamplingParams(temperature=0, seed=0, max_tokens=1), None, sink)
        request.max_tokens = 0
        request.export = export
        self._enqueue(request, priority, 0.0, tokens)
        return PrefillJob(request, self._loop.cancel, future)

    def export_state(self, prompt: str | Sequence[int]) -> bytes:
        """``prefill_state``, waited for."""
        return self.prefill_state(prompt).future.result()

    @property
    def queue_depth(self) -> int:
        return self._loop.queue_depth

    @property
    def parallel(self) -> int:
        """The widest batch the engine allows now (``--parallel``, or what the measured decode
        rate justifies; ``edgeserve.width``). Under a shortest-first policy the loop may run a
        narrower one for the work present."""
        return self._loop.width.limit(self._clock())

    def step_seconds(self) -> dict[int, float]:
        """Measured seconds per decode step by batch width: what the automatic ``--parallel`` is
        chosen from."""
        return self._loop.width.measured()

    @property
    def running(self) -> int:
        """Requests in the running batch now."""
        return self._loop.running

    @property
    def aging_s(self) -> float:
        """The aging threshold in force (set, or derived from measured short requests)."""
        return self._loop.aging_s

    @property
    def busy(self) -> bool:
        return self._loop.busy

    @property
    def service(self) -> ServiceModel:
        """The measured prefill and decode rates the scheduler's costs come from."""
        return self._loop.service

    def backlog_s(self) -> float:
        """Seconds of device work queued and running now, at the measured rates (0 when idle)."""
        return self._loop.backlog_s()

    def snapshot(self) -> list[QueueView]:
        return self._loop.snapshot()

    def close(self) -> None:
        """Stop taking requests, fail the waiting ones, cancel the running one, join the loop
        thread and release the model."""
        if self._closed:
            return
        self._closed = True
        self._loop.close()
        self._structured.close()
        self.backend.close()
        _return_freed_memory()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the caller's side ------------------------------------------------------------------

    def prepare(
        self,
        prompt: PromptArg,
        messages: Sequence[Message] | None,
        params: SamplingParams | None,
        request_id: str | None,
        sink: Sink,
        output: tuple[Any, Any, Any] = (None, None, None),
    ) -> Request:
        params = params or SamplingParams()
        template = None
        if (prompt is None) == (messages is None):
            raise InvalidParameterError("give exactly one of prompt or messages", param="prompt")
        spec, messages = self._structured.prepare(*output, messages)
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
        request = Request(rid, tokens, params, max_tokens, template, self._clock(), sink)
        request.constraint = self._structured.constraint(spec)  # compiled (or cached) before any wait
        return request

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
        self._loop.add(request)

    def _learn(self, request: Request, n_out: int, service_s: float) -> None:
        """Feed a finished request back: its service time into derived aging, its real length into
        the recorder. Runs on the loop thread after the caller already has its result."""
        aging_s = self._aging.observe(n_out, service_s) if self._aging is not None else None
        if aging_s is not None:
            self._loop.set_aging(aging_s)
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


def sampling_params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams | None:
    if params is not None and sampling:
        raise InvalidParameterError("give either params or sampling keywords, not both", param="params")
    if sampling:
        try:
            return SamplingParams(**sampling)
        except TypeError as exc:
            raise InvalidParameterError(f"unknown sampling parameter: {exc}", param="params") from exc
    return params
