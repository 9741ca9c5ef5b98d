"""Internal data types shared by the engine, the backends and the front ends.

Wire formats (OpenAI, Ollama JSON) live apart from these, in the server package; these are what
flows through the engine.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from edgeserve.errors import InvalidParameterError

#: A chat message as OpenAI sends it: ``content`` may be a string or a list of content parts.
Message: TypeAlias = Mapping[str, Any]


class FinishReason(str, enum.Enum):
    """Why a generation ended. The values are OpenAI's ``finish_reason`` where one exists."""

    STOP = "stop"  # an end-of-generation token or a stop sequence
    LENGTH = "length"  # max_tokens reached
    TOOL_CALLS = "tool_calls"  # the answer is a complete tool call (GenerationResult.tool_calls)
    CANCELLED = "cancelled"  # the caller cancelled or disconnected
    ERROR = "error"  # the backend failed; the stream carries the error


#: The smallest repetition penalty (float32 keeps it above 0; see SamplingParams).
MIN_REPETITION_PENALTY = 1e-30


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction, before any work starts.

    ``temperature == 0`` means greedy. ``seed=None`` draws a fresh seed per request.
    ``ignore_eos`` keeps generating through end-of-generation tokens so that exactly
    ``max_tokens`` tokens come out (benchmarks need fixed output lengths).
    """

    #: None: until an end-of-generation token or the context is full (OpenAI's meaning when omitted).
    max_tokens: int | None = field(
        default=256, metadata={"help": "Tokens to generate at most (None: until the end or the context is full)."}
    )
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = field(
        default=0.95, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this much mass."}
    )
    top_k: int = field(default=40, metadata={"help": "Keep the k likeliest tokens; 0 disables top-k."})
    min_p: float = field(
        default=0.0, metadata={"help": "Drop tokens less likely than min_p times the likeliest; 0 disables it."}
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed for reproducible sampling (default: a fresh one per request)."}
    )
    stop: tuple[str, ...] = field(
        default=(), metadata={"help": "Stop sequence; generation ends before it (repeatable, at most 16)."}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Divide the logits of recent tokens by this (1.0 disables it)."}
    )
    presence_penalty: float = field(
        default=0.0, metadata={"help": "Subtract this from the logits of tokens already generated (-2..2)."}
    )
    frequency_penalty: float = field(
        default=0.0, metadata={"help": "Subtract this times each token's count so far (-2..2)."}
    )
    ignore_eos: bool = field(
        default=False, metadata={"help": "Generate through end-of-generation tokens: exactly max_tokens tokens."}
    )
    logit_bias: Mapping[int, float] = field(
        default_factory=dict, metadata={"help": "Token id to a number added to its logit, as JSON: '{\"123\": 5}'."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop sequence, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens must be >= 1",
            "max_tokens",
        )
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature must be >= 0", "temperature")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]", "top_p")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be >= 0 (0 disables it)", "top_k")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]", "min_p")
        _check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32),
            "seed must be an integer in [0, 2**32)",
            "seed",
        )
        # Samplers hold it as float32, where a smaller one is 0: then a penalized -inf (a token a
        # grammar forbids) times 0 is NaN, and the sampler may pick anything.
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty >= MIN_REPETITION_PENALTY,
            f"repetition_penalty must be >= {MIN_REPETITION_PENALTY} (1.0 disables it)",
            "repetition_penalty",
        )
        _check(
            _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty must be in [-2, 2]",
            "presence_penalty",
        )
        _check(
            _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty must be in [-2, 2]",
            "frequency_penalty",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
            "stop must be at most 16 non-empty strings",
            "stop",
        )
        _check(
            all(isinstance(k, int) and k >= 0 and _finite(v) for k, v in self.logit_bias.items()),
            "logit_bias maps token ids (>= 0) to finite numbers",
            "logit_bias",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidParameterError(message, param=param)


@dataclass(frozen=True)
class Capabilities:
    """What a loaded backend can do; front ends and later features read this, never the backend type."""

    backend: str
    model: str
    n_ctx: int
    n_vocab: int
    eog_token_ids: frozenset[int]
    bos_token_id: int | None
    #: Jinja chat template from the model file, if it has one.
    chat_template: str | None = None
    #: Text of the BOS/EOS tokens, as chat templates write them.
    bos_token: str = ""
    eos_token: str = ""
    #: Model architecture as the model file names it (e.g. ``gemma3``); picks a fallback template.
    architecture: str = ""
    kv_state: bool = False
    device: str = "cpu"
    #: Sequences that can be open (hold live KV state) at once; more are parked to host memory.
    max_sequences: int = 1
    #: Sequences one ``decode`` call evaluates together, in one pass over the weights (1: it loops).
    max_batch: int = 1
    #: Bytes of KV cache the backend reserved for its open sequences (0: not known).
    kv_bytes: int = 0


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on this machine: what was asked for, the file, and where it was found."""

    name: str
    path: Path
    #: ``file``, ``default``, ``ollama``, ``huggingface``.
    source: str


@dataclass(frozen=True)
class TokenEvent:
    """New text from a running generation. Tokens whose bytes are held back (part of a multi-byte
    character or of a possible stop sequence) send no event; their text comes with a later one, so
    ``token_ids`` lists only the token that released it."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ToolCall:
    """A function call the model answered with (``Engine.generate(..., tools=...)``)."""

    id: str
    name: str
    #: The arguments as JSON text (OpenAI's wire form); they follow the tool's parameters schema.
    arguments: str


@dataclass(frozen=True)
class GenerationResult:
    """The whole of one request: what came out and how fast."""

    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    #: Seconds from submission to the first token (queue wait included).
    ttft_s: float | None
    #: Seconds spent waiting for the engine before work started.
    queue_wait_s: float
    #: Seconds from submission to the end.
    total_s: float
    #: Decode speed after the first token (tokens / second); None with fewer than two tokens.
    decode_tok_s: float | None
    #: Which chat template rendered the messages: ``model``, ``builtin:<name>`` or None for a plain prompt.
    chat_template: str | None = None
    #: Tokens of the prompt served from the backend's KV cache instead of prefilled again.
    cached_prompt_tokens: int = 0
    #: What the length predictor expected (None: not predicted, e.g. under fcfs).
    predicted_tokens: float | None = None
    #: Times a shorter request displaced this one (srpt), its KV state parked meanwhile.
    preemptions: int = 0
    #: Bytes of KV state parked for it, and seconds spent parking and restoring it.
    parked_bytes: int = 0
    park_s: float = 0.0
    resume_s: float = 0.0
    #: The calls the answer made when tools were offered (``text`` then holds any other text).
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class FinalEvent:
    result: GenerationResult


@dataclass(frozen=True)
class ErrorEvent:
    error: Exception


StreamEvent: TypeAlias = TokenEvent | FinalEvent | ErrorEvent

Prompt: TypeAlias = str | Sequence[int]
PromptKind: TypeAlias = Literal["text", "tokens", "chat"]
