"""The cloud's time to its first answer token (or first KV bytes) as a function of the prompt's
length, fitted from recent measurements: ``fixed + a * n + b * n**2 / 2`` seconds beyond the round
trip, the device's length model (``ServiceModel.prefill_s``: a token at position p costs a + b * p)
plus a fixed cost per request (the first decode step, the HTTP answer; 0.3-0.5 s measured on the
bench's loopback cloud, bench/handoff.json), which a model through the origin would spread over the
tokens, overpredicting long prompts from short ones and the reverse."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

#: Measurements kept: the fit follows the cloud's load by forgetting the oldest.
KEEP = 32
#: Terms tried, the full model first; a fit is kept only if it is physical (no negative cost).
_TERMS = ((0, 1, 2), (1, 2), (0, 1), (1,))
_SCALE = 1000.0  # tokens per unit in the fit (conditioning)
#: Longest over shortest length measured before a fit with more than one term: from two close
#: lengths (300 and 256 tokens: a warm-up and a first prompt) the fit's growth is noise, and
#: extrapolated it predicted a 1k prompt at 3-4x its time (bench/handoff.json, 1k cell).
MIN_SPREAD = 2.0


@dataclass(frozen=True)
class PrefillFit:
    fixed_s: float
    tok_s: float  # 1 / a
    slope_s: float  # b


class PrefillSamples:
    """Recent ``(prompt tokens, seconds beyond the round trip)``; not thread-safe (the caller locks)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=keep)

    def add(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self._samples.append((float(tokens), seconds))

    def fit(self) -> PrefillFit | None:
        """The fullest physical fit the lengths measured so far support (None: nothing measured)."""
        if not self._samples:
            return None
        n = np.array([s[0] for s in self._samples]) / _SCALE
        t = np.array([s[1] for s in self._samples])
        columns = np.stack([np.ones_like(n), n, n * n / 2], axis=1)
        distinct = len(set(n.tolist()))
        spread = float(n.max() / n.min())
        for terms in _TERMS:
            if distinct < len(terms) or (len(terms) > 1 and spread < MIN_SPREAD):
                continue
            solved, *_ = np.linalg.lstsq(columns[:, terms], t, rcond=None)
            c = dict(zip(terms, solved.tolist(), strict=True))
            if c[1] > 0 and c.get(0, 0.0) >= 0 and c.get(2, 0.0) >= 0:
                return PrefillFit(c.get(0, 0.0), _SCALE / c[1], c.get(2, 0.0) / _SCALE**2)
        return None
