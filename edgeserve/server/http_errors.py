"""Errors on the wire: status chosen by exception class (``http_status``), body shaped for the API the
path belongs to (Ollama's ``{"error": "..."}`` under /api, OpenAI's ``{"error": {...}}`` elsewhere).

No handler here reads an exception's message to decide anything; messages are only shown. An
exception no handler knows ends in ``boundary.ErrorBoundary`` (a 500 that keeps the connection), not
in a handler for ``Exception``: Starlette re-raises after that handler's 500, and uvicorn then closes
the keep-alive connection under the client's next request.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from edgeserve.errors import ContextLengthError, EdgeserveError, ModelNotFoundError, QueueFullError

log = logging.getLogger("edgeserve.server")

#: OpenAI's ``error.code`` for the errors that have one, by class (most specific first).
_CODES: tuple[tuple[type[EdgeserveError], str], ...] = (
    (ContextLengthError, "context_length_exceeded"),
    (ModelNotFoundError, "model_not_found"),
    (QueueFullError, "rate_limit_exceeded"),
)
_TYPES = {401: "authentication_error", 404: "not_found_error"}


def documented_errors(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The error responses every generation route may give, for the OpenAPI schema."""
    return {
        status: {"model": model, "description": text}
        for status, text in (
            (400, "Invalid request: malformed JSON, a wrong type or value, a prompt longer than the context."),
            (401, "Missing or wrong API key."),
            (403, "A Host or browser Origin this server does not serve (DNS-rebinding and cross-origin guard)."),
            (404, "Unknown model."),
            (408, "The request head or body did not arrive in time."),
            (413, "Request body too large."),
            (415, "A request body that is not sent as application/json."),
            (429, "The queue is full; retry after the Retry-After header's seconds."),
            (500, "The backend failed."),
        )
    }


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def error_body(path: str, message: str, error_type: str, param: str | None = None, code: str | None = None) -> Any:
    if is_ollama_path(path):
        return {"error": message}
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ErrorJSONResponse(JSONResponse):
    """ASCII JSON: an error can always be written, whatever text (a lone surrogate from the client, a
    backend's message) its message quotes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    kind = error_type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ErrorJSONResponse(error_body(path, message, kind, param, code), status_code=status, headers=headers)


def edgeserve_error_response(path: str, exc: EdgeserveError) -> JSONResponse:
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), None)
    return error_response(
        path,
        exc.http_status,
        str(exc),
        error_type=exc.error_type,
        param=getattr(exc, "param", None),
        code=code,
        headers=headers,
    )


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for the client, and the first offending field (OpenAI's ``param``)."""
    problems = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if err.get("type") == "missing" and not loc:
            problems.append("a JSON request body is required")
            continue
        if err.get("type") == "invalid_unicode":  # WireRequest names the place itself
            problems.append(err.get("msg", "invalid text"))
            param = param or err.get("ctx", {}).get("param")
            continue
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""), param


def install(app: FastAPI) -> None:
    async def on_edgeserve(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EdgeserveError)
        if exc.http_status >= 500:
            log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return edgeserve_error_response(request.url.path, exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc)
        # 400, not FastAPI's 422: OpenAI and Ollama both answer malformed requests with 400.
        return error_response(request.url.path, 400, message, param=param)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)

    app.add_exception_handler(EdgeserveError, on_edgeserve)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
