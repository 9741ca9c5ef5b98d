"""Asyncio admission over the pure ``Scheduler``: at most ``max_inflight`` holders at once, the
rest wait in policy order. The proxy uses it to gate requests to an upstream server; the waiting
side is a future per request, so a client that disconnects (its task is cancelled) leaves the
queue at once, and one that disconnects after being admitted gives its slot straight back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from edgeserve.scheduler import Entry, QueueView, Scheduler


@dataclass(frozen=True)
class Ticket:
    """Proof of admission, with what the client is told about its wait."""

    request_id: str
    #: Rank in the queue's order when the request arrived (0: admitted at once, 1: next to run).
    position: int
    waited_s: float


class Admission:
    def __init__(
        self,
        policy: str = "sjf",
        *,
        max_inflight: int = 1,
        capacity: int = 64,
        aging_s: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheduler: Scheduler[asyncio.Future[None]] = Scheduler(policy, capacity, aging_s)
        self._max_inflight = max_inflight
        self._inflight = 0
        self._clock = clock

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
        self, request_id: str, *, priority: int = 0, predicted_tokens: float | None = None
    ) -> AsyncIterator[Ticket]:
        """Hold one upstream slot for the body of the ``async with``. Raises ``QueueFullError``."""
        ticket = await self.acquire(request_id, priority=priority, predicted_tokens=predicted_tokens)
        try:
            yield ticket
        finally:
            self.release()

    async def acquire(self, request_id: str, *, priority: int = 0, predicted_tokens: float | None = None) -> Ticket:
        """Wait for a slot; every successful call must be paired with one ``release``. Cancelling the
        waiting task removes the request from the queue (or returns a slot granted meanwhile)."""
        arrived = self._clock()
        if self._inflight < self._max_inflight and not len(self._scheduler):
            self._inflight += 1
            return Ticket(request_id, 0, 0.0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._scheduler.add(Entry(request_id, arrived, future, priority, predicted_tokens))
        # Rank in the policy's order at arrival (1: next to run), not the queue's length.
        position = 1 + next(v.position for v in self._scheduler.snapshot(arrived) if v.request_id == request_id)
        try:
            await future
        except asyncio.CancelledError:
            if self._scheduler.cancel(request_id) is None and future.done() and not future.cancelled():
                self.release()  # the slot was granted in the same instant the client left
            raise
        return Ticket(request_id, position, self._clock() - arrived)

    def release(self) -> None:
        self._inflight -= 1
        self._pump()

    def _pump(self) -> None:
        # The slot passes straight to the next waiter: counted here, not by the waiter when it wakes,
        # so no third request can slip in between.
        while self._inflight < self._max_inflight:
            entry = self._scheduler.next(self._clock())
            if entry is None:
                return
            if entry.item.done():  # its task was cancelled before it could be woken
                continue
            self._inflight += 1
            entry.item.set_result(None)
