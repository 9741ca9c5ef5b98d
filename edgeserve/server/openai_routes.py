"""OpenAI-compatible routes: wire request → ``SamplingParams`` and prompt → engine → wire response.

Streams are Server-Sent Events: one ``data: {chunk}`` per piece of text, a last chunk with the
finish reason, a usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``. A
backend failure mid-stream becomes ``data: {"error": {...}}`` followed by ``[DONE]``.

With tools, an answer that is a call streams as ``delta.tool_calls``: its id and name once the name
is complete, then its arguments as they are generated, then ``finish_reason: "tool_calls"``. The
arguments are the model's own text in both forms, so the streamed pieces assemble to the call the
non-streamed answer gives (``structured.CallSplitter``).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from edgeserve.engine import AsyncRequestHandle
from edgeserve.errors import EdgeserveError, InvalidParameterError
from edgeserve.server import openai_wire as wire
from edgeserve.server.context import Context, ServerContext
from edgeserve.server.generation import EventStreamResponse, events, result_or_disconnect
from edgeserve.server.http_errors import documented_errors, error_body
from edgeserve.structured import CallSplitter, expects_calls, with_tool_calls
from edgeserve.structured.tools import CallDelta
from edgeserve.types import ErrorEvent, FinalEvent, FinishReason, GenerationResult, SamplingParams, ToolCall

router = APIRouter(prefix="/v1", tags=["OpenAI"])

_ERRORS = documented_errors(wire.ErrorResponse)


def _sse_doc(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 response: JSON, or (``stream: true``) Server-Sent Events. Before OpenAPI 3.2 a
    ``text/event-stream`` schema describes one event: its ``data`` is a JSON chunk, an in-stream
    error, or the literal ``[DONE]``."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref(wire.ErrorResponse)]},
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": {"type": "string"}},
    }
    return {
        200: {
            "description": "JSON, or with `stream: true` Server-Sent Events ended by `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": event}},
        },
        **_ERRORS,
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


# ---- wire → engine ------------------------------------------------------------------------------


def _refuse_unsupported(body: wire.SamplingFields) -> None:
    if body.n != 1:
        raise InvalidParameterError("only n=1 is supported (one choice per request)", param="n")
    if body.logprobs:
        raise InvalidParameterError("logprobs are not supported", param="logprobs")


def _sampling(body: wire.SamplingFields, max_tokens: int | None) -> SamplingParams:
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise InvalidParameterError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        bias[int(key)] = value
    # OpenAI's defaults where the engine's differ: temperature 1, top_p 1, no top-k.
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        ignore_eos=body.ignore_eos,
        logit_bias=bias,
    )


def _completion_prompt(prompt: str | list[int] | list[str]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if all(isinstance(p, str) for p in prompt):
        return str(prompt[0])  # the wire model allows exactly one
    return [int(p) for p in prompt]


# ---- engine → wire ------------------------------------------------------------------------------


def _usage(result: GenerationResult) -> wire.Usage:
    return wire.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def _finish(result: GenerationResult) -> wire.FinishReasonWire:
    if result.finish_reason is FinishReason.TOOL_CALLS:
        return "tool_calls"
    return "length" if result.finish_reason is FinishReason.LENGTH else "stop"


def _calls_out(calls: tuple[ToolCall, ...]) -> list[wire.ToolCallOut] | None:
    if not calls:
        return None
    return [wire.ToolCallOut(id=c.id, function=wire.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def _call_delta(piece: CallDelta) -> wire.Delta:
    """One piece of a streamed call, as OpenAI streams it: the first names it, the rest carry arguments."""
    named = piece.id is not None
    function = wire.FunctionDelta(name=piece.name, arguments=piece.arguments)
    call = wire.ToolCallDelta(index=piece.index, id=piece.id, type="function" if named else None, function=function)
    return wire.Delta(tool_calls=[call])


def _sse(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> bytes:
    data = payload.model_dump(mode="json", exclude=exclude) if isinstance(payload, BaseModel) else payload
    for choice in data.get("choices", ()):
        if "delta" in choice:  # OpenAI leaves unset delta fields out ({} on the last chunk) rather than null
            choice["delta"] = _no_nulls(choice["delta"])
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _no_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


async def _sse_stream(
    handle: AsyncRequestHandle,
    ctx: ServerContext,
    endpoint: str,
    include_usage: bool,
    first: BaseModel | None,
    text_chunk: Callable[[str], list[BaseModel]],
    last_chunk: Callable[[GenerationResult], list[BaseModel]],
    usage_chunk: Callable[[wire.Usage], BaseModel],
) -> AsyncGenerator[bytes]:
    """``text_chunk`` may hold a piece back ([]); ``last_chunk`` gives what is left, then the end."""
    # Without include_usage the usage key is left out entirely, as OpenAI does.
    skip = None if include_usage else {"usage"}
    if first is not None:
        yield _sse(first, skip)
    # aclosing: when the client leaves, this generator is closed, and closing ``events`` then (not at
    # garbage collection) is what cancels the request at once.
    async with contextlib.aclosing(events(handle, ctx.metrics, endpoint)) as stream:
        async for event in stream:
            if isinstance(event, FinalEvent):
                for last in last_chunk(event.result):
                    yield _sse(last, skip)
                if include_usage:
                    yield _sse(usage_chunk(_usage(event.result)))
            elif isinstance(event, ErrorEvent):
                err = event.error
                kind = err.error_type if isinstance(err, EdgeserveError) else "server_error"
                yield _sse(error_body(endpoint, str(err), kind))
            elif event.text:
                for piece in text_chunk(event.text):
                    yield _sse(piece, skip)
    yield b"data: [DONE]\n\n"


# ---- routes -------------------------------------------------------------------------------------


@router.get("/models", response_model=wire.ModelList, responses=_ERRORS)
async def list_models(ctx: Context) -> wire.ModelList:
    return wire.ModelList(data=[wire.Model(id=ctx.model.name, created=ctx.model.created)])


@router.get("/models/{model}", response_model=wire.Model, responses=_ERRORS)
async def get_model(model: str, ctx: Context) -> wire.Model:
    ctx.check_model(model)
    return wire.Model(id=ctx.model.name, created=ctx.model.created)


@router.post("/chat/completions", response_model=wire.ChatCompletion, responses=_sse_doc(wire.ChatCompletionChunk))
async def chat_completions(body: wire.ChatCompletionRequest, request: Request, ctx: Context) -> Response:
    endpoint = "/v1/chat/completions"
    ctx.check_model(body.model)
    _refuse_unsupported(body)
    params = _sampling(body, body.max_completion_tokens or body.max_tokens)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    handle = ctx.submit(
        request,
        endpoint,
        params,
        messages=messages,
        priority=body.priority,
        response_format=body.response_format,
        tools=body.tools,
        tool_choice=body.tool_choice,
        cloud=body.cloud,
    )
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ctx.model.name
    calls = expects_calls(body.tools, body.tool_choice)

    if body.stream:
        return _chat_stream(handle, ctx, body, calls, rid, created)

    result = await result_or_disconnect(request, events(handle, ctx.metrics, endpoint))
    if result is None:
        return Response(status_code=499)  # nobody reads it; access logs do
    if calls:
        result = with_tool_calls(result)
    # With calls, content is null unless the answer also said something (as OpenAI sends it).
    content = (result.text or None) if result.tool_calls else result.text
    message = wire.AssistantMessage(content=content, tool_calls=_calls_out(result.tool_calls))
    answer = wire.ChatCompletion(
        id=rid,
        created=created,
        model=model,
        choices=[wire.ChatChoice(message=message, finish_reason=_finish(result))],
        usage=_usage(result),
    )
    data = answer.model_dump(mode="json")
    if not result.tool_calls:  # OpenAI leaves the key out of a plain answer
        del data["choices"][0]["message"]["tool_calls"]
    return JSONResponse(data)


def _chat_stream(
    handle: AsyncRequestHandle,
    ctx: ServerContext,
    body: wire.ChatCompletionRequest,
    calls: bool,
    rid: str,
    created: int,
) -> Response:
    model = ctx.model.name
    splitter = CallSplitter(calls, handle.request_id)

    def chunk(delta: wire.Delta, finish: wire.FinishReasonWire | None = None) -> wire.ChatCompletionChunk:
        choice = wire.ChunkChoice(delta=delta, finish_reason=finish)
        return wire.ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    def text_chunk(text: str) -> list[BaseModel]:
        out = splitter.push(text)
        if out:
            return [chunk(wire.Delta(content=out))]
        return [chunk(_call_delta(piece)) for piece in splitter.calls()]

    def last_chunks(result: GenerationResult) -> list[BaseModel]:
        if calls:
            result = with_tool_calls(result)
        out: list[BaseModel] = [chunk(_call_delta(piece)) for piece in splitter.finish(result.tool_calls)]
        if splitter.held and not result.tool_calls and not splitter.started_call:
            out.append(chunk(wire.Delta(content="".join(splitter.held))))  # held back as a possible call: was not
        return [*out, chunk(wire.Delta(), _finish(result))]

    stream = _sse_stream(
        handle,
        ctx,
        "/v1/chat/completions",
        bool(body.stream_options and body.stream_options.include_usage),
        first=chunk(wire.Delta(role="assistant", content="")),
        text_chunk=text_chunk,
        last_chunk=last_chunks,
        usage_chunk=lambda u: wire.ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=u),
    )
    return EventStreamResponse(stream, media_type="text/event-stream", on_close=handle.cancel)


@router.post("/completions", response_model=wire.Completion, responses=_sse_doc(wire.Completion))
async def completions(body: wire.CompletionRequest, request: Request, ctx: Context) -> Response:
    endpoint = "/v1/completions"
    ctx.check_model(body.model)
    _refuse_unsupported(body)
    params = _sampling(body, body.max_tokens)
    handle = ctx.submit(
        request, endpoint, params, prompt=_completion_prompt(body.prompt), priority=body.priority, cloud=body.cloud
    )
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), ctx.model.name

    def chunk(
        text: str,
        finish: wire.FinishReasonWire | None = None,
        usage: wire.Usage | None = None,
    ) -> wire.Completion:
        choices = [wire.CompletionChoice(text=text, finish_reason=finish)]
        return wire.Completion(id=rid, created=created, model=model, choices=choices, usage=usage)

    if body.stream:
        stream = _sse_stream(
            handle,
            ctx,
            endpoint,
            bool(body.stream_options and body.stream_options.include_usage),
            first=None,
            text_chunk=lambda text: [chunk(text)],
            last_chunk=lambda r: [chunk("", _finish(r))],
            usage_chunk=lambda u: wire.Completion(id=rid, created=created, model=model, choices=[], usage=u),
        )
        return EventStreamResponse(stream, media_type="text/event-stream", on_close=handle.cancel)

    result = await result_or_disconnect(request, events(handle, ctx.metrics, endpoint))
    if result is None:
        return Response(status_code=499)
    return JSONResponse(chunk(result.text, _finish(result), _usage(result)).model_dump(mode="json"))
