"""Online measurements of the cloud and the link, for the planner (the device's rates come from the
engine's own ``ServiceModel``). Exponentially weighted, starting from stated priors; thread-safe,
one object per ``Handoff`` (never module state)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgeserve.handoff.cloudfit import PrefillSamples
from edgeserve.handoff.planner import Measured
from edgeserve.service import ServiceModel

#: Priors until the first measurement: a GPU server on a LAN, a 100 Mbit/s link, and llama.cpp's f16
#: KV of Gemma 3 270M (~18 KB a token raw, about a quarter after int8 and compression).
PRIOR_RTT_S = 0.05
PRIOR_CLOUD_PREFILL_TOK_S = 5000.0
PRIOR_LINK_BYTES_S = 12.5e6
PRIOR_KV_BYTES_PER_TOKEN = 5000.0
ALPHA = 0.3
#: Prompts at least this long measure the cloud's prefill rate; shorter ones its round trip.
RATE_MIN_TOKENS = 128
#: Seconds the planner leaves a failed cloud alone before trying it again.
DOWN_S = 30.0
#: KV transfers are kept per length bucket, this many buckets an octave: the wire bytes per token
#: fall with the prompt's length (int8 + zlib packs a long state better), so each length is
#: predicted from the measurements nearest to it rather than from one average.
KV_BUCKETS_PER_OCTAVE = 2


@dataclass
class _Ewma:
    value: float
    seen: bool = False

    def add(self, x: float) -> None:
        self.value = x if not self.seen else (1 - ALPHA) * self.value + ALPHA * x
        self.seen = True


class Telemetry:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._down_until = float("-inf")
        self._lock = threading.Lock()
        self._rtt = _Ewma(PRIOR_RTT_S)
        self._cloud_prefill = _Ewma(PRIOR_CLOUD_PREFILL_TOK_S)
        self._link = _Ewma(PRIOR_LINK_BYTES_S)
        # token+kv: the KV state streams beside the cloud's answer, which slows it on a cloud that
        # runs one engine (the answer's steps between the KV job's) and on the device (reading both):
        # 0.1-0.27 s more at 256-1k tokens in bench/handoff.json, so it is measured apart.
        self._link_beside_answer = _Ewma(PRIOR_LINK_BYTES_S)
        self._kv_per_token = _Ewma(PRIOR_KV_BYTES_PER_TOKEN)
        self._kv_points: dict[int, tuple[_Ewma, _Ewma]] = {}  # length bucket: (tokens, wire bytes)
        # The cloud's prefill by length (``cloudfit``): timed by answers' first tokens, and apart
        # by KV jobs' first bytes (the two differ, planner.Measured).
        self._cloud_model = PrefillSamples()
        self._kv_model = PrefillSamples()
        # token+kv: the answer is asked for once the KV job's first bytes came; beyond the round
        # trip its first token waits for the cloud, busy packing the KV state (0.2-0.6 s measured).
        self._answer_after_kv = _Ewma(0.0)
        self._restore = _Ewma(0.0)  # seconds per token; unseen: the planner's own estimate
        self._continue = _Ewma(0.0)  # a top-up's first piece after it was asked for (``refill``)
        self.kv_available = False

    def cloud_ttft(self, prompt_tokens: int, seconds: float) -> None:
        """A cloud answer's first token came ``seconds`` after the request went out."""
        self._cloud_first(prompt_tokens, seconds, self._cloud_model)

    def kv_first_bytes(self, prompt_tokens: int, seconds: float) -> None:
        """A KV job's first bytes came ``seconds`` after it went out (the cloud has prefilled)."""
        self._cloud_first(prompt_tokens, seconds, self._kv_model)

    def _cloud_first(self, prompt_tokens: int, seconds: float, fit: PrefillSamples) -> None:
        with self._lock:
            self._down_until = float("-inf")
            if prompt_tokens < RATE_MIN_TOKENS:
                self._rtt.add(seconds)
            else:
                beyond_rtt = seconds - self._rtt.value
                if beyond_rtt > 0:
                    self._cloud_prefill.add(prompt_tokens / beyond_rtt)
                    fit.add(prompt_tokens, beyond_rtt)

    def rtt(self, seconds: float) -> None:
        with self._lock:
            self._down_until = float("-inf")
            self._rtt.add(seconds)

    def answer_after_kv(self, seconds: float) -> None:
        """token+kv: the answer's first token came ``seconds`` after the KV job's first bytes."""
        if seconds > 0:
            with self._lock:
                self._answer_after_kv.add(seconds)

    def continued(self, seconds: float) -> None:
        """A continuation of a cloud answer (a top-up) sent its first piece ``seconds`` after it was asked."""
        if seconds > 0:
            with self._lock:
                self._down_until = float("-inf")
                self._continue.add(seconds)

    def kv_transfer(self, prompt_tokens: int, wire_bytes: int, seconds: float, *, beside_answer: bool = False) -> None:
        """A KV state of ``prompt_tokens`` took ``wire_bytes`` and ``seconds`` (first to last byte),
        ``beside_answer``: while the cloud also streamed the request's answer (token+kv)."""
        with self._lock:
            if prompt_tokens > 0:
                self._kv_per_token.add(wire_bytes / prompt_tokens)
                bucket = round(KV_BUCKETS_PER_OCTAVE * math.log2(prompt_tokens))
                tokens, size = self._kv_points.setdefault(bucket, (_Ewma(0.0), _Ewma(0.0)))
                tokens.add(prompt_tokens)
                size.add(wire_bytes)
            if seconds > 0 and wire_bytes >= 65536:  # small transfers measure latency, not rate
                (self._link_beside_answer if beside_answer else self._link).add(wire_bytes / seconds)

    def restore(self, prompt_tokens: int, seconds: float) -> None:
        """The device loaded a KV state of ``prompt_tokens`` in ``seconds``."""
        if prompt_tokens >= RATE_MIN_TOKENS:
            with self._lock:
                self._restore.add(seconds / prompt_tokens)

    def cloud_failed(self) -> None:
        """A failure keeps the planner off the cloud for ``DOWN_S`` seconds (then it tries again)."""
        with self._lock:
            self._down_until = self._clock() + DOWN_S

    def measured(self, service: ServiceModel) -> Measured:
        # The length model once fitted (a token at position p costs a + b * p s), else the plain rate.
        fit = service.prefill_coefficients()
        prefill_tok_s, slope = (1.0 / fit[0], fit[1]) if fit is not None else (service.prefill_tok_s, 0.0)
        with self._lock:
            answers, kv = self._cloud_model.fit(), self._kv_model.fit()
            points = tuple(sorted((t.value, b.value) for t, b in self._kv_points.values()))
            return Measured(
                device_prefill_tok_s=prefill_tok_s,
                device_prefill_slope_s=slope,
                device_decode_tok_s=service.decode_tok_s,
                cloud_rtt_s=self._rtt.value,
                cloud_prefill_tok_s=self._cloud_prefill.value if answers is None else answers.tok_s,
                cloud_prefill_slope_s=0.0 if answers is None else answers.slope_s,
                cloud_fixed_s=0.0 if answers is None else answers.fixed_s,
                kv_prefill_tok_s=None if kv is None else kv.tok_s,
                kv_prefill_slope_s=0.0 if kv is None else kv.slope_s,
                kv_fixed_s=0.0 if kv is None else kv.fixed_s,
                link_bytes_s=self._link.value,
                link_bytes_s_beside_answer=self._link_beside_answer.value if self._link_beside_answer.seen else None,
                kv_bytes_per_token=self._kv_per_token.value,
                cloud_up=self._clock() >= self._down_until,
                kv_available=self.kv_available,
                restore_s_per_token=self._restore.value if self._restore.seen else None,
                kv_points=points,
                answer_after_kv_s=self._answer_after_kv.value if self._answer_after_kv.seen else None,
                continue_s=self._continue.value if self._continue.seen else None,
            )
