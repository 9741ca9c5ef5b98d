"""Service-time estimates: how long a request will hold the device, from measured token rates.

Pure arithmetic, no clock and no I/O: the engine and the proxy feed it what they measure and ask it
what a request costs. The length predictor's Protocols live here too, where both can see them.
Shortest-job-first orders by this cost, not by answer length alone, because a long prompt's
prefill is part of the job (a chat with a long history and a short answer is not a short job on a
slow device).

    cost_s = prompt tokens still to evaluate / prefill rate + answer tokens still to come / decode rate
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from edgeserve.types import Message

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


#: Rates assumed before anything is measured: Gemma 3 270M on two CPU cores (PLATFORM-NOTES.md).
#: Only their ratio matters for ordering, and the first measured request replaces them.
PRIOR_PREFILL_TOK_S = 800.0
PRIOR_DECODE_TOK_S = 60.0


@dataclass
class ServiceModel:
    """Running estimates of prefill and decode throughput (exponentially weighted)."""

    prefill_tok_s: float = PRIOR_PREFILL_TOK_S
    decode_tok_s: float = PRIOR_DECODE_TOK_S
    #: Weight of the newest observation.
    alpha: float = 0.2
    _prefill_seen: bool = False
    _decode_seen: bool = False

    def estimate_s(self, prompt_tokens: float, answer_tokens: float) -> float:
        """Seconds to evaluate ``prompt_tokens`` and then generate ``answer_tokens``."""
        return max(prompt_tokens, 0.0) / self.prefill_tok_s + max(answer_tokens, 0.0) / self.decode_tok_s

    def decode_equivalents(self, prompt_tokens: float, answer_tokens: float) -> float:
        """The same work in decode-token equivalents (seconds times the decode rate). A cost in
        this unit stays comparable with one computed earlier: it moves with the ratio of the two
        rates, which is steady, not with the rates themselves, which jump from the prior to the
        first measurement and drift with the machine's load."""
        return max(prompt_tokens, 0.0) * self.decode_tok_s / self.prefill_tok_s + max(answer_tokens, 0.0)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        # Tiny prefills (a cached prompt's last token) say more about overhead than throughput.
        if tokens >= 16 and seconds > 0:
            self.prefill_tok_s = self._blend(self.prefill_tok_s, tokens / seconds, self._prefill_seen)
            self._prefill_seen = True

    def observe_decode(self, tokens: int, seconds: float) -> None:
        if tokens >= 1 and seconds > 0:
            self.decode_tok_s = self._blend(self.decode_tok_s, tokens / seconds, self._decode_seen)
            self._decode_seen = True

    def _blend(self, old: float, new: float, seen: bool) -> float:
        return new if not seen else (1 - self.alpha) * old + self.alpha * new
