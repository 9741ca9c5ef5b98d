"""Reading a request's event stream in tests: wait for its first token, then for its result."""

from __future__ import annotations

from collections.abc import Iterator

from edgeserve import GenerationResult, RequestHandle, TokenEvent
from edgeserve.engine import outcome
from edgeserve.types import StreamEvent


def started(handle: RequestHandle) -> Iterator[StreamEvent]:
    """Block until the first token of a request arrives; returns its stream, which the caller keeps
    (dropping a stream unfinished cancels its request)."""
    events = iter(handle)
    for event in events:
        if isinstance(event, TokenEvent):
            return events
    raise AssertionError("the request ended before its first token")


def result(events: Iterator[StreamEvent]) -> GenerationResult:
    for event in events:
        if (found := outcome(event)) is not None:
            return found
    raise AssertionError("no final event")
