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

Under a policy that runs the shortest work first, the widest batch is not always the best one:
where a wider step adds little throughput, every sequence in it streams slower and every request
ends later. So the loop also passes the predicted work of the requests present, and the width is
no wider than the one at which that work, run shortest first on the fitted step, ends soonest on
average, as long as all of it ends at most ``MAKESPAN_SLACK`` later than at the width that ends
it soonest (``quickest``). Where the shared cost ``a`` dwarfs the per-sequence one ``b`` that is the
widest batch; where they are alike, a narrower one (on a CPU whose steps grow almost with the
width, about eight for a burst of two dozen requests).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
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
#: The present work ``quickest`` weighs, shortest first, in multiples of the widest batch (the
#: rest would wait behind it whatever the width).
WORK_HORIZON = 4
#: How much later than at the quickest width the present work may end, for a lower mean finish.
MAKESPAN_SLACK = 0.05
#: Seconds a width chosen for the present work holds while as many requests are present.
QUICKEST_HOLD_S = 0.5


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
        #: Each width's step time as last settled (``MIN_SAMPLES`` steps), kept past ``RETRY_S``:
        #: after an idle spell the width for the present work is still chosen from a fitted step.
        self._settled: dict[int, float] = {}
        #: The last width ``quickest`` chose: (requests weighed, when, width).
        self._quickest: tuple[int, float, int] | None = None

    def observe(self, width: int, seconds: float, now: float) -> None:
        """One decode step of ``width`` sequences took ``seconds`` (at time ``now``)."""
        if seconds <= 0 or not 1 <= width <= self.most:
            return
        old = self._measured.get(width)
        if old is None or now - old.at > RETRY_S:
            self._measured[width] = _Measured(seconds, 1, now)
        else:
            self._measured[width] = _Measured(0.8 * old.step_s + 0.2 * seconds, old.samples + 1, now)
        if self._measured[width].samples >= MIN_SAMPLES:
            self._settled[width] = self._measured[width].step_s

    def limit(self, now: float, work: Sequence[float] = (), short: int = 0) -> int:
        """The widest batch to fill now. ``work``: the remaining work of the requests present
        (decode-token equivalents), where the policy runs the shortest first; the batch is then
        no wider than the width that ends them soonest on average, but wide enough for the
        ``short`` requests present that are predicted short (the throughput and floor bounds
        still hold). Length predictions are rough, and a short request that waits outside a
        narrow batch waits far longer than it runs."""
        if self.fixed:
            return self.most
        seen = {width: m for width, m in self._measured.items() if m.samples >= MIN_SAMPLES and now - m.at <= RETRY_S}
        # The floor as measured: never as wide as a width that was seen under it.
        most = min([width - 1 for width, m in seen.items() if 1 / m.step_s < self.floor_tok_s], default=self.most)
        fit = _fit({width: m.step_s for width, m in seen.items()})
        if fit is not None:
            a, b = fit
            if a > 0 and b > 0:
                most = min(most, self._widest(a, b))
            elif b > 0:  # steps grow faster than the width: no line fits; the best measured rate
                most = min(most, max(seen, key=lambda width: width / seen[width].step_s))
        settled = _fit(self._settled)
        if len(work) > 1 and settled is not None and settled[0] > 0 and settled[1] > 0:
            a, b = settled
            most = min(most, max(short, self._quickest_held(work, a, b, most, now)))
        return max(1, min(most, self.most))

    def _quickest_held(self, work: Sequence[float], a: float, b: float, most: int, now: float) -> int:
        """``quickest`` for the present work, computed afresh when as many requests are present
        as last time only every ``QUICKEST_HOLD_S`` (it simulates a dozen or more widths)."""
        held = self._quickest
        n = len(work)
        if held is not None and held[0] == n and now - held[1] < QUICKEST_HOLD_S:
            return held[2]
        width = quickest(heapq.nsmallest(WORK_HORIZON * self.most, work), a, b, most)
        self._quickest = (n, now, width)
        return width

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


def _fit(steps: dict[int, float]) -> tuple[float, float] | None:
    """``(a, b)`` of the least-squares line ``step = a + b * width`` through the step times by
    width, or None while the widths span too little to trust one."""
    if len(steps) < 2 or max(steps) < MIN_SPAN * min(steps):
        return None
    mean_w = sum(steps) / len(steps)
    mean_s = sum(steps.values()) / len(steps)
    var = sum((w - mean_w) ** 2 for w in steps)
    b = sum((w - mean_w) * (step - mean_s) for w, step in steps.items()) / var
    return mean_s - b * mean_w, b


def finish_times(work: Sequence[float], width: int, a: float, b: float) -> tuple[float, float]:
    """(mean, last) finish time of ``work`` (tokens each, at least one) run shortest first,
    ``width`` at a time, on a step that costs ``a + b * k`` for ``k`` running: a request that
    ends frees its place for the next at once (continuous batching)."""
    pending = sorted(max(w, 1.0) for w in work)
    # Every running request advances one token a step, so each is kept as the count of steps
    # (since the start) at which it ends.
    ends = pending[:width]
    heapq.heapify(ends)
    nxt, steps, t, total = width, 0.0, 0.0, 0.0
    while ends:
        end = heapq.heappop(ends)
        t += (end - steps) * (a + b * (len(ends) + 1))
        steps = end
        total += t
        if nxt < len(pending):
            heapq.heappush(ends, steps + pending[nxt])
            nxt += 1
    return total / len(pending), t


def quickest(work: Sequence[float], a: float, b: float, most: int) -> int:
    """The width, at most ``most``, at which ``work`` ends soonest on average, among the widths
    that end all of it within ``MAKESPAN_SLACK`` of the earliest end (``finish_times``); the
    widest of equals."""
    times = {width: finish_times(work, width, a, b) for width in range(1, max(most, 1) + 1)}
    earliest = min(last for _, last in times.values())
    allowed = [width for width, (_, last) in times.items() if last <= earliest * (1 + MAKESPAN_SLACK)]
    best = min(times[width][0] for width in allowed)
    return max(width for width in allowed if times[width][0] <= best * (1 + 1e-9))
