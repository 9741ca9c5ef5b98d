"""Admission queue: a pure data structure.

No threads, no sockets, no backend: the engine loop calls ``add``/``next``/``cancel`` under its own
lock and passes the time in, so tests drive it with a fake clock. Queue policies are small classes
picked by name from ``POLICIES``; the scheduler adds what every policy shares (capacity, lookup by
id, cancellation, snapshots).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from edgeserve.errors import InvalidParameterError, QueueFullError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """One waiting request. ``item`` is the caller's payload; the scheduler never looks inside it."""

    request_id: str
    arrival: float
    item: T
    priority: int = 0
    predicted_tokens: float | None = None


@dataclass(frozen=True)
class QueueView:
    """What ``snapshot`` shows of a waiting request: no prompt text, ever."""

    request_id: str
    position: int
    waited_s: float
    priority: int
    predicted_tokens: float | None


class Policy(Protocol[T]):
    """Orders waiting entries. ``pop`` may skip entries the scheduler has cancelled (``alive``)."""

    def push(self, entry: Entry[T]) -> None: ...

    def pop(self, now: float, alive: Callable[[Entry[T]], bool]) -> Entry[T] | None: ...

    def ordered(self, now: float) -> list[Entry[T]]: ...


class FcfsPolicy(Generic[T]):
    """First come, first served: what llama.cpp's server and Ollama do."""

    def __init__(self) -> None:
        self._queue: collections.deque[Entry[T]] = collections.deque()

    def push(self, entry: Entry[T]) -> None:
        self._queue.append(entry)

    def pop(self, now: float, alive: Callable[[Entry[T]], bool]) -> Entry[T] | None:
        while self._queue:
            entry = self._queue.popleft()
            if alive(entry):
                return entry
        return None

    def ordered(self, now: float) -> list[Entry[T]]:
        return list(self._queue)


POLICIES: dict[str, Callable[[], Policy[Any]]] = {
    "fcfs": FcfsPolicy,
}


@dataclass
class Scheduler(Generic[T]):
    """Bounded admission queue under a named policy.

    Invariant: ``len(self)`` counts live (not cancelled, not yet taken) entries only, and capacity is
    checked against it, so cancelled requests never hold a slot.
    """

    policy: str = "fcfs"
    capacity: int = 64
    #: Seconds a client should wait before retrying when the queue is full (sent as Retry-After).
    retry_after_s: float = 1.0
    _live: dict[str, Entry[T]] = field(default_factory=dict, init=False)
    _queue: Policy[T] = field(init=False)

    def __post_init__(self) -> None:
        try:
            factory = POLICIES[self.policy]
        except KeyError:
            raise InvalidParameterError(
                f"unknown policy {self.policy!r}; choose one of: {', '.join(sorted(POLICIES))}",
                param="policy",
            ) from None
        if self.capacity < 1:
            raise InvalidParameterError("capacity must be >= 1", param="capacity")
        self._queue = factory()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, entry: Entry[T]) -> None:
        if len(self._live) >= self.capacity:
            raise QueueFullError(
                f"the queue is full ({self.capacity} requests waiting); retry later",
                retry_after_s=self.retry_after_s,
            )
        if entry.request_id in self._live:
            raise InvalidParameterError(f"request id {entry.request_id!r} is already queued", param="request_id")
        self._live[entry.request_id] = entry
        self._queue.push(entry)

    def next(self, now: float) -> Entry[T] | None:
        """Take the entry to run now, or None if nothing waits."""
        entry = self._queue.pop(now, lambda e: self._live.get(e.request_id) is e)
        if entry is not None:
            del self._live[entry.request_id]
        return entry

    def cancel(self, request_id: str) -> Entry[T] | None:
        """Remove a waiting entry; returns it, or None if it was not waiting (already running or gone).

        The policy's own structure keeps a dead reference that ``pop`` skips: O(1) here, and no
        policy needs a delete operation.
        """
        return self._live.pop(request_id, None)

    def snapshot(self, now: float) -> list[QueueView]:
        live = [e for e in self._queue.ordered(now) if self._live.get(e.request_id) is e]
        return [
            QueueView(e.request_id, i, max(0.0, now - e.arrival), e.priority, e.predicted_tokens)
            for i, e in enumerate(live)
        ]
