"""What ``Engine.submit`` returns: a request's identity, its cancel switch, and its event stream.

Iteration ends after exactly one ``FinalEvent`` or ``ErrorEvent``. Leaving the loop early (break,
exception, garbage collection, a cancelled asyncio task) cancels the request.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future

from edgeserve.errors import BackendError
from edgeserve.running import Request
from edgeserve.types import ErrorEvent, FinalEvent, GenerationResult, StreamEvent, TokenEvent


class Handle:
    """A submitted request: identity, size and cancellation. ``Engine.submit(..., on_event=fn)``
    returns this (events go to ``fn``); the iterable handles below add the stream."""

    def __init__(self, request: Request, cancel: Callable[[Request], None]) -> None:
        self._request = request
        self._cancel = cancel

    @property
    def request_id(self) -> str:
        return self._request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_tokens)

    @property
    def predicted_tokens(self) -> float | None:
        return self._request.predicted_tokens

    def cancel(self) -> None:
        """Remove the request if it waits, stop it within a decode step if it runs; a no-op once ended."""
        self._cancel(self._request)


class PrefillJob(Handle):
    """A prefill-only job (``Engine.prefill_state``): ``future`` resolves to the KV state blob, or
    to the error that stopped it (``EngineClosedError`` when cancelled or closed first)."""

    def __init__(self, request: Request, cancel: Callable[[Request], None], future: Future[bytes]) -> None:
        super().__init__(request, cancel)
        self.future = future


class RequestHandle(Handle):
    """A submitted request whose events are read by iterating it (from any one thread)."""

    def __init__(
        self, request: Request, cancel: Callable[[Request], None], events: queue.SimpleQueue[StreamEvent]
    ) -> None:
        super().__init__(request, cancel)
        self._events = events

    def __iter__(self) -> Iterator[StreamEvent]:
        ended = False
        try:
            while not ended:
                event = self._events.get()
                # Set before yielding: a consumer that stops at the last event has not left early.
                ended = not isinstance(event, TokenEvent)
                yield event
        finally:
            if not ended:
                self.cancel()

    def result(self) -> GenerationResult:
        for event in self:
            if (result := outcome(event)) is not None:
                return result
        raise BackendError("stream ended without a result")  # unreachable by the handle's invariant


class AsyncRequestHandle(Handle):
    """The asyncio twin of ``RequestHandle``; events arrive through the caller's event loop."""

    def __init__(self, request: Request, cancel: Callable[[Request], None], events: asyncio.Queue[StreamEvent]) -> None:
        super().__init__(request, cancel)
        self._events = events

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        ended = False
        try:
            while not ended:
                event = await self._events.get()
                ended = not isinstance(event, TokenEvent)
                yield event
        finally:
            if not ended:  # the consumer left early or its task was cancelled (client disconnect)
                self.cancel()

    async def result(self) -> GenerationResult:
        async for event in self:
            if (result := outcome(event)) is not None:
                return result
        raise BackendError("stream ended without a result")  # unreachable by the handle's invariant


def outcome(event: StreamEvent) -> GenerationResult | None:
    """The result a final event carries; raises the error an error event carries; None for tokens."""
    if isinstance(event, FinalEvent):
        return event.result
    if isinstance(event, ErrorEvent):
        raise event.error
    return None
