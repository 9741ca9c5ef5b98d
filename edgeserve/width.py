"""How many sequences the engine decodes together: ``--parallel``, fixed or measured.

On a CPU a batched decode step costs more than a single one, but far less than one per sequence
(the weights are read once): a step of ``w`` sequences takes about ``a + b * w``, a fixed cost
shared by the batch plus a cost per sequence. Wider batches raise throughput ``w / (a + b * w)``
toward ``1 / b``; the closer to it, the less a wider batch adds while every sequence slows down.
Unpinned, the width is the largest one whose per-sequence decode rate stays above a floor (a
sequence must still stream at a readable pace) and at which doubling the width still adds
``DOUBLING_GAIN`` throughput, both read from ``a`` and ``b`` fitted to the measured step times.

The fit pools every width measured, so one noisy width cannot reject itself: comparing each width
with the next one could not work, since near the top of the range a width adds 2-4% over the one
before it, less than a step's noise on a shared machine. Where steps grow faster than the width
(no line with a shared cost fits), the width with the best measured throughput is the limit.

A width counts once it has been measured a few times, and a measurement expires after
``RETRY_S``: a width judged during a burst of contention is measured afresh later instead of
being locked out for the life of the process.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Doubling the width must raise aggregate throughput by at least this factor.
DOUBLING_GAIN = 1.05
#: Steps of one width before it counts.
MIN_SAMPLES = 3
#: Seconds after which a width's measurement no longer counts (it is measured afresh).
RETRY_S = 20.0
#: The measured widths must span this ratio before a fit is trusted: two neighbours' step times
#: differ by less than their noise, so a line through them says nothing.
MIN_SPAN = 2.0


@dataclass
class _Measured:
    step_s: float
    samples: int
    at: float


class BatchWidth:
    """Step time per batch width (running averages) and the width to use. Loop thread only."""

    def __init__(self, most: int, *, floor_tok_s: float, fixed: bool) -> None:
        self.most = max(most, 1)
        self.floor_tok_s = floor_tok_s
        self.fixed = fixed
        self._measured: dict[int, _Measured] = {}

    def observe(self, width: int, seconds: float, now: float) -> None:
        """One decode step of ``width`` sequences took ``seconds`` (at time ``now``)."""
        if seconds <= 0 or not 1 <= width <= self.most:
            return
        old = self._measured.get(width)
        if old is None or now - old.at > RETRY_S:
            self._measured[width] = _Measured(seconds, 1, now)
        else:
            self._measured[width] = _Measured(0.8 * old.step_s + 0.2 * seconds, old.samples + 1, now)

    def limit(self, now: float) -> int:
        """The widest batch to fill now."""
        if self.fixed:
            return self.most
        seen = {width: m for width, m in self._measured.items() if m.samples >= MIN_SAMPLES and now - m.at <= RETRY_S}
        # The floor as measured: never as wide as a width that was seen under it.
        most = min([width - 1 for width, m in seen.items() if 1 / m.step_s < self.floor_tok_s], default=self.most)
        fit = _fit(seen)
        if fit is not None:
            a, b = fit
            if a > 0 and b > 0:
                most = min(most, self._widest(a, b))
            elif b > 0:  # steps grow faster than the width: no line fits; the best measured rate
                most = min(most, max(seen, key=lambda width: width / seen[width].step_s))
        return max(1, min(most, self.most))

    def _widest(self, a: float, b: float) -> int:
        """The widest batch the fitted step ``a + b * w`` allows."""
        floor = (1 / self.floor_tok_s - a) / b
        # rate(w) / rate(w / 2) = (2a + bw) / (a + bw) >= DOUBLING_GAIN
        doubling = a * (2 - DOUBLING_GAIN) / (b * (DOUBLING_GAIN - 1))
        return int(min(floor, doubling, float(self.most)) + 1e-9)  # not 11.999... for a bound of 12

    def measured(self) -> dict[int, float]:
        """Seconds per decode step by width (running averages), for metrics and benchmarks."""
        # A copy first (atomic under the GIL): /metrics reads this from another thread.
        return {width: seen.step_s for width, seen in sorted(dict(self._measured).items())}


def _fit(seen: dict[int, _Measured]) -> tuple[float, float] | None:
    """``(a, b)`` of the least-squares line ``step = a + b * width`` through the measured widths'
    running averages, or None while they span too little to trust one."""
    if len(seen) < 2 or max(seen) < MIN_SPAN * min(seen):
        return None
    mean_w = sum(seen) / len(seen)
    mean_s = sum(m.step_s for m in seen.values()) / len(seen)
    var = sum((w - mean_w) ** 2 for w in seen)
    b = sum((w - mean_w) * (m.step_s - mean_s) for w, m in seen.items()) / var
    return mean_s - b * mean_w, b
