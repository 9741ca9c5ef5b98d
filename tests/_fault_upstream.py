"""A fault-injecting OpenAI + Ollama upstream for the proxy's fault tests: a real second process
speaking HTTP/1.1 over raw asyncio streams, so every byte it sends (or does not) is chosen.

    python tests/_fault_upstream.py PORT

``POST /_mode`` with ``{"mode": NAME, "close_after": N, "announce": bool, "delay": S}`` sets how the
generation routes (/v1/chat/completions, /v1/completions, /api/chat, /api/generate) answer from then
on (``delay``: seconds between streamed events); ``GET /_stats`` counts requests and connections and
shows the last generation request's headers. Modes:

- ``ok``: a well-formed answer (SSE or NDJSON when streamed, JSON otherwise), keep-alive;
- ``kill``: stream two events, then the process SIGKILLs itself (a non-streamed one dies first);
- ``silent``: read the request, never answer (``GET /`` too: a hung server);
- ``headers_then_silence``: a 200 head for a stream, then nothing;
- ``garbage``: bytes that are not HTTP instead of a response, then close;
- ``garbage_body``: a well-formed 200 stream head, then bytes that are not events;
- ``invalid_json``: a 200 whose events (or body) are not JSON, well framed and terminated;
- ``no_end``: well-formed events, then a clean end of body without ``[DONE]`` / ``done: true``.

``close_after`` N (any mode): a connection that has served N requests is closed when the next one
arrives on it, unanswered: the race in which a server drops an idle keep-alive connection just as
the client reuses it, made deterministic. With ``announce``, each response says so first
(``Keep-Alive: timeout=5, max=<requests left after this one>``), as Apache does (RFC 2068).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

DEFAULTS: dict[str, object] = {"mode": "ok", "close_after": 0, "announce": False, "delay": 0.01}
STATE = dict(DEFAULTS)
STATS: dict[str, object] = {"requests": 0, "connections": 0, "dropped": 0, "authorization": None, "headers": {}}
ANSWER = ["Paris", " is", " the", " capital", "."]
#: What Ollama reports of its own work (durations in ns): 300 tok/s prefill, 100 tok/s decode.
OLLAMA_TIMINGS = {"prompt_eval_count": 30, "prompt_eval_duration": 100_000_000, "eval_count": 5}
OLLAMA_TIMINGS["eval_duration"] = 50_000_000


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, path, headers, body


def head(status: int, content_type: str, extra: dict[str, str], length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}", f"content-type: {content_type}"]
    lines += ["server: fault-upstream", f"date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}"]
    lines.append(f"content-length: {length}" if length is not None else "transfer-encoding: chunked")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def events(path: str, openai: bool, mode: str) -> list[bytes]:
    """The streamed answer's events, framed (SSE for OpenAI routes, NDJSON for Ollama's)."""
    if mode == "invalid_json":
        return [b"data: {not json\n\n", b"data: [DONE]\n\n"] if openai else [b"{not json\n"]
    out = []
    for i, word in enumerate(ANSWER):
        last = i == len(ANSWER) - 1
        if openai:
            delta = {"content": word} if "chat" in path else None
            choice = {"index": 0, "finish_reason": "stop" if last else None}
            choice.update({"delta": delta} if delta else {"text": word})
            obj = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
            out.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
        else:
            key = {"message": {"role": "assistant", "content": word}} if "chat" in path else {"response": word}
            obj = {"model": "m", "created_at": "2026-01-01T00:00:00Z", **key, "done": last}
            if last:
                obj.update({"done_reason": "stop", **OLLAMA_TIMINGS})
            out.append(json.dumps(obj).encode() + b"\n")
    if openai and mode != "no_end":
        out.append(b"data: [DONE]\n\n")
    if not openai and mode == "no_end":
        out.pop()
    return out


def whole(path: str, openai: bool, mode: str) -> bytes:
    if mode == "invalid_json":
        return b'{"choices": ['
    text = "".join(ANSWER)
    if openai:
        choice: dict[str, object] = {"index": 0, "finish_reason": "stop"}
        choice.update({"message": {"role": "assistant", "content": text}} if "chat" in path else {"text": text})
        usage = {"prompt_tokens": 3, "completion_tokens": len(ANSWER), "total_tokens": 3 + len(ANSWER)}
        obj = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice], "usage": usage}
    else:
        key = {"message": {"role": "assistant", "content": text}} if "chat" in path else {"response": text}
        obj = {"model": "m", "created_at": "2026-01-01T00:00:00Z", **key, "done": True, "done_reason": "stop"}
        obj.update(OLLAMA_TIMINGS)
    return json.dumps(obj).encode()


async def generate(writer: asyncio.StreamWriter, path: str, body: bytes, extra: dict[str, str]) -> bool:
    """Answer a generation request as the mode says; False when the connection must close."""
    mode = str(STATE["mode"])
    request = json.loads(body or b"{}")
    openai = path.startswith("/v1/")
    stream = bool(request.get("stream", not openai))
    if mode == "silent":
        await asyncio.Event().wait()
    if mode == "garbage":
        writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\x13\x37" * 20)
        return False
    if mode == "kill" and not stream:
        os.kill(os.getpid(), signal.SIGKILL)
    if not stream and mode == "headers_then_silence":
        writer.write(head(200, "application/json", extra, 100))  # and never the 100 bytes
        await writer.drain()
        await asyncio.Event().wait()
    if not stream:
        await asyncio.sleep(float(str(STATE["delay"])) * len(ANSWER))
        data = whole(path, openai, mode)
        writer.write(head(200, "application/json", extra, len(data)) + data)
        return True
    writer.write(head(200, "text/event-stream" if openai else "application/x-ndjson", extra))
    await writer.drain()
    if mode == "headers_then_silence":
        await asyncio.Event().wait()
    if mode == "garbage_body":
        writer.write(chunk(b"\x00\xff garbage \x13\x37 not an event\n\n") + b"0\r\n\r\n")
        return True
    for i, event in enumerate(events(path, openai, mode)):
        if mode == "kill" and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        writer.write(chunk(event))
        await writer.drain()
        await asyncio.sleep(float(str(STATE["delay"])))
    writer.write(b"0\r\n\r\n")
    return True


async def control(writer: asyncio.StreamWriter, method: str, path: str, body: bytes, extra: dict[str, str]) -> None:
    if path == "/_mode" and method == "POST":
        STATE.update({**DEFAULTS, **json.loads(body)})
        data = json.dumps(STATE).encode()
    elif path == "/_stats":
        data = json.dumps(STATS).encode()
    else:
        if STATE["mode"] == "silent":
            await asyncio.Event().wait()
        data = b'{"status": "fault upstream"}'
    writer.write(head(200, "application/json", extra, len(data)) + data)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    STATS["connections"] += 1
    served = 0
    try:
        while (request := await read_request(reader)) is not None:
            method, path, headers, body = request
            close_after = int(str(STATE["close_after"]))
            generation = path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")
            if close_after and generation and served >= close_after:
                STATS["dropped"] += 1
                break  # closed under a request that arrived on a used-up connection
            extra = {}
            if close_after and STATE["announce"]:
                extra["keep-alive"] = f"timeout=5, max={close_after - served - 1}"  # left after this one
            STATS["requests"] += 1
            if generation:
                served += 1
                STATS["authorization"] = headers.get("authorization")
                STATS["headers"] = headers
                if not await generate(writer, path, body, extra):
                    break
            else:
                await control(writer, method, path, body, extra)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
