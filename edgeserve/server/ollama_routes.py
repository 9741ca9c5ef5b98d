"""Ollama-compatible routes: wire request → ``SamplingParams`` and prompt → engine → wire response.

Streams are NDJSON (one JSON object a line; the last has ``done: true`` and the statistics), the
default as in Ollama. A backend failure mid-stream becomes a last line ``{"error": "..."}``.

As in Ollama, a request with no prompt (or no messages) only answers that the model is loaded
(``done_reason: "load"``); clients use it to preload. ``/api/generate`` sends the prompt through the
model's chat template when the model has one and ``raw`` is false; a model without a template (the
default base model) gets the prompt as is, as Ollama does for a ``{{ .Prompt }}`` template.

``format`` (``"json"`` or a JSON schema) and ``tools`` are enforced by the grammar engine
(``edgeserve.structured``); a call comes in ``message.tool_calls``, on its own line before the last
when streaming, as Ollama sends it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from edgeserve.engine import AsyncRequestHandle
from edgeserve.errors import InvalidParameterError
from edgeserve.server import ollama_wire as wire
from edgeserve.server.context import Context, ServerContext
from edgeserve.server.generation import EventStreamResponse, events, result_or_disconnect
from edgeserve.server.http_errors import documented_errors
from edgeserve.structured import CallSplitter, with_tool_calls
from edgeserve.structured.spec import checked_schema
from edgeserve.types import (
    ErrorEvent,
    FinalEvent,
    FinishReason,
    GenerationResult,
    Message,
    SamplingParams,
    ToolCall,
)

router = APIRouter(prefix="/api", tags=["Ollama"])
NDJSON = "application/x-ndjson"

_ERRORS = documented_errors(wire.OllamaError)


def _ndjson_doc(line: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "NDJSON lines (the default; a failure mid-stream ends it with an error line), "
            "or one JSON object with `stream: false`.",
            "content": {NDJSON: {"schema": {"anyOf": [_ref(line), _ref(wire.OllamaError)]}}},
        },
        **_ERRORS,
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


# ---- wire → engine ------------------------------------------------------------------------------


def _sampling(options: wire.OllamaOptions | None) -> SamplingParams:
    o = options or wire.OllamaOptions()
    if o.num_predict == 0:
        raise InvalidParameterError("options.num_predict must be >= 1, or -1 for no limit", param="num_predict")
    # Ollama's defaults: temperature 0.8, top_p 0.9, top_k 40; -1 means "no limit" / "a fresh seed".
    return SamplingParams(
        max_tokens=None if o.num_predict in (None, -1, -2) else o.num_predict,
        temperature=0.8 if o.temperature is None else o.temperature,
        top_p=0.9 if o.top_p is None else o.top_p,
        top_k=40 if o.top_k is None else o.top_k,
        min_p=o.min_p or 0.0,
        seed=None if o.seed in (None, -1) else o.seed,
        stop=tuple(o.stop or ()),
        repetition_penalty=o.repeat_penalty or 1.0,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
    )


def _response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's ``format`` as OpenAI's ``response_format`` (what the engine takes)."""
    if not fmt:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, str):
        raise InvalidParameterError(f'format must be "json" or a JSON schema, got {fmt!r}', param="format")
    return {"type": "json_schema", "json_schema": {"schema": checked_schema(fmt, "format")}}


def _refuse_unsupported(body: wire.ChatRequest | wire.GenerateRequest, images: bool) -> None:
    if body.think:
        raise InvalidParameterError("this model does not support thinking", param="think")
    if images:
        raise InvalidParameterError("images are not supported (text-only model)", param="images")


# ---- engine → wire ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _stats(result: GenerationResult) -> dict[str, Any]:
    def ns(seconds: float) -> int:
        return max(0, int(seconds * 1e9))

    first = result.ttft_s if result.ttft_s is not None else result.total_s
    return {
        "done": True,
        "done_reason": "length" if result.finish_reason is FinishReason.LENGTH else "stop",
        "total_duration": ns(result.total_s),
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": ns(first - result.queue_wait_s),
        "eval_count": result.completion_tokens,
        "eval_duration": ns(result.total_s - first),
    }


def _line(payload: BaseModel | dict[str, Any]) -> bytes:
    if isinstance(payload, BaseModel):
        return payload.model_dump_json(exclude_none=True).encode() + b"\n"
    return wire.OllamaError.model_validate(payload).model_dump_json().encode() + b"\n"


async def _ndjson_stream(
    handle: AsyncRequestHandle,
    ctx: ServerContext,
    endpoint: str,
    piece: Callable[[str], BaseModel | None],
    last: Callable[[GenerationResult], list[BaseModel]],
) -> AsyncGenerator[bytes]:
    """``piece`` may hold text back (None); ``last`` gives what is left, then the done line."""
    # aclosing: closing this generator (the client left) closes ``events`` now, which cancels the request.
    async with contextlib.aclosing(events(handle, ctx.metrics, endpoint)) as stream:
        async for event in stream:
            if isinstance(event, FinalEvent):
                for line in last(event.result):
                    yield _line(line)
            elif isinstance(event, ErrorEvent):
                yield _line({"error": str(event.error)})
            elif event.text and (held := piece(event.text)) is not None:
                yield _line(held)


async def _answer(
    request: Request,
    ctx: ServerContext,
    endpoint: str,
    stream: bool,
    handle: AsyncRequestHandle,
    make: Callable[[str, GenerationResult | None, tuple[ToolCall, ...]], BaseModel],
    calls: bool = False,
) -> Response:
    """Stream NDJSON lines, or wait for the whole answer; ``make(text, result, calls)`` builds one
    line (``result`` None: a piece of a stream). ``calls``: tools were offered, parse them out."""
    if stream:
        splitter = CallSplitter(calls)

        def piece(text: str) -> BaseModel | None:
            out = splitter.push(text)
            return make(out, None, ()) if out else None

        def last(result: GenerationResult) -> list[BaseModel]:
            parsed = with_tool_calls(result) if calls else result
            if parsed.tool_calls:  # the calls on their own line, then the statistics (as Ollama streams them)
                return [make("", None, parsed.tool_calls), make("", parsed, ())]
            held = [make("".join(splitter.held), None, ())] if splitter.held else []
            return [*held, make("", parsed, ())]

        return EventStreamResponse(_ndjson_stream(handle, ctx, endpoint, piece, last), NDJSON, on_close=handle.cancel)
    result = await result_or_disconnect(request, events(handle, ctx.metrics, endpoint))
    if result is None:
        return Response(status_code=499)  # nobody reads it; access logs do
    if calls:
        result = with_tool_calls(result)
    return JSONResponse(make(result.text, result, result.tool_calls).model_dump(mode="json", exclude_none=True))


def _loaded(ctx: ServerContext, make: Callable[..., BaseModel]) -> Response:
    line = make(model=ctx.model.name, created_at=_now(), done=True, done_reason="load")
    return JSONResponse(line.model_dump(mode="json", exclude_none=True))


# ---- routes -------------------------------------------------------------------------------------


@router.post("/generate", response_model=wire.GenerateResponse, responses=_ndjson_doc(wire.GenerateResponse))
async def generate(body: wire.GenerateRequest, request: Request, ctx: Context) -> Response:
    endpoint = "/api/generate"
    ctx.check_model(body.model)
    _refuse_unsupported(body, bool(body.images))
    params = _sampling(body.options)
    response_format = _response_format(body.format)
    if not body.prompt:
        return _loaded(ctx, lambda **kw: wire.GenerateResponse(response="", **kw))
    if body.raw or ctx.engine.capabilities.chat_template is None:
        prompt = body.prompt if body.raw or not body.system else f"{body.system}\n\n{body.prompt}"
        handle = ctx.submit(request, endpoint, params, prompt=prompt, response_format=response_format, cloud=body.cloud)
    else:
        messages: list[Message] = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        handle = ctx.submit(
            request, endpoint, params, messages=messages, response_format=response_format, cloud=body.cloud
        )

    def make(text: str, result: GenerationResult | None, _calls: tuple[ToolCall, ...]) -> wire.GenerateResponse:
        stats = _stats(result) if result is not None else {"done": False}
        return wire.GenerateResponse(model=ctx.model.name, created_at=_now(), response=text, **stats)

    return await _answer(request, ctx, endpoint, body.stream, handle, make)


@router.post("/chat", response_model=wire.ChatResponse, responses=_ndjson_doc(wire.ChatResponse))
async def chat(body: wire.ChatRequest, request: Request, ctx: Context) -> Response:
    endpoint = "/api/chat"
    ctx.check_model(body.model)
    _refuse_unsupported(body, any(m.images for m in body.messages or ()))
    params = _sampling(body.options)
    response_format = _response_format(body.format)
    if not body.messages:
        return _loaded(ctx, lambda **kw: wire.ChatResponse(message=wire.OllamaReply(content=""), **kw))
    messages = [m.model_dump(include={"role", "content", "tool_calls"}, exclude_none=True) for m in body.messages]
    handle = ctx.submit(
        request,
        endpoint,
        params,
        messages=messages,
        response_format=response_format,
        tools=body.tools or None,
        cloud=body.cloud,
    )

    def make(text: str, result: GenerationResult | None, calls: tuple[ToolCall, ...]) -> wire.ChatResponse:
        stats = _stats(result) if result is not None else {"done": False}
        message = wire.OllamaReply(content=text, tool_calls=[_call_out(c) for c in calls] or None)
        return wire.ChatResponse(model=ctx.model.name, created_at=_now(), message=message, **stats)

    return await _answer(request, ctx, endpoint, body.stream, handle, make, calls=bool(body.tools))


def _call_out(call: ToolCall) -> wire.OllamaToolCall:
    # Ollama sends the arguments as an object; the grammar made them a JSON object.
    return wire.OllamaToolCall(function=wire.OllamaFunction(name=call.name, arguments=json.loads(call.arguments)))


def _entry(ctx: ServerContext) -> dict[str, Any]:
    caps = ctx.engine.capabilities
    family = caps.architecture or "unknown"
    file_format = "gguf" if caps.backend == "llama" else caps.backend
    details = wire.ModelDetails(format=file_format, family=family, families=[family])
    return {
        "name": ctx.model.name,
        "model": ctx.model.name,
        "modified_at": ctx.model.modified_at.isoformat(),
        "size": ctx.model.size_bytes,
        "details": details,
    }


@router.get("/tags", response_model=wire.TagsResponse, responses=_ERRORS)
async def tags(ctx: Context) -> wire.TagsResponse:
    return wire.TagsResponse(models=[wire.ModelEntry(**_entry(ctx))])


@router.get("/ps", response_model=wire.PsResponse, responses=_ERRORS)
async def ps(ctx: Context) -> wire.PsResponse:
    running = wire.RunningModel(**_entry(ctx), context_length=ctx.engine.capabilities.n_ctx)
    return wire.PsResponse(models=[running])


@router.post("/show", response_model=wire.ShowResponse, responses=_ERRORS)
async def show(body: wire.ShowRequest, ctx: Context) -> wire.ShowResponse:
    name = body.model or body.name
    if name is None:
        raise InvalidParameterError("give the model to show", param="model")
    ctx.check_model(name)
    caps = ctx.engine.capabilities
    entry = _entry(ctx)
    arch = entry["details"].family
    return wire.ShowResponse(
        modelfile=f"FROM {ctx.model.path or ctx.model.name}\n",
        parameters="",
        template=caps.chat_template or "",
        details=entry["details"],
        model_info={
            "general.architecture": arch,
            f"{arch}.context_length": caps.n_ctx,
            "tokenizer.ggml.vocab_size": caps.n_vocab,
        },
        capabilities=["completion", "tools"],  # tools and format: edgeserve.structured
        modified_at=entry["modified_at"],
    )


@router.get("/version", response_model=wire.VersionResponse, responses=_ERRORS)
async def ollama_version() -> wire.VersionResponse:
    return wire.VersionResponse(version=version("edgeserve"))
