"""Running one request for a route: metrics however it ends, and cancellation when the client leaves.

Both paths end a request whose client went away (removed from the queue if waiting, stopped within
one decode step if running), so the next request starts at once:

- streaming: ``EventStreamResponse`` writes the route's chunks while listening for the client's
  disconnect; then it closes the body generator, whose ``events`` loop cancels the request.
- non-streaming: ``result_or_disconnect`` awaits the result and the client's disconnect together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import cast

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from edgeserve.engine import AsyncRequestHandle
from edgeserve.errors import BackendError
from edgeserve.server.metrics import ServerMetrics
from edgeserve.types import ErrorEvent, FinalEvent, GenerationResult, StreamEvent, TokenEvent

log = logging.getLogger("edgeserve.server")


async def events(handle: AsyncRequestHandle, metrics: ServerMetrics, endpoint: str) -> AsyncGenerator[StreamEvent]:
    """The handle's events. Closing this generator before the end cancels the request."""
    generated = 0
    ended = False
    # The handle's __aiter__ is an async generator; holding it lets ``finally`` close it now rather
    # than leave it suspended until garbage collection.
    stream = cast("AsyncGenerator[StreamEvent, None]", aiter(handle))
    try:
        async for event in stream:
            if isinstance(event, TokenEvent):
                generated += len(event.token_ids)
            elif isinstance(event, FinalEvent):
                ended = True
                metrics.finished(endpoint, event.result)
                r = event.result
                log.info(
                    "%s %s: %d prompt + %d tokens, %s, ttft %s, queue %.3fs",
                    r.request_id,
                    endpoint,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.finish_reason.value,
                    f"{r.ttft_s:.3f}s" if r.ttft_s is not None else "-",
                    r.queue_wait_s,
                )
            else:
                ended = True
                metrics.ended_early(endpoint, "error", generated)
                log.warning("%s %s failed: %s", handle.request_id, endpoint, event.error)
            yield event
    finally:
        if not ended:
            handle.cancel()  # closing the stream below would too; this does not depend on it
            metrics.ended_early(endpoint, "cancelled", generated)
            log.info("%s %s: cancelled, the client went away", handle.request_id, endpoint)
        await stream.aclose()


async def result_or_disconnect(request: Request, stream: AsyncGenerator[StreamEvent]) -> GenerationResult | None:
    """The request's result, or None if the client disconnected first (the request is then cancelled).

    Errors from the engine are raised. The body has been read by now, so the next ASGI message can
    only be the disconnect.
    """

    async def result() -> GenerationResult:
        async for event in stream:
            if isinstance(event, FinalEvent):
                return event.result
            if isinstance(event, ErrorEvent):
                raise event.error
        raise BackendError("the engine stream ended without a result")  # the handle's invariant forbids it

    work = asyncio.ensure_future(result())
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait((work,))
        await stream.aclose()
    return None if work.cancelled() else work.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """A streamed body that always listens for the client leaving and always closes its generator.

    Starlette's ``StreamingResponse`` listens for ``http.disconnect`` only under servers that speak
    ASGI < 2.4; otherwise it waits for a write to fail, and a request still waiting in the queue
    writes nothing, so it would hold its place after its client left.
    """

    def __init__(
        self,
        content: AsyncGenerator[bytes],
        media_type: str,
        headers: Mapping[str, str] | None = None,
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """``on_close`` runs when the response ends however it ends (``handle.cancel``: a no-op for a
        finished request). Closing a body generator that never started runs none of its cleanup, so
        a client gone before the first chunk would otherwise leave its request queued."""
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache", **(headers or {})})
        self._body = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def write(done: anyio.CancelScope) -> None:
            with contextlib.suppress(OSError):  # the client left mid-write (how ASGI 2.4 servers say it)
                await self.stream_response(send)
            done.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(write, tg.cancel_scope)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()
            if self._on_close is not None:
                self._on_close()
