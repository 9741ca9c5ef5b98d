"""Admission queue: a pure data structure.

No threads, no sockets, no backend, no clock: the engine loop calls ``add``/``next``/``cancel``
under its own lock and passes the time in, so tests drive it with a fake clock.

A policy is an ordering, picked by name from ``POLICIES``:

- ``fcfs``: arrival order (what llama.cpp's server and Ollama do).
- ``sjf``: shortest predicted service time first (Clairvoyant), ties by arrival.
- ``srpt``: the same order, and preemptive: ``preempts`` says when a waiting request should displace
  the running one (shortest remaining predicted time first; the engine parks the one it displaces).
- ``priority``: the client's priority first (lower runs earlier, as in vLLM), SJF within a level.

A request's cost is ``Entry.cost``, the predicted service it still needs (prefill plus decode,
``edgeserve.service``) in a unit its owner keeps for all its entries, or, when the owner has no rate
model, its predicted answer tokens. An owner gives costs for every entry or for none.

Aging is shared by every policy: once the oldest waiting request has waited ``aging_s`` it runs
next, whatever the ordering says. So a request waits at most ``aging_s`` plus the service time of
the job running when it aged plus that of requests that aged before it — never forever. Under
``srpt`` an aged request displaces a younger running one at its next token boundary, so the job
running when it aged adds at most a quantum.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from edgeserve.errors import InvalidParameterError, QueueFullError

T = TypeVar("T")

#: Stand-in prediction for a request the predictor could not score (e.g. a raw token prompt).
UNKNOWN_TOKENS = 256.0
#: Clairvoyant's short class: answers of fewer tokens than this (edgeserve.predictor's SHORT_MAX).
SHORT_TOKENS = 200
#: Aging threshold before any short request has been measured; derived aging replaces it.
INITIAL_AGING_S = 60.0


@dataclass
class Entry(Generic[T]):
    """One waiting request. ``item`` is the caller's payload; the scheduler never looks inside it."""

    request_id: str
    arrival: float
    item: T
    priority: int = 0
    predicted_tokens: float | None = None
    #: Predicted service still needed, in the owner's unit (the engine: decode-token equivalents,
    #: the proxy: seconds); None: order by predicted answer tokens instead.
    cost: float | None = None

    @property
    def expected(self) -> float:
        return UNKNOWN_TOKENS if self.predicted_tokens is None else self.predicted_tokens

    @property
    def effective_cost(self) -> float:
        return self.expected if self.cost is None else self.cost


@dataclass(frozen=True)
class QueueView:
    """What ``snapshot`` shows of a waiting request: no prompt text, ever."""

    request_id: str
    position: int
    waited_s: float
    priority: int
    predicted_tokens: float | None
    #: True when aging, not the policy's order, put it where it is.
    aged: bool


SortKey = tuple[float, ...]

POLICIES: dict[str, Callable[[Entry[object]], SortKey]] = {
    "fcfs": lambda e: (e.arrival,),
    "sjf": lambda e: (e.effective_cost, e.arrival),
    "srpt": lambda e: (e.effective_cost, e.arrival),
    "priority": lambda e: (e.priority, e.effective_cost, e.arrival),
}
#: Policies under which a waiting request may displace a running one.
PREEMPTIVE = frozenset({"srpt"})


@dataclass
class Scheduler(Generic[T]):
    """Bounded admission queue under a named policy, with aging.

    Invariant: ``len(self)`` counts live entries only (not cancelled, not yet taken) and capacity is
    checked against it, so cancelled requests never hold a slot. The heap and the arrival queue
    keep dead references that are skipped when they surface (O(log n) cancel, no policy needs a
    delete operation).
    """

    policy: str = "fcfs"
    capacity: int = 64
    #: Seconds after which a waiting request runs next regardless of order; ``inf`` disables aging.
    aging_s: float = math.inf
    #: Seconds a client should wait before retrying when the queue is full (sent as Retry-After);
    #: the owner keeps it current from what it measures.
    retry_after_s: float = 1.0
    #: Under a preemptive policy, a challenger must be this many times shorter than the running
    #: request's remaining cost (switch cost included) to displace it: hysteresis against thrashing.
    hysteresis: float = 2.0
    _live: dict[str, Entry[T]] = field(default_factory=dict, init=False)
    _heap: list[tuple[SortKey, int, Entry[T]]] = field(default_factory=list, init=False)
    _arrivals: collections.deque[Entry[T]] = field(default_factory=collections.deque, init=False)
    _seq: itertools.count[int] = field(default_factory=itertools.count, init=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidParameterError(
                f"unknown policy {self.policy!r}; choose one of: {', '.join(sorted(POLICIES))}", param="policy"
            )
        if self.capacity < 1:
            raise InvalidParameterError("capacity must be >= 1", param="capacity")
        self.set_aging(self.aging_s)
        self._key = POLICIES[self.policy]

    def __len__(self) -> int:
        return len(self._live)

    def set_aging(self, aging_s: float) -> None:
        """Change τ while running: the engine derives it from measured service times."""
        if not aging_s > 0:
            raise InvalidParameterError("aging_s must be > 0 (inf disables aging)", param="aging_s")
        self.aging_s = aging_s

    @property
    def preemptive(self) -> bool:
        return self.policy in PREEMPTIVE

    def add(self, entry: Entry[T], *, readmit: bool = False) -> None:
        """Queue ``entry``. ``readmit`` puts back a request that was already admitted (a preempted
        one): it keeps its arrival, so its aging clock keeps running, and capacity does not apply."""
        if len(self._live) >= self.capacity and not readmit:
            waiting = f"{self.capacity} request{'s' if self.capacity != 1 else ''} waiting"
            raise QueueFullError(f"the queue is full ({waiting}); retry later", retry_after_s=self.retry_after_s)
        if entry.request_id in self._live:
            raise InvalidParameterError(f"request id {entry.request_id!r} is already queued", param="request_id")
        self._live[entry.request_id] = entry
        heapq.heappush(self._heap, (self._key(entry), next(self._seq), entry))  # type: ignore[arg-type]
        if self._arrivals and entry.arrival < self._arrivals[-1].arrival:
            # Out of order only when a preempted entry comes back: aging must still see it first.
            at = bisect.bisect_right([e.arrival for e in self._arrivals], entry.arrival)
            self._arrivals.insert(at, entry)
        else:
            self._arrivals.append(entry)

    def next(self, now: float) -> Entry[T] | None:
        """Take the entry to run now, or None if nothing waits."""
        entry = self.peek(now)
        if entry is not None:
            del self._live[entry.request_id]
            self._drop_dead_heads()
        return entry

    def peek(self, now: float) -> Entry[T] | None:
        """The entry ``next`` would take now, left in place."""
        self._drop_dead_heads()
        if not self._live:
            return None
        oldest = self._arrivals[0]
        # Aging before order: the oldest request, once it has waited tau, beats every key.
        return oldest if self.aged(oldest, now) else self._heap[0][2]

    def aged(self, entry: Entry[T], now: float) -> bool:
        return now - entry.arrival >= self.aging_s

    def preempts(self, running: Entry[T], now: float, *, switch_cost: float = 0.0) -> Entry[T] | None:
        """Under a preemptive policy, the waiting entry that should displace ``running`` now (left in
        place: ``next`` takes it), or None. ``running.cost`` is its remaining cost.

        An aged entry displaces a younger running one (arrival order among the aged, so two aged
        requests never take turns); otherwise a challenger must beat the running request by the
        hysteresis factor, after paying ``switch_cost`` (parking one, resuming the other).
        """
        if not self.preemptive:
            return None
        challenger = self.peek(now)
        if challenger is None:
            return None
        if self.aged(challenger, now):
            return challenger if challenger.arrival < running.arrival else None
        if self.aged(running, now):
            return None
        worth = (challenger.effective_cost + switch_cost) * self.hysteresis < running.effective_cost
        return challenger if worth else None

    def cancel(self, request_id: str, item: T | None = None) -> Entry[T] | None:
        """Remove a waiting entry; returns it, or None if it was not waiting (running or gone).
        With ``item``, only the entry carrying that very payload (ids can be reused)."""
        entry = self._live.get(request_id)
        if entry is None or (item is not None and entry.item is not item):
            return None
        return self._live.pop(request_id)

    def backlog_cost(self) -> float:
        """The summed cost of every waiting entry (the work ahead of a new arrival, at worst)."""
        return sum(e.effective_cost for e in self._live.values())

    def present(self, n: int) -> tuple[list[float], int]:
        """The waiting work the width rule weighs, from one pass over the queue: the ``n``
        smallest costs, and how many entries are predicted short (fewer than ``SHORT_TOKENS``)."""
        costs: list[float] = []
        short = 0
        for entry in self._live.values():
            costs.append(entry.effective_cost)
            short += entry.predicted_tokens is not None and entry.predicted_tokens < SHORT_TOKENS
        return heapq.nsmallest(n, costs), short

    def snapshot(self, now: float) -> list[QueueView]:
        """Live entries in the order ``next`` would take them if nothing else arrived."""
        aged = [e for e in self._arrivals if self._alive(e) and now - e.arrival >= self.aging_s]
        aged_ids = {e.request_id for e in aged}
        rest = sorted(
            (item for item in self._heap if self._alive(item[2]) and item[2].request_id not in aged_ids),
            key=lambda item: (item[0], item[1]),
        )
        order = [*aged, *(item[2] for item in rest)]
        return [
            QueueView(
                e.request_id, i, max(0.0, now - e.arrival), e.priority, e.predicted_tokens, e.request_id in aged_ids
            )
            for i, e in enumerate(order)
        ]

    def _alive(self, entry: Entry[T]) -> bool:
        return self._live.get(entry.request_id) is entry

    def _drop_dead_heads(self) -> None:
        while self._heap and not self._alive(self._heap[0][2]):
            heapq.heappop(self._heap)
        while self._arrivals and not self._alive(self._arrivals[0]):
            self._arrivals.popleft()


@dataclass
class AgingTracker:
    """Derives the aging threshold from what short requests really cost: ``factor`` times a running
    estimate of their service time. A request is short by Clairvoyant's class (< 200 tokens)."""

    factor: float = 128.0  # edgeserve.settings.AGING_FACTOR; the settings pass theirs in
    short_tokens: int = SHORT_TOKENS
    #: Weight of the newest observation in the running estimate.
    alpha: float = 0.2
    estimate_s: float | None = None

    def observe(self, output_tokens: int, service_s: float) -> float | None:
        """Feed one finished request; returns the new threshold, or None if it was not short."""
        if output_tokens >= self.short_tokens or service_s <= 0:
            return None
        prev = self.estimate_s
        self.estimate_s = service_s if prev is None else (1 - self.alpha) * prev + self.alpha * service_s
        return self.factor * self.estimate_s
