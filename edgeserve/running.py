"""A request as the engine loop sees it: what it asked for, and its running state.

``Request`` is built in the caller's thread (validated, tokenized) and never changes after it is
queued, except for its ``cancelled`` flag. ``Running`` is created when the loop first takes the
request and is owned by the loop thread alone: the tokens so far, the one token sampled but not
yet evaluated, the text stream with its stop-sequence buffer, the sampler (random state and
penalty history), the timings, and where its KV state is. Everything a request needs to stop
after any token and resume later with identical text lives here, none of it in the backend.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgeserve.backend import Constraint, Sampler, SeqId
from edgeserve.service import PredictorInput, ServiceModel
from edgeserve.textstream import TextStream
from edgeserve.types import (
    FinalEvent,
    FinishReason,
    GenerationResult,
    SamplingParams,
    StreamEvent,
    TokenEvent,
)

Sink = Callable[[StreamEvent], None]
#: Predicted answer length of a request the predictor could not score (scheduler.UNKNOWN_TOKENS).
UNKNOWN_TOKENS = 256.0


@dataclass
class Request:
    """What the loop needs to run one request. Built in the caller's thread by ``Engine.prepare``."""

    request_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    #: ``params.max_tokens``, or what is left of the context when that is None.
    max_tokens: int
    chat_template: str | None
    submitted: float
    sink: Sink = field(repr=False)
    predicted_tokens: float | None = None
    priority: int = 0
    #: Predicted service when it was queued, in decode-token equivalents (the scheduler's unit).
    cost: float = 0.0
    #: Structured output: the tokens allowed next (request state; it survives a park untouched).
    constraint: Constraint | None = field(default=None, repr=False)
    #: Start from this KV state (``Backend.park``'s blob) instead of prefilling what it covers.
    kv_state: bytes | None = field(default=None, repr=False)
    #: Prefill only: the loop hands the prompt's KV state (all but the last token) to this and ends.
    export: Callable[[bytes], None] | None = field(default=None, repr=False)
    #: Kept only while a LengthRecorder wants it, and only in memory.
    predictor_input: PredictorInput | None = field(default=None, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    #: Set by the loop when it first takes the request.
    run: Running | None = field(default=None, repr=False)


class Where(enum.Enum):
    """Where a started request's KV state is."""

    NEW = "new"  # nothing evaluated yet
    OPEN = "open"  # an open sequence on the backend
    PARKED = "parked"  # bytes in host memory (``Running.parked``)
    RELEASED = "released"  # ended


@dataclass
class Running:
    """The running state of one started request (loop thread only)."""

    request: Request
    seq: SeqId
    sampler: Sampler
    text: TextStream
    eog: frozenset[int]
    started: float
    where: Where = Where.NEW
    #: Prompt tokens whose KV state exists (the prompt's last token is evaluated by the first decode).
    prefilled: int = 0
    cached: int = 0
    #: Generated tokens that count as output (an end-of-generation token does not).
    generated: list[int] = field(default_factory=list)
    #: The token to evaluate next: the prompt's last, then each sampled one.
    pending: int | None = None
    pieces: list[str] = field(default_factory=list)
    finish: FinishReason | None = None
    parked: bytes | None = None
    #: When it last got the device (the preemption quantum counts from here).
    slice_started: float = 0.0
    first_at: float | None = None
    decode_s: float = 0.0
    #: Seconds it has held the device (prefill chunks and decode steps; pauses excluded).
    active_s: float = 0.0
    preemptions: int = 0
    parked_bytes: int = 0
    park_s: float = 0.0
    resume_s: float = 0.0

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to evaluate, the last one included."""
        return len(self.request.prompt_tokens) - self.prefilled

    def remaining_tokens(self) -> float:
        """Answer tokens still expected: what is left of the prediction, and once the answer has
        reached it, of the prediction doubled (again each time it is reached: 2P, 4P, ...).

        Why doubling: answer lengths are heavy-tailed, so a request that outlives its prediction
        is evidence of a long one; its estimate jumps (from ~0 to P at the first overrun) and a
        mispredicted long job yields to fresh short ones instead of holding the device to its end.
        Why in steps, not continuously (remaining = tokens served so far, say): a running request
        must grow more attractive as it runs, never less, or two long jobs displace each other at
        every quantum (processor sharing: each switch a park and a restore, and every long job ends
        late). With steps, a job is displaced at most once per doubling, as in FastServe's
        skip-join MLFQ, where each level's quantum doubles."""
        request = self.request
        predicted = UNKNOWN_TOKENS if request.predicted_tokens is None else max(request.predicted_tokens, 1.0)
        n = len(self.generated)
        while predicted <= n:
            predicted *= 2
        return min(predicted - n, request.max_tokens - n)

    def predicted_answer(self) -> float:
        """The whole answer's length as now predicted: generated so far plus still expected."""
        return len(self.generated) + self.remaining_tokens()

    def remaining_cost(self, service: ServiceModel) -> float:
        """What is left of it, in decode-token equivalents (the engine's scheduling unit)."""
        return service.decode_equivalents(self.prompt_left, self.remaining_tokens())

    def accept(self, token: int, detokenize: Callable[[Sequence[int]], bytes]) -> None:
        """Take one sampled token: end on end-of-generation, else emit its text and check the
        stop sequences and max_tokens. Leaves ``finish`` set when the request is done."""
        request = self.request
        if token in self.eog:
            self.finish = FinishReason.STOP
            return
        self.generated.append(token)
        self.pending = token
        out = self.text.push(detokenize((token,)))
        if out:
            self.pieces.append(out)
            request.sink(TokenEvent(out, (token,)))
        constraint = request.constraint
        if constraint is not None:
            constraint.accept(token)
        if self.text.stopped or (constraint is not None and constraint.done):
            self.finish = FinishReason.STOP
        elif len(self.generated) >= request.max_tokens:
            self.finish = FinishReason.LENGTH

    def flush(self) -> None:
        """Send what the stop-sequence buffer still holds (not for a cancelled request)."""
        tail = self.text.finish()
        if tail and self.finish is not FinishReason.CANCELLED:
            self.pieces.append(tail)
            self.request.sink(TokenEvent(tail, ()))

    def result(self, now: float) -> GenerationResult:
        request = self.request
        n_out = len(self.generated)
        decode_tok_s = (n_out - 1) / self.decode_s if n_out >= 2 and self.decode_s > 0 else None
        return GenerationResult(
            request_id=request.request_id,
            text="".join(self.pieces),
            prompt_tokens=len(request.prompt_tokens),
            completion_tokens=n_out,
            finish_reason=self.finish or FinishReason.CANCELLED,
            ttft_s=None if self.first_at is None else self.first_at - request.submitted,
            queue_wait_s=self.started - request.submitted,
            total_s=now - request.submitted,
            decode_tok_s=decode_tok_s,
            chat_template=request.chat_template,
            cached_prompt_tokens=self.cached,
            predicted_tokens=request.predicted_tokens,
            preemptions=self.preemptions,
            parked_bytes=self.parked_bytes,
            park_s=self.park_s,
            resume_s=self.resume_s,
        )


def empty_result(request: Request, now: float, finish: FinishReason) -> GenerationResult:
    """The result of a request that never started."""
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


def final(request: Request, now: float) -> FinalEvent:
    run = request.run
    return FinalEvent(run.result(now) if run is not None else empty_result(request, now, FinishReason.CANCELLED))
