"""Asyncio admission over the pure ``Scheduler``: at most ``max_inflight`` holders at once, the
rest wait in policy order. The proxy uses it to gate requests to an upstream server; the waiting
side is a future per request, so a client that disconnects (its task is cancelled) leaves the
queue at once, and one that disconnects after being admitted gives its slot straight back.

A refused request is told when to retry (``Retry-After``): the time the queue now needs to drain,
which is the wait it would have had if it had been queued. That is the estimated service time of
every waiting request plus what the holders still need, shared among the ``max_inflight`` slots.
Service times are measured here, from grant to release (``HoldTimes``): a request's estimate is
a per-request overhead plus a scale times its predicted cost (``cost_s``, from the service model),
both fitted to measured holds; without a cost, the measured mean hold.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from edgeserve.scheduler import Entry, QueueView, Scheduler

#: How much each older hold's weight shrinks per newer one (about the last 20 holds count).
DECAY = 0.95


@dataclass(frozen=True)
class Ticket:
    """Proof of admission, with what the client is told about its wait."""

    request_id: str
    #: Rank in the queue's order when the request arrived (0: admitted at once, 1: next to run).
    position: int
    waited_s: float
    #: Clock reading when the slot was granted.
    granted: float = 0.0
    #: Predicted service seconds, if the caller gave them.
    cost_s: float | None = None


@dataclass
class HoldTimes:
    """Measured holds (grant to release) against the caller's predicted costs, fitted online as
    ``hold = overhead + scale * cost`` (least squares, older holds weighted down by ``DECAY`` each).

    The cost is what a service model predicts from token counts and rates; a hold also carries what
    no token rate explains (the upstream's per-request work, HTTP, a loaded machine), which on a small
    model can be most of it. With too few holds, or costs too alike to separate the two terms, a
    request is estimated at the mean hold; before any hold, at its cost (or the prior).
    """

    prior_s: float
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, held_s: float, cost_s: float | None) -> None:
        x = self.mean_cost_s() if cost_s is None else cost_s
        d = DECAY
        self._w, self._x, self._y = d * self._w + 1, d * self._x + x, d * self._y + held_s
        self._xx, self._xy = d * self._xx + x * x, d * self._xy + x * held_s

    def mean_cost_s(self) -> float:
        return self._x / self._w if self._w else 0.0

    @property
    def mean_s(self) -> float:
        return self._y / self._w if self._w else self.prior_s

    def fit(self) -> tuple[float, float]:
        """(overhead seconds, scale): both >= 0."""
        if self._w < 3:
            return self.mean_s, 0.0
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var <= 1e-6 * max(mx * mx, 1e-9):
            return my, 0.0  # every cost alike: only the mean is known
        scale = (self._xy / self._w - mx * my) / var
        overhead = my - scale * mx
        if scale < 0:
            return my, 0.0
        if overhead < 0:  # through the origin
            return 0.0, self._xy / self._xx
        return overhead, scale

    def estimate_s(self, cost_s: float | None) -> float:
        if not self._w:
            return self.prior_s if cost_s is None else cost_s
        overhead, scale = self.fit()
        return self.mean_s if cost_s is None else overhead + scale * cost_s


class Admission:
    def __init__(
        self,
        policy: str = "sjf",
        *,
        max_inflight: int = 1,
        capacity: int = 64,
        aging_s: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
        prior_service_s: float = 1.0,
    ) -> None:
        self._scheduler: Scheduler[asyncio.Future[None]] = Scheduler(policy, capacity, aging_s)
        self._max_inflight = max_inflight
        self._clock = clock
        self.holds = HoldTimes(prior_service_s)
        #: Holders and waiters by request id (for the drain estimate).
        self._holders: dict[str, Ticket] = {}
        self._waiting_cost: dict[str, float | None] = {}
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._scheduler)

    @property
    def scheduler(self) -> Scheduler[asyncio.Future[None]]:
        return self._scheduler

    def snapshot(self) -> list[QueueView]:
        return self._scheduler.snapshot(self._clock())

    @asynccontextmanager
    async def slot(
        self, request_id: str, *, priority: int = 0, predicted_tokens: float | None = None, cost_s: float | None = None
    ) -> AsyncIterator[Ticket]:
        """Hold one upstream slot for the body of the ``async with``. Raises ``QueueFullError``."""
        ticket = await self.acquire(request_id, priority=priority, predicted_tokens=predicted_tokens, cost_s=cost_s)
        try:
            yield ticket
        finally:
            self.release(ticket)

    async def acquire(
        self, request_id: str, *, priority: int = 0, predicted_tokens: float | None = None, cost_s: float | None = None
    ) -> Ticket:
        """Wait for a slot; every successful call must be paired with one ``release``. Cancelling the
        waiting task removes the request from the queue (or returns a slot granted meanwhile).
        ``cost_s`` orders sjf and priority by service time instead of answer tokens."""
        arrived = self._clock()
        if self._inflight < self._max_inflight and not len(self._scheduler):
            return self._grant(Ticket(request_id, 0, 0.0, arrived, cost_s))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._scheduler) >= self._scheduler.capacity:
            self._scheduler.retry_after_s = self.drain_s(arrived)
        self._scheduler.add(Entry(request_id, arrived, future, priority, predicted_tokens, cost_s))
        self._waiting_cost[request_id] = cost_s
        # Rank in the policy's order at arrival (1: next to run), not the queue's length.
        position = 1 + next(v.position for v in self._scheduler.snapshot(arrived) if v.request_id == request_id)
        try:
            await future
        except asyncio.CancelledError:
            self._waiting_cost.pop(request_id, None)
            if self._scheduler.cancel(request_id) is None and future.done() and not future.cancelled():
                self._free()  # the slot was granted in the same instant the client left
            raise
        now = self._clock()
        return self._grant(Ticket(request_id, position, now - arrived, now, cost_s), counted=True)

    def _grant(self, ticket: Ticket, *, counted: bool = False) -> Ticket:
        if not counted:
            self._inflight += 1
        self._holders[ticket.request_id] = ticket
        return ticket

    def release(self, ticket: Ticket, *, cost_s: float | None = None, measured: bool = True) -> None:
        """Give the slot back; its hold time is measured, against ``cost_s`` (the request's cost as
        the caller's service model puts it now, which keeps the ratio and a model that learns from
        the same requests from both correcting one error) or else the cost it was admitted with.
        ``measured=False``: a hold cut short (the client left, the upstream failed) says nothing of
        how long service takes."""
        if self._holders.pop(ticket.request_id, None) is not None and measured:
            self.holds.observe(self._clock() - ticket.granted, cost_s if cost_s is not None else ticket.cost_s)
        self._free()

    def drain_s(self, now: float) -> float:
        """Seconds until every request waiting now has been admitted: the work ahead of a newcomer,
        which is what a refused one is told to wait (at least 1 s, Retry-After's unit)."""
        work = sum(self.holds.estimate_s(c) for c in self._waiting_cost.values())
        for t in self._holders.values():
            work += max(self.holds.estimate_s(t.cost_s) - (now - t.granted), 0.0)
        return max(1.0, work / self._max_inflight)

    def _free(self) -> None:
        self._inflight -= 1
        self._pump()

    def _pump(self) -> None:
        # The slot passes straight to the next waiter: counted here, not by the waiter when it wakes,
        # so no third request can slip in between.
        while self._inflight < self._max_inflight:
            entry = self._scheduler.next(self._clock())
            if entry is None:
                return
            self._waiting_cost.pop(entry.request_id, None)
            if entry.item.done():  # its task was cancelled before it could be woken
                continue
            self._inflight += 1
            entry.item.set_result(None)
