"""How many sequences the engine decodes together: ``--parallel``, fixed or measured.

On a CPU a batched decode step costs more than a single one, but far less than one per sequence
(the weights are read once). Wider batches raise throughput until the step turns compute-bound;
past that each sequence only slows down. Unpinned, the width is the largest one whose measured
per-sequence decode rate stays above a floor (a sequence must still stream at a readable pace)
and which still adds throughput over every narrower width measured.

A width counts as good until it has been measured a few times (one step is noise on a shared
machine), and a verdict expires after ``RETRY_S``: a width rejected during a burst of contention
is tried again later instead of being locked out for the life of the process.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A wider batch must raise aggregate throughput by at least this factor over every narrower one.
MIN_GAIN = 1.05
#: Steps of one width before its average may reject it.
MIN_SAMPLES = 3
#: Seconds after which a width's measurement no longer counts (it is measured afresh).
RETRY_S = 20.0


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
        best_rate = 0.0
        for width in range(1, self.most + 1):
            seen = self._measured.get(width)
            if seen is None or seen.samples < MIN_SAMPLES or now - seen.at > RETRY_S:
                continue
            rate = width / seen.step_s
            if width > 1 and (1 / seen.step_s < self.floor_tok_s or rate < MIN_GAIN * best_rate):
                return width - 1
            best_rate = max(best_rate, rate)
        return self.most

    def measured(self) -> dict[int, float]:
        """Seconds per decode step by width (running averages), for metrics and benchmarks."""
        # A copy first (atomic under the GIL): /metrics reads this from another thread.
        return {width: seen.step_s for width, seen in sorted(dict(self._measured).items())}
