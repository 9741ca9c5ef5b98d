"""A model-free streaming upstream for measuring the proxy's own cost: every chat completion streams
``max_tokens`` one-word chunks 5 ms apart, then usage and [DONE]. Run: python bench/_echo_upstream.py PORT"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


async def chat(request: Request) -> Response:
    body = await request.json()
    n = int(body.get("max_tokens") or 16)

    async def events():  # type: ignore[no-untyped-def]
        yield b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        for _ in range(n):
            await asyncio.sleep(0.005)
            yield b'data: {"choices":[{"index":0,"delta":{"content":" word"}}]}\n\n'
        usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}
        yield f"data: {json.dumps(usage)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
