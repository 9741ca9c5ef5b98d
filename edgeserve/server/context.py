"""What every route needs, built once per app by ``create_app`` and kept on ``app.state`` (never in a
module global, so two apps in one process stay apart)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from edgeserve.engine import AsyncRequestHandle, Engine
from edgeserve.errors import ModelNotFoundError
from edgeserve.handoff.privacy import cloud_allowed
from edgeserve.server.boundary import mark_engine_counts
from edgeserve.server.metrics import ServerMetrics
from edgeserve.settings import ServerSettings
from edgeserve.types import Message, ResolvedModel, SamplingParams

log = logging.getLogger("edgeserve.server")


@dataclass(frozen=True)
class ServedModel:
    """The one model this server answers for, as /v1/models and /api/tags describe it."""

    name: str
    path: Path | None
    size_bytes: int
    modified_at: datetime
    created: int

    @classmethod
    def of(cls, engine: Engine, resolved: ResolvedModel | None) -> ServedModel:
        path = resolved.path if resolved is not None and resolved.path.is_file() else None
        stat = path.stat() if path is not None else None
        modified = datetime.fromtimestamp(stat.st_mtime if stat else time.time(), tz=timezone.utc)
        return cls(
            name=resolved.name if resolved is not None else engine.capabilities.model,
            path=path,
            size_bytes=stat.st_size if stat else 0,
            modified_at=modified,
            created=int(modified.timestamp()),
        )

    def matches(self, requested: str) -> bool:
        # Ollama clients add the implicit ":latest" tag to untagged names.
        return requested in (self.name, f"{self.name}:latest")


@dataclass
class ServerContext:
    engine: Engine
    settings: ServerSettings
    metrics: ServerMetrics
    model: ServedModel

    def check_model(self, requested: str) -> None:
        if not self.model.matches(requested):
            raise ModelNotFoundError(f"model {requested!r} is not served here; this server serves {self.model.name!r}")

    def submit(
        self,
        request: Request,
        endpoint: str,
        params: SamplingParams,
        *,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Message] | None = None,
        priority: int = 0,
        cloud: bool = True,
        **output: Any,
    ) -> AsyncRequestHandle:
        """Queue a request; bad input and a full queue raise here, before any response starts (and
        ``ErrorBoundary`` counts them). From here on the request's events count it. ``output``:
        ``response_format``, ``tools`` and ``tool_choice`` (see ``Engine.submit``). ``cloud``: the
        body's privacy switch; the header's is read here."""
        cloud = cloud and cloud_allowed(request.headers)
        handle = self.engine.submit_async(prompt, params, messages=messages, priority=priority, cloud=cloud, **output)
        mark_engine_counts(request.scope)
        if self.settings.log_prompts:
            log.info("%s %s prompt=%r messages=%r", handle.request_id, endpoint, prompt, messages)
        else:
            log.debug("%s %s queued (%d prompt tokens)", handle.request_id, endpoint, handle.prompt_tokens)
        return handle


def _context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.edgeserve
    return ctx


Context = Annotated[ServerContext, Depends(_context)]
