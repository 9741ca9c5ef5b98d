"""The outermost layer of the app: every request ends with a whole response, and every refused request
is counted.

- **Unexpected exceptions.** A handler for ``Exception`` is not enough: Starlette's
  ``ServerErrorMiddleware`` sends that handler's 500 and then re-raises, and uvicorn, seeing an
  exception after the response started, closes the connection. The client's next request on the same
  keep-alive connection then met ``ECONNRESET`` (issue 19, defect 2). Here the exception ends with a
  500 in the API's error shape and the connection stays usable. An exception after the response began
  cannot become an error status any more: the body is left unfinished and uvicorn closes the
  connection, so the client sees a truncated answer as truncated, never as a finished one.
- **Refusals in the metrics.** A request the engine took is counted by ``generation.events`` however
  it ends. Every other answer of 400 or more (validation, unknown route or model, key, Host/Origin,
  size, media type, timeout, full queue, a crash) is counted here, once, by its status, under the
  route it was meant for (``other`` for unknown paths, so that labels stay bounded).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeserve.server.http_errors import error_response
from edgeserve.server.metrics import ServerMetrics

log = logging.getLogger("edgeserve.server")
#: Key in ``scope["state"]``: the engine accepted this request, and its events count it.
ENGINE_COUNTS = "edgeserve_engine_counts"


class ErrorBoundary:
    """``paths``: the app's route templates (``/v1/models/{model}``), the label values of ``endpoint``."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics, paths: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = [(compile_path(path)[0], path) for path in paths]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            log.exception("%s %s failed", scope.get("method"), scope["path"])
            if not status:
                status = 500
                await error_response(scope["path"], 500, f"internal error: {type(exc).__name__}")(scope, receive, send)
        if status >= 400 and not scope.get("state", {}).get(ENGINE_COUNTS):
            self.metrics.refused(self.endpoint(scope), status)

    def endpoint(self, scope: Scope) -> str:
        """The route's path template (bounded label values), or ``other``."""
        return next((path for regex, path in self.paths if regex.match(scope["path"])), "other")


def mark_engine_counts(scope: Scope) -> None:
    scope.setdefault("state", {})[ENGINE_COUNTS] = True
