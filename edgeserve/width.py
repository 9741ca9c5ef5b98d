"""How many sequences the engine decodes together: ``--parallel``, fixed or measured.

On a CPU a batched decode step costs more than a single one, but far less than one per sequence
(the weights are read once). Wider batches raise throughput until the step turns compute-bound;
past that each sequence only slows down. Unpinned, the width is the largest one whose measured
per-sequence decode rate stays above a floor (a sequence must still stream at a readable pace)
and which still adds throughput over every narrower width measured. A width not measured yet
counts as good, so the engine tries wider batches when the load offers them and settles on what
this machine and model sustain.
"""

from __future__ import annotations

#: A wider batch must raise aggregate throughput by at least this factor over every narrower one.
MIN_GAIN = 1.05


class BatchWidth:
    """Step time per batch width (running averages) and the width to use. Loop thread only."""

    def __init__(self, most: int, *, floor_tok_s: float, fixed: bool) -> None:
        self.most = max(most, 1)
        self.floor_tok_s = floor_tok_s
        self.fixed = fixed
        self._step_s: dict[int, float] = {}

    def observe(self, width: int, seconds: float) -> None:
        """One decode step of ``width`` sequences took ``seconds``."""
        if seconds <= 0 or not 1 <= width <= self.most:
            return
        old = self._step_s.get(width)
        self._step_s[width] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def limit(self) -> int:
        """The widest batch to fill now."""
        if self.fixed:
            return self.most
        best_rate = 0.0
        for width in range(1, self.most + 1):
            step = self._step_s.get(width)
            if step is None:
                continue
            rate = width / step
            if width > 1 and (1 / step < self.floor_tok_s or rate < MIN_GAIN * best_rate):
                return width - 1
            best_rate = max(best_rate, rate)
        return self.most

    def measured(self) -> dict[int, float]:
        """Seconds per step by width, for metrics and benchmarks."""
        return dict(sorted(self._step_s.items()))
