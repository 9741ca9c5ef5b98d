"""Discrete-event simulation of one serial backend under an admission policy.

The simulator drives the real ``Scheduler`` (the same code the engine runs) with a service-time
profile measured on the real backend, so policies can be compared on 10k+ requests in seconds and
the comparison can be checked against a real run. Pure: no clock, no threads, seeded randomness.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeserve.scheduler import Entry, Scheduler


@dataclass(frozen=True)
class ServiceProfile:
    """Service time of one request on a serial backend: prefill, then decode, plus a fixed cost."""

    prefill_tok_s: float
    decode_tok_s: float
    overhead_s: float = 0.0

    def ttft_s(self, prompt_tokens: int) -> float:
        return self.overhead_s + prompt_tokens / self.prefill_tok_s + 1 / self.decode_tok_s

    def service_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.overhead_s + prompt_tokens / self.prefill_tok_s + output_tokens / self.decode_tok_s


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    predicted_tokens: float | None = None
    priority: int = 0


@dataclass(frozen=True)
class SimOutcome:
    request: SimRequest
    start: float
    first_token: float
    end: float

    @property
    def queue_wait_s(self) -> float:
        return self.start - self.request.arrival

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.request.arrival

    @property
    def latency_s(self) -> float:
        return self.end - self.request.arrival


def simulate(
    requests: Iterable[SimRequest],
    profile: ServiceProfile,
    policy: str,
    *,
    aging_s: float = math.inf,
) -> list[SimOutcome]:
    """Run every request to completion on one non-preemptive server; outcomes in completion order."""
    pending = sorted(requests, key=lambda r: r.arrival)
    scheduler: Scheduler[SimRequest] = Scheduler(policy, capacity=max(1, len(pending)), aging_s=aging_s)
    outcomes: list[SimOutcome] = []
    now, i = 0.0, 0
    while i < len(pending) or len(scheduler):
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            scheduler.add(Entry(r.request_id, r.arrival, r, r.priority, r.predicted_tokens))
            i += 1
        entry = scheduler.next(now)
        if entry is None:  # idle until the next arrival
            now = pending[i].arrival
            continue
        r = entry.item
        end = now + profile.service_s(r.prompt_tokens, r.output_tokens)
        outcomes.append(SimOutcome(r, now, now + profile.ttft_s(r.prompt_tokens), end))
        now = end
    return outcomes


# ---- arrival processes ------------------------------------------------------------------------


def poisson_arrivals(n: int, rate_per_s: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def trace_gaps(path: Path) -> list[float]:
    """Inter-arrival gaps (s) of a trace with a ``TIMESTAMP`` column (the Azure LLM inference trace)."""
    from datetime import datetime

    with path.open(newline="") as f:
        stamps = [datetime.fromisoformat(row["TIMESTAMP"].strip()[:26]) for row in csv.DictReader(f)]
    stamps.sort()
    return [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]


def replay_arrivals(gaps: Sequence[float], n: int, rate_per_s: float) -> list[float]:
    """The trace's burstiness at a chosen mean rate: its gaps, in order, scaled to ``rate_per_s``."""
    mean_gap = sum(gaps) / len(gaps)
    scale = 1 / (rate_per_s * mean_gap)
    t, out = 0.0, []
    for k in range(n):
        t += gaps[k % len(gaps)] * scale
        out.append(t)
    return out


def rate_for_utilisation(rho: float, mean_service_s: float) -> float:
    """Arrival rate that keeps one server busy a fraction ``rho`` of the time."""
    return rho / mean_service_s
