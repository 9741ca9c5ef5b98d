"""OpenAI wire types: the JSON that ``/v1/*`` reads and writes, as pydantic models.

Only what edgeserve serves is declared; unknown request fields are ignored (clients send many), and
fields that would change the answer in a way edgeserve cannot honour (``n > 1``, ``logprobs``) are
declared so that the route can refuse them with a clear 400 instead of ignoring them.
``response_format``, ``tools`` and ``tool_choice`` are validated where they are enforced
(``edgeserve.structured``), which names the faulty field, down to the path inside a schema.
For those, validation accepts the field's usual shape and the route says what is wrong, while the
documented schema (``Documented``) states only what is served: a request that fits the schema is
served. ``ignore_eos``, ``priority``, ``top_k``, ``min_p`` and ``repetition_penalty`` are extensions.

Every request model is strict, as OpenAI's API is: ``temperature: true``, ``max_tokens: "5"`` or
``stream: "yes"`` are 400s, not coerced (a float field takes integers, and ``5.0`` is the integer 5,
as in JSON Schema). Text must be Unicode: a lone UTF-16 surrogate (``"a\\ud800"``, valid JSON escape, no
character) anywhere in a request is a 400 naming where it is, never replaced silently (OpenAI's
parser refuses it too; the prompt the client meant is unknown).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from edgeserve.types import MIN_REPETITION_PENALTY

TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-100, le=100)]
StopText = Annotated[str, Field(min_length=1)]
StopList = Annotated[list[StopText], Field(max_length=16)]


#: The schema to publish for a field whose validation is looser, so that the route can refuse an
#: unsupported value with a message that names it rather than a generic type error.
Documented = WithJsonSchema

NULL = {"type": "null"}
#: Python strings from JSON hold a surrogate code point only where the JSON had a lone ``\udXXX``
#: escape (a valid pair decodes to one character).
SURROGATE = re.compile("[\ud800-\udfff]")


def settle_json(data: Any) -> tuple[str, ...] | None:
    """One walk over decoded JSON, in place: a float with no fraction becomes an int (JSON Schema's
    ``integer`` is any number without one, and strict int fields take no float), and the path to the
    first string (value or key) holding a lone surrogate is returned, if any. Iterative: JSON nests
    as deep as the parser allowed, deeper than Python's recursion limit."""
    todo: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                return path
            continue
        if isinstance(value, dict):
            items: list[tuple[Any, Any]] = list(value.items())
            for key, _ in items:
                if isinstance(key, str) and SURROGATE.search(key):
                    # Shown escaped: the message must itself be writable as UTF-8.
                    return (*path, key.encode("utf-8", "backslashreplace").decode())
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            continue
        for key, item in items:
            if isinstance(item, float) and item.is_integer():
                value[key] = int(item)
            elif isinstance(item, (str, dict, list)):
                todo.append(((*path, str(key)), item))
    return None


class Strict(BaseModel):
    """No coercion: a boolean is not a number, a string is not a boolean (OpenAI answers 400 too)."""

    model_config = ConfigDict(strict=True)


class WireRequest(Strict):
    """A whole request body: strict, and all of its text valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _settled(cls, data: Any) -> Any:
        path = settle_json(data)
        if path is not None:
            where = ".".join(path) or "body"
            raise PydanticCustomError(
                "invalid_unicode",
                "{where}: the text holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair), "
                "which is no character; send text as UTF-8 or as complete surrogate pairs",
                {"where": where, "param": path[0] if path else None},
            )
        return data


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send one last chunk with token usage before [DONE].")


class SamplingFields(WireRequest):
    """Fields the chat and the text completion requests share."""

    model: str = Field(min_length=1, description="Model id, as listed by GET /v1/models.")
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most; omitted: until the end of text or a full context."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    seed: int | None = Field(None, ge=0, lt=2**32, description="Same seed, same request: same text.")
    stop: StopText | StopList | None = Field(None, description="Stop sequences (not included in the text).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Documented({"type": "integer", "minimum": 1, "maximum": 1})] = Field(
        1, description="Choices per request; only 1 is supported."
    )
    logit_bias: Annotated[
        dict[str, Bias] | None,
        Documented(
            {
                "anyOf": [
                    {
                        "type": "object",
                        "patternProperties": {"^[0-9]{1,9}$": {"type": "number", "minimum": -100, "maximum": 100}},
                        "additionalProperties": False,
                    },
                    NULL,
                ]
            }
        ),
    ] = Field(None, description="Token id (as a string) → bias added to its logit.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: Annotated[bool | int | None, Documented({"enum": [False, 0, None]})] = Field(
        None, description="Not supported: must be absent, null, false or 0."
    )
    user: str | None = None
    # Extensions (llama.cpp server and vLLM accept the same names).
    ignore_eos: bool = Field(False, description="Extension: keep going through end-of-text tokens (benchmarks).")
    priority: int = Field(
        0, ge=-(2**31), lt=2**31, description="Extension: admission priority for the engine's queue policy."
    )
    cloud: bool = Field(True, description="Extension: false keeps this request off the cloud (--cloud), on the device.")
    top_k: int | None = Field(None, ge=0, description="Extension: sample from the k likeliest tokens (0: off).")
    min_p: float | None = Field(None, ge=0, le=1, description="Extension: drop tokens below min_p × the best.")
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, description="Extension: 1.0 disables it.")


def _text_part_only(schema: dict[str, Any]) -> None:
    schema["properties"]["type"] = {"const": "text", "type": "string"}
    schema["properties"]["text"] = {"type": "string"}
    schema["required"] = ["type", "text"]


class ContentPart(Strict):
    """One part of a message's content; only ``text`` parts can be served (the engine says so for
    others, naming the part's type)."""

    model_config = ConfigDict(strict=True, json_schema_extra=_text_part_only)

    type: str
    text: str | None = None


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class MessageToolCall(Strict):
    """A call an earlier assistant message made (sent back with the conversation)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers.")


_SCHEMA_OBJECT = {"type": "object"}
_RESPONSE_FORMAT = {
    "anyOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {
            "type": "object",
            "required": ["type", "json_schema"],
            "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        "schema": _SCHEMA_OBJECT,
                        "strict": {"type": ["boolean", "null"]},
                        "description": {"type": "string"},
                    },
                },
            },
        },
        NULL,
    ]
}
_TOOLS = {
    "anyOf": [
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "function"],
                "properties": {
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                            "description": {"type": "string"},
                            "parameters": _SCHEMA_OBJECT,
                            "strict": {"type": ["boolean", "null"]},
                        },
                    },
                },
            },
        },
        NULL,
    ]
}
_TOOL_CHOICE = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"const": "function"},
                "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            },
        },
        NULL,
    ]
}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred name for max_tokens; wins over it.")
    tools: Annotated[list[dict[str, Any]] | None, Documented(_TOOLS)] = Field(
        None, description="Functions the model may call; their parameters schema constrains the arguments."
    )
    tool_choice: Annotated[str | dict[str, Any] | None, Documented(_TOOL_CHOICE)] = Field(
        None, description="none, auto (the default with tools), required, or a named function."
    )
    parallel_tool_calls: bool | None = Field(None, description="Accepted; an answer makes at most one call.")
    response_format: Annotated[dict[str, Any] | None, Documented(_RESPONSE_FORMAT)] = Field(
        None, description="text, json_object, or json_schema: the answer is JSON that follows the schema."
    )


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="Text, or token ids (below the model's vocabulary size); one prompt per request.")
    max_tokens: int | None = Field(
        16, ge=1, description="Tokens to generate at most (default 16, as OpenAI); null: until the end of text."
    )


# ---- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    #: Null when the answer is only tool calls.
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReasonWire = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReasonWire
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed call: the first carries its id and name, the next its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReasonWire | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One SSE ``data:`` line of a streamed chat completion; the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    #: Set only on the last chunk (whose ``choices`` is empty) when ``stream_options.include_usage``.
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReasonWire | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A text completion; streamed chunks have the same shape (``finish_reason`` null until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgeserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error from /v1 (and from routes outside /api), and the in-stream error event."""

    error: ErrorDetail
