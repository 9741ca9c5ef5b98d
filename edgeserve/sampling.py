"""One token sampler for the backends that hand logits to Python (MLX, ONNX Runtime).

llama.cpp's sampler chain, in llama.cpp's order, over a NumPy row of logits:

    logit bias -> repetition / frequency / presence penalties (last ``PENALTY_LAST_N`` generated
    tokens) -> greedy, or top-k -> top-p -> min-p -> temperature -> a seeded draw

so that every ``SamplingParams`` field means on those backends what it means on the llama backend
(which runs the same chain natively; ``tests/test_sampling.py`` checks that the two distributions
agree). A ``Sampler`` is a request's sampling *state*: its random generator and its penalty
history live here, not in a backend's decode loop, so a request paused between two tokens and
resumed later draws exactly what it would have drawn without the pause: each draw takes exactly
one number from the generator, whatever path picks the token.

The truncation and the draw run in the fused CPU kernel (``kernels.sample_cpu``: no sort of the
vocabulary); ``Sampler.distribution`` is the reference chain (``kernels.sample_ref``) that the
kernel is tested against and falls back to.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeserve.kernels import sample_cpu, sample_ref
from edgeserve.types import SamplingParams

#: How far back the repetition/frequency/presence penalties look, in generated tokens (every backend).
PENALTY_LAST_N = 64

Logits = np.ndarray[Any, np.dtype[np.float32]]


def fresh_seed(params: SamplingParams) -> int:
    """The request's seed, or a new one: ``seed=None`` promises a different draw per request."""
    return params.seed if params.seed is not None else random.randrange(2**32 - 1)


class Sampler:
    """Picks tokens for one request. Penalties look at the tokens this sampler picked (the llama
    backend's native chain sees only those too), never at the prompt."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.history: collections.deque[int] = collections.deque(maxlen=PENALTY_LAST_N)
        self._penalize = bool(params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty)
        self._bias: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            self._bias = (np.array(ids), np.array([params.logit_bias[i] for i in ids], dtype=np.float32))
        self.rng = np.random.default_rng(fresh_seed(params))

    def __call__(self, logits: Logits) -> int:
        """Pick the next token from ``logits`` ([n_vocab]) and remember it."""
        logits = self.adjusted(logits)
        token = int(np.argmax(logits)) if self.params.greedy else self._draw(logits)
        self.history.append(token)
        return token

    @property
    def plain(self) -> bool:
        """No bias and no penalty in effect for the next token: a device kernel may take the raw logits."""
        return self._bias is None and not (self._penalize and self.history)

    def draw_with(self, kernel: Callable[[float], int]) -> int:
        """Pick the next token with a device kernel instead of the NumPy one: ``kernel`` gets this
        draw's uniform and returns the token. The generator and the history advance exactly as
        ``__call__``'s do (one uniform per token), so parking and resuming stay exact across the
        two paths. Greedy requests take an argmax and never come here."""
        token = int(kernel(self.rng.random()))
        self.history.append(token)
        return token

    def close(self) -> None:
        """Nothing to free (the llama backend's native sampler has to; the engine calls both alike)."""

    def adjusted(self, logits: Logits) -> Logits:
        """The logits after bias and penalties (a copy when anything changes; the input stays as it is)."""
        p = self.params
        if self._bias is None and not (self._penalize and self.history):
            return logits
        logits = np.array(logits, dtype=np.float32)
        if self._bias is not None:
            np.add.at(logits, self._bias[0], self._bias[1])
        if self._penalize and self.history:
            counts = collections.Counter(self.history)
            ids = np.fromiter(counts, dtype=np.int64)
            n = np.fromiter(counts.values(), dtype=np.float32)
            seen = logits[ids]
            if p.repetition_penalty != 1:
                with np.errstate(over="ignore", divide="ignore"):  # an extreme penalty: inf is its limit
                    seen = np.where(seen <= 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
            logits[ids] = seen - n * p.frequency_penalty - p.presence_penalty
        return logits

    def distribution(self, logits: Logits) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(candidate ids ascending, their probabilities) by the *reference* chain
        (``kernels.sample_ref``), on already adjusted logits: what every draw is tested against,
        here and in the cross-backend check against llama.cpp."""
        p = self.params
        return sample_ref.distribution(logits, p.top_k, p.top_p, p.min_p, p.temperature)

    def _draw(self, logits: Logits) -> int:
        p = self.params
        return sample_cpu.sample(logits, p.top_k, p.top_p, p.min_p, p.temperature, self.rng.random())
