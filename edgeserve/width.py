"""How many sequences the engine decodes together: ``--parallel``, fixed or chosen from measured step times.

A decode step of ``w`` sequences costs about ``a + b * w`` seconds: ``a`` is the pass over the weights
that every sequence in the step shares, ``b`` each sequence's own work (its attention, its output
row). Both are fitted from the measured step time of every width seen (least squares over the
widths' running averages, so a width decoded for minutes does not drown the others out).

The width then depends on how many requests are present (running and waiting), ``n``. Served ``w``
at a time, ``n`` equal jobs finish in waves, and their mean finish time is proportional to
``(n + w) * (a + b * w) / w``: a wider batch raises throughput, but each of its members finishes
later. The minimum lies at ``w = sqrt(n * a / b)``: wide when many wait (throughput serves everyone
queued), narrow when few do (a short wave ends its members sooner). At 2 threads here a step of 4
cost 72 ms and one of 8 cost 118 ms (``bench/batch_step_cost_threads2.json``): ``a`` 26 ms, ``b``
11.5 ms, so 24 requests get 7 places and 12 get 5. The width also keeps every sequence above
the floor rate: ``a + b * w <= 1 / floor``.

Until two widths have been measured nothing is known of ``b``, and the batch is as wide as the
backend allows (which measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Steps of one width after which its average counts fully in the fit (one step is noise on a
#: shared machine; fewer count in proportion).
MIN_SAMPLES = 3
#: The fit needs its widths this spread out (1 - the squared correlation of the features), or
#: ``a`` and ``b`` cannot be told apart.
FIT_MIN_SPREAD = 0.01


@dataclass
class _Measured:
    step_s: float
    samples: int


class BatchWidth:
    """Step time per batch width (running averages), the fitted step cost, and the width to use.
    Loop thread only."""

    def __init__(self, most: int, *, floor_tok_s: float, fixed: bool) -> None:
        self.most = max(most, 1)
        self.floor_tok_s = floor_tok_s
        self.fixed = fixed
        self._measured: dict[int, _Measured] = {}

    def observe(self, width: int, seconds: float) -> None:
        """One decode step of ``width`` sequences took ``seconds``."""
        if seconds <= 0 or not 1 <= width <= self.most:
            return
        old = self._measured.get(width)
        if old is None:
            self._measured[width] = _Measured(seconds, 1)
        else:
            self._measured[width] = _Measured(0.8 * old.step_s + 0.2 * seconds, old.samples + 1)

    def step_cost(self) -> tuple[float, float] | None:
        """``(a, b)``: a step of ``w`` sequences takes ``a + b * w`` seconds; None until two
        widths have been measured (and the fit is physical: a step costs something)."""
        sw = sx = sy = sxx = sxy = 0.0
        for width, seen in self._measured.items():
            weight = min(seen.samples, MIN_SAMPLES) / MIN_SAMPLES
            sw += weight
            sx += weight * width
            sy += weight * seen.step_s
            sxx += weight * width * width
            sxy += weight * width * seen.step_s
        det = sw * sxx - sx * sx
        if sw <= 0 or det <= FIT_MIN_SPREAD * sw * sxx:
            return None
        b = (sw * sxy - sx * sy) / det
        a = (sy - b * sx) / sw
        if a + b <= 0:
            return None
        return a, b

    def limit(self, present: int) -> int:
        """The widest batch to fill, with ``present`` requests running and waiting."""
        if self.fixed:
            return self.most
        cost = self.step_cost()
        if cost is None:
            return self.most
        a, b = cost
        if b <= 0:  # a wider step costs nothing more: every sequence gains by sharing it
            return self.most
        # Within the floor: the widest whose step still gives each sequence floor_tok_s.
        floor = (1.0 / self.floor_tok_s - a) / b if self.floor_tok_s > 0 else math.inf
        widest = max(1, min(self.most, math.floor(floor)))
        if a <= 0:  # nothing shared: batching only slows each sequence
            return 1
        best = math.sqrt(max(present, 1) * a / b)
        # The integer on either side of the optimum with the lower mean finish time.
        below, above = max(1, math.floor(best)), max(1, math.ceil(best))

        def mean_finish(w: int) -> float:  # up to a constant factor
            return (present + w) * (a + b * w) / w

        return min(widest, below if mean_finish(below) <= mean_finish(above) else above)

    def measured(self) -> dict[int, float]:
        """Seconds per step by width, for metrics and benchmarks."""
        return {width: seen.step_s for width, seen in sorted(self._measured.items())}
