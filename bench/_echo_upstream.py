"""A model-free streaming upstream for measuring the proxy's own cost: every chat completion streams
``max_tokens`` one-word chunks 5 ms apart, then usage and [DONE].

    python bench/_echo_upstream.py PORT [--late-headers]

By default the headers and the role chunk go out at once, as Starlette, vLLM and edgeserve send
them. ``--late-headers`` sends nothing for 5 ms, then the headers together with the role chunk and the
first token, as a Go server (Ollama) does: its ResponseWriter holds the headers until the first write.
Then whatever the proxy does on receiving the headers lands on the time to first token."""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Send

LATE_HEADERS = "--late-headers" in sys.argv[2:]


async def chat(request: Request) -> Response:
    body = await request.json()
    n = int(body.get("max_tokens") or 16)

    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    word = b'data: {"choices":[{"index":0,"delta":{"content":" word"}}]}\n\n'

    async def events():  # type: ignore[no-untyped-def]
        if not LATE_HEADERS:
            yield role
        for i in range(n):
            await asyncio.sleep(0.005)
            yield role + word if LATE_HEADERS and i == 0 else word
        usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}
        yield f"data: {json.dumps(usage)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    response = LateHeadersResponse if LATE_HEADERS else StreamingResponse
    return response(events(), media_type="text/event-stream")


class LateHeadersResponse(StreamingResponse):
    """Sends ``http.response.start`` only with the first body chunk (uvicorn writes each at once)."""

    async def stream_response(self, send: Send) -> None:
        started = False
        async for chunk in self.body_iterator:
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                started = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
