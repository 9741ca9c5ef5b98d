"""The cloud's side of a KV handoff: another edgeserve asks this one to prefill a prompt and send the
KV state back, quantized and compressed (``edgeserve.handoff.kvwire``), in chunks as they are made.

- ``GET /v1/edgeserve/kv``: what a device checks first: the model file's SHA-256 and the backend (a KV
  state only fits the very same model file and backend).
- ``POST /v1/edgeserve/kv`` ``{"tokens": [...], "quantize": true}``: the state of those tokens
  (all but the last, which the device evaluates itself), as ``application/octet-stream``.

The prefill is a job in this server's own scheduler (``Engine.prefill_state``), competing with its
other requests; a client that leaves cancels it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse

from edgeserve.errors import InvalidParameterError
from edgeserve.handoff import device, kvwire
from edgeserve.handoff.kvwire import file_sha256
from edgeserve.server.context import Context

router = APIRouter(prefix="/v1/edgeserve", tags=["Handoff"])


class KvInfo(BaseModel):
    model: str
    backend: str
    sha256: str | None = Field(description="SHA-256 of the model file (None: the model is not one file).")
    kv_state: bool


class KvRequest(BaseModel):
    tokens: list[int] = Field(min_length=2, description="The prompt as this model's token ids.")
    quantize: bool = Field(True, description="int8 K/V with per-token scales (false: f16 as stored).")


class ModelDigest:
    """The model file's SHA-256, computed once, on first use, off the event loop (about a second for
    a 250 MB file)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._value: str | None = None
        self._lock = threading.Lock()

    def get(self) -> str | None:
        with self._lock:
            if self._value is None and self._path is not None:
                self._value = file_sha256(self._path)
            return self._value


def _digest(request: Request, ctx: Context) -> ModelDigest:
    state = request.app.state
    if not hasattr(state, "edgeserve_digest"):
        state.edgeserve_digest = ModelDigest(ctx.model.path)
    digest: ModelDigest = state.edgeserve_digest
    return digest


@router.get("/kv", response_model=KvInfo)
async def kv_info(request: Request, ctx: Context) -> KvInfo:
    digest = await asyncio.to_thread(_digest(request, ctx).get)
    caps = ctx.engine.capabilities
    return KvInfo(model=ctx.model.name, backend=caps.backend, sha256=digest, kv_state=caps.kv_state)


@router.post("/kv", response_class=StreamingResponse)
async def kv_state(body: KvRequest, ctx: Context) -> StreamingResponse:
    caps = ctx.engine.capabilities
    if not caps.kv_state:
        raise InvalidParameterError(f"the {caps.backend} backend cannot export KV state", param="tokens")
    if max(body.tokens) >= caps.n_vocab or min(body.tokens) < 0:
        raise InvalidParameterError(f"token ids must be in [0, {caps.n_vocab})", param="tokens")
    if len(body.tokens) >= caps.n_ctx:
        raise InvalidParameterError(f"the prompt exceeds this model's context ({caps.n_ctx})", param="tokens")
    job = device.start_prefill(ctx.engine, body.tokens)

    async def stream() -> AsyncIterator[bytes]:
        try:
            blob = await asyncio.wrap_future(job.future)
            chunks = kvwire.encode(blob, quantize=body.quantize)
            # Each step quantizes and compresses a tensor: off the event loop, which serves others.
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk
        finally:
            job.cancel()

    headers = {"Cache-Control": "no-cache", "X-Edgeserve-Prompt-Tokens": str(len(body.tokens))}
    return StreamingResponse(stream(), media_type="application/octet-stream", headers=headers)
