"""The speed controller: releases text to the user at the device's expected time per token.

The cloud produces tokens in a burst (fast decode, network batching); shown as they come, the user
would see a flood and then, at takeover, a stall while the device catches up. So each piece waits
until ``interval_s`` after the previous release. Device pieces join the same queue (order is kept)
and wait only ``drain_factor`` of the interval, so a backlog left at takeover shrinks, while device
tokens that come at the device's own pace pass as they come.

Pure: time comes in as ``now``; the caller sleeps until ``next_at()``.

Invariant: pieces come out in the order they went in, and no two releases are closer than
``interval_s * drain_factor`` apart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Item(Generic[T]):
    piece: T
    paced: bool


class Pacer(Generic[T]):
    def __init__(self, interval_s: float, *, drain_factor: float = 0.75) -> None:
        self.interval_s = interval_s
        self.drain_factor = drain_factor
        self._queue: deque[_Item[T]] = deque()
        self._last: float | None = None

    def push(self, piece: T, *, paced: bool = True) -> None:
        """Queue a piece; ``paced=False`` (the device's own tokens) waits the shorter drain interval."""
        self._queue.append(_Item(piece, paced))

    def next_at(self) -> float | None:
        """When the head of the queue is due (None: empty)."""
        if not self._queue:
            return None
        if self._last is None:
            return float("-inf")
        head = self._queue[0]
        gap = self.interval_s if head.paced else self.interval_s * self.drain_factor
        return self._last + gap

    def pop_due(self, now: float) -> list[T]:
        """Release what is due at ``now``: at most one piece per call, since the next one is due
        an interval (or a drain interval) later."""
        due = self.next_at()
        if due is None or now < due:
            return []
        self._last = now
        return [self._queue.popleft().piece]

    def drain(self) -> list[T]:
        """Everything still queued (the stream ends, or the caller stops pacing)."""
        out = [item.piece for item in self._queue]
        self._queue.clear()
        return out

    def __len__(self) -> int:
        return len(self._queue)
