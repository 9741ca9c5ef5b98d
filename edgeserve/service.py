"""Service-time estimates: how long a request will hold the device, from measured token rates.

Pure arithmetic, no clock and no I/O: the engine and the proxy feed it what they measure and ask it
what a request costs. The length predictor's Protocols live here too, where both can see them.
Shortest-job-first orders by this cost, not by answer length alone, because a long prompt's
prefill is part of the job (a chat with a long history and a short answer is not a short job on a
slow device).

    cost_s = prompt tokens still to evaluate / prefill rate + answer tokens still to come / decode rate

A prompt's prefill is not linear in its length: every token attends to all those before it, so on a
small model (Gemma 3 270M: a few hundred MFLOP of weights per token) attention soon costs as much as
the weights, and a device's rate at 4k tokens is a third of its rate at 256. ``prefill_s`` models
that: a token at position p costs ``a + b * p`` seconds, fitted online (least squares with
forgetting) from measured chunks and where each started. ``prefill_tok_s`` stays the plain average
rate, for the orderings that only compare costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
#: The length model: positions in thousands (a well-scaled fit), each older chunk's weight kept at
#: this factor per new one (about the last 50 chunks count), and the spread of positions below which
#: the two terms cannot be told apart (1 - squared correlation of the features).
POSITION_SCALE = 1000.0
FIT_FORGET = 0.98
FIT_MIN_SPREAD = 0.01


@dataclass
class ServiceModel:
    """Running estimates of prefill and decode throughput (exponentially weighted)."""

    prefill_tok_s: float = PRIOR_PREFILL_TOK_S
    decode_tok_s: float = PRIOR_DECODE_TOK_S
    #: Weight of the newest observation.
    alpha: float = 0.2
    _prefill_seen: bool = False
    _decode_seen: bool = False
    #: The length model's weighted sums (features: tokens, tokens x mean position / POSITION_SCALE).
    _fit: list[float] = field(default_factory=lambda: [0.0] * 5)

    def prefill_s(self, tokens: float, start: float = 0.0) -> float:
        """Seconds to evaluate ``tokens`` prompt tokens after ``start`` already in the cache: the
        fitted length model once the measured chunks span enough positions, else the average rate."""
        tokens, start = max(tokens, 0.0), max(start, 0.0)
        coeffs = self.prefill_coefficients()
        if coeffs is None:
            return tokens / self.prefill_tok_s
        a, b = coeffs
        return a * tokens + b * tokens * (start + tokens / 2)

    def prefill_coefficients(self) -> tuple[float, float] | None:
        """``(a, b)``: a token at position p costs ``a + b * p`` seconds; None until fitted (the
        chunks measured so far must span positions, and the fit must be physical: a > 0, b >= 0)."""
        sxx, sxz, szz, sxy, szy = self._fit
        det = sxx * szz - sxz * sxz
        if sxx <= 0 or det <= FIT_MIN_SPREAD * sxx * szz:
            return None
        a = (szz * sxy - sxz * szy) / det
        b = (sxx * szy - sxz * sxy) / det / POSITION_SCALE
        if a <= 0:
            return None
        if b < 0:  # no growth measured: the plain rate through the origin
            return sxy / sxx, 0.0
        return a, b

    def estimate_s(self, prompt_tokens: float, answer_tokens: float) -> float:
        """Seconds to evaluate ``prompt_tokens`` and then generate ``answer_tokens``."""
        return max(prompt_tokens, 0.0) / self.prefill_tok_s + max(answer_tokens, 0.0) / self.decode_tok_s

    def decode_equivalents(self, prompt_tokens: float, answer_tokens: float) -> float:
        """The same work in decode-token equivalents (seconds times the decode rate). A cost in
        this unit stays comparable with one computed earlier: it moves with the ratio of the two
        rates, which is steady, not with the rates themselves, which jump from the prior to the
        first measurement and drift with the machine's load."""
        return max(prompt_tokens, 0.0) * self.decode_tok_s / self.prefill_tok_s + max(answer_tokens, 0.0)

    def observe_prefill(self, tokens: int, seconds: float, start: int = 0) -> None:
        """``tokens`` prompt tokens took ``seconds``, after ``start`` already in the cache (a chunk
        of a longer prompt starts past 0)."""
        # Tiny prefills (a cached prompt's last token) say more about overhead than throughput.
        if tokens >= 16 and seconds > 0:
            self.prefill_tok_s = self._blend(self.prefill_tok_s, tokens / seconds, self._prefill_seen)
            self._prefill_seen = True
            x, z = float(tokens), tokens * (start + tokens / 2) / POSITION_SCALE
            # Least squares of seconds on (x, z), each sum decayed so the fit follows the machine.
            keep = FIT_FORGET
            for i, term in enumerate((x * x, x * z, z * z, x * seconds, z * seconds)):
                self._fit[i] = keep * self._fit[i] + term

    def observe_decode(self, tokens: int, seconds: float) -> None:
        if tokens >= 1 and seconds > 0:
            self.decode_tok_s = self._blend(self.decode_tok_s, tokens / seconds, self._decode_seen)
            self._decode_seen = True

    def _blend(self, old: float, new: float, seen: bool) -> float:
        return new if not seen else (1 - self.alpha) * old + self.alpha * new
