"""Choosing the CPU thread count from measured decode step times: a pure controller.

Why: llama.cpp's threads meet at a barrier after every operation of every step. With as many
threads as cores and one other CPU-bound process, one thread has no core, every barrier waits for
it, and decode fell here from ~70 to 0.5-1.2 tok/s; one thread gave 48-55 tok/s. Laptops, phones and
boards are always running something else (browsers, IDEs, big.LITTLE cores, thermal limits), so the
default count has to follow the machine, not its core count.

How: ``ThreadTuner`` is fed the duration of each decode step and answers with a new count when one
should change. It owns no thread, no clock and no backend (the caller measures the step and applies
the count, e.g. ``llama_set_n_threads``), so tests script the step times.

- **Probe.** Counts come from a ladder (1, 2, 4, ..., max-1, max). A count is measured over a few
  steps after one warm-up step (new threads); its median step time is its score. The first probe
  climbs from 1 (never catastrophic) while each rung is faster by more than ``tolerance``; among
  counts within ``tolerance`` of the fastest the fewest threads win (they leave cores to the rest
  of the machine at no cost to decode).
- **Abort.** A rung may spend at most ``abort_factor`` x what the fastest rung so far took for a
  whole probe (warm-up and measured steps); past that it ends at once, and so does the climb: more
  threads only add contention. A single noisy step on a shared machine does not end a good rung.
  Beside a competitor one step at a wrong count can take seconds (7.9 s was seen here), so
  ``deadline_s`` tells the caller when to cut the step short (3x the fastest step for the first);
  the caller reports it with ``observe(..., aborted=True)`` and runs the step again.
- **Contention.** In steady state a step slower than ``spike_factor`` x the recent median, or three
  in a row above ``jump_factor`` x, start a probe downwards: the rung below, then the current count
  again (a burst of another process's work passes; real contention stays, and the budget ends the
  current count within a step). It never probes upwards and leaves the re-probe backoff alone:
  on a noisy machine jumps are frequent, and each upward probe of a count without a core costs.
- **Re-probe.** Conditions also improve (the competitor exits), which a steady step time cannot show
  at a lower count. Every ``reprobe_s`` seconds of decode the neighbours are probed again; an
  unchanged answer doubles the interval (to ``max_reprobe_s``), a change resets it.

Only measured step times decide. The winner changes with the load, and not as a rule of thumb
says: on this shared 2-core machine, beside a competitor and other work, one run measured 2 threads
at 27 tok/s against 10 for 1 thread (time is shared per thread), another 0.5-0.8 against 11. A
reading of idle cores (tried first) would have vetoed the 2 threads of the first run. The cost of
not guessing is one slow step per re-probe, backed off.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TunerConfig:
    warmup_steps: int = 1
    probe_steps: int = 3
    #: Steady steps kept for the recent median (the contention reference).
    window: int = 8
    jump_factor: float = 1.5
    spike_factor: float = 5.0
    abort_factor: float = 2.0
    #: The first step at a count on probe may take this many times the fastest step (``deadline_s``).
    first_step_factor: float = 3.0
    #: Counts within this fraction of the fastest are equal (the fewest threads win).
    tolerance: float = 0.03
    #: Seconds of decode between re-probes, after a change; doubled while nothing changes.
    reprobe_s: float = 8.0
    max_reprobe_s: float = 120.0


def ladder(max_threads: int) -> list[int]:
    """The counts tried, ascending: powers of two below max, max - 1 (one core busy) and max."""
    rungs = {1, max_threads, max(1, max_threads - 1)}
    n = 2
    while n < max_threads:
        rungs.add(n)
        n *= 2
    return sorted(rungs)


@dataclass
class _Probe:
    #: Rungs still to measure, in order (ascending, so the cheap and safe ones come first).
    todo: list[int]
    #: Climb past the last rung of ``todo`` while each rung keeps improving.
    climb: bool
    #: A periodic re-probe (its unchanged answer backs the next one off), not a jump's.
    periodic: bool = True
    scores: dict[int, float] = field(default_factory=dict)
    seen: int = 0
    #: Seconds spent on the rung being measured (its warm-up included).
    spent: float = 0.0
    steps: list[float] = field(default_factory=list)


class ThreadTuner:
    """Feed ``observe`` each decode step's seconds; apply the count it returns (None: keep).
    ``threads`` is the count to run with now (start with it)."""

    def __init__(self, max_threads: int, *, config: TunerConfig | None = None) -> None:
        self.config = config or TunerConfig()
        self.max_threads = max(1, max_threads)
        self.rungs = ladder(self.max_threads)
        self._recent: deque[float] = deque(maxlen=self.config.window)
        self._decode_s = 0.0
        self._interval = self.config.reprobe_s
        self._previous: int | None = None
        #: Probes finished, and the scores of the last one (seconds per step by count).
        self.probes = 0
        self.last_scores: dict[int, float] = {}
        self.threads = self.rungs[0]
        self._probe: _Probe | None = None
        if len(self.rungs) > 1:  # measure 1 thread first, then climb
            self._probe = _Probe(todo=[], climb=True)

    @property
    def probing(self) -> bool:
        return self._probe is not None

    @property
    def deadline_s(self) -> float | None:
        """How long the next step may run before the caller should cut it short (llama.cpp:
        ``llama_set_abort_callback``), or None: no limit. Set only while a count is on probe
        against a faster one, where a step beside a competitor can take seconds: its first step
        gets ``first_step_factor`` x the fastest step, later ones what is left of the probe's
        budget. Cutting it is optional; it bounds what a wrong probe costs."""
        probe = self._probe
        if probe is None or not probe.scores or self.threads in probe.scores:
            return None
        best = min(probe.scores.values())
        left = self.config.abort_factor * best * (self.config.warmup_steps + self.config.probe_steps) - probe.spent
        if probe.seen == 0:
            left = min(left, self.config.first_step_factor * best)
        return max(left, 0.0)

    def observe(self, step_s: float, *, aborted: bool = False) -> int | None:
        """One decode step took ``step_s`` seconds at ``threads``; returns the next count if it
        changes. ``aborted``: the step was cut at ``deadline_s`` and did not happen; the count
        always changes then, and the caller runs the step again at the new one."""
        if len(self.rungs) == 1:
            return None
        if self._probe is not None:
            return self._observe_probe(self._probe, step_s, aborted)
        return self._observe_steady(step_s)

    # ---- steady state ------------------------------------------------------------------------

    def _observe_steady(self, step_s: float) -> int | None:
        cfg = self.config
        reference = statistics.median(self._recent) if len(self._recent) >= cfg.probe_steps else None
        self._recent.append(step_s)
        self._decode_s += step_s
        if reference is not None:
            last = list(self._recent)[-3:]
            jump = step_s > cfg.spike_factor * reference or (len(last) == 3 and min(last) > cfg.jump_factor * reference)
            if jump:
                return self._step_down()
        if self._decode_s >= self._interval and len(self._recent) >= cfg.probe_steps:
            return self._reprobe(statistics.median(list(self._recent)[-cfg.probe_steps :]))
        return None

    def _step_down(self) -> int | None:
        """The step time jumped: measure the rung below, then the current count again (a burst of
        another process's work passes; real contention stays, and the budget ends the current
        count within a step). At the lowest rung nothing is lower: the jump becomes the new normal."""
        i = self.rungs.index(self.threads)
        if i == 0:
            self._recent.clear()
            return None
        self._probe = _Probe(todo=[self.rungs[i - 1], self.threads], climb=False, periodic=False)
        self._previous = self.threads
        return self._next_rung(self._probe)

    def _reprobe(self, current_score: float) -> int | None:
        """Periodic: the rungs beside the current one, against its recent median."""
        i = self.rungs.index(self.threads)
        probe = _Probe(todo=self.rungs[max(0, i - 1) : i] + self.rungs[i + 1 : i + 2], climb=False, periodic=True)
        probe.scores[self.threads] = current_score
        self._previous = self.threads
        self._probe = probe
        return self._next_rung(probe)

    # ---- probing -----------------------------------------------------------------------------

    def _observe_probe(self, probe: _Probe, step_s: float, aborted: bool) -> int | None:
        cfg = self.config
        probe.seen += 1
        probe.spent += step_s
        best = min(probe.scores.values()) if probe.scores else None
        budget = None if best is None else cfg.abort_factor * best * (cfg.warmup_steps + cfg.probe_steps)
        if (aborted and best is not None) or (budget is not None and probe.spent > budget):
            # Far slower: no more steps, and no higher rung. Its mean so far is a lower bound.
            probe.scores[self.threads] = probe.spent / probe.seen
            probe.todo = [r for r in probe.todo if r < self.threads]
            probe.climb = False
            return self._next_rung(probe)
        if probe.seen <= cfg.warmup_steps:
            return None
        probe.steps.append(step_s)
        if len(probe.steps) < cfg.probe_steps:
            return None
        score = statistics.median(probe.steps)
        probe.scores[self.threads] = score
        if probe.climb and not probe.todo:
            improved = best is None or score < best * (1 - cfg.tolerance)
            higher = [r for r in self.rungs if r > self.threads]
            if improved and higher:
                probe.todo.append(higher[0])
        return self._next_rung(probe)

    def _next_rung(self, probe: _Probe) -> int | None:
        while probe.todo:
            rung = probe.todo.pop(0)
            if rung in probe.scores:
                continue
            probe.seen, probe.spent, probe.steps = 0, 0.0, []
            return self._set(rung)
        return self._finish(probe)

    def _finish(self, probe: _Probe) -> int | None:
        cfg = self.config
        fastest = min(probe.scores.values())
        choice = min(n for n, s in probe.scores.items() if s <= fastest * (1 + cfg.tolerance))
        self._probe = None
        self.probes += 1
        self.last_scores = dict(sorted(probe.scores.items()))
        if self._previous is not None and choice != self._previous:
            self._interval = cfg.reprobe_s
        elif self._previous is not None and probe.periodic:
            self._interval = min(self._interval * 2, cfg.max_reprobe_s)
        self._decode_s = 0.0
        self._recent.clear()
        self._recent.extend([probe.scores[choice]] * cfg.probe_steps)
        return self._set(choice)

    def _set(self, threads: int) -> int | None:
        if threads == self.threads:
            return None
        self.threads = threads
        return threads
