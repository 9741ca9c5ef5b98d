"""Ollama wire types: the JSON that ``/api/*`` reads and writes, as pydantic models.

Shapes follow Ollama's API documentation and what the official ``ollama`` Python client parses.
Durations are nanoseconds, as Ollama reports them. Options edgeserve cannot apply (``num_ctx``,
``num_gpu``, ``mirostat``, ...) are accepted and ignored, as Ollama ignores options a runner lacks.
Requests are strict and their text valid Unicode, as ``/v1``'s (see ``openai_wire.WireRequest``).
Features it cannot serve (``think``, ``images``) validate loosely so that the route can refuse them
by name, and are documented as absent (see ``openai_wire.Documented``). ``format`` and ``tools`` are
validated where they are enforced (``edgeserve.structured``), which names the faulty field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeserve.server.openai_wire import NULL, Documented, Strict, WireRequest
from edgeserve.types import MIN_REPETITION_PENALTY

StopText = Annotated[str, Field(min_length=1)]
NAME = {"type": "string", "minLength": 1}
EMPTY_LIST = {"anyOf": [{"type": "array", "maxItems": 0}, NULL]}


class OllamaOptions(Strict):
    num_predict: Annotated[
        int | None, Documented({"anyOf": [{"type": "integer", "minimum": 1}, {"enum": [-1, -2]}, NULL]})
    ] = Field(None, ge=-2, description="Tokens to generate at most; -1 or -2 (or absent): until the end of text.")
    temperature: float | None = Field(None, ge=0, description="Default 0.8; 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default 0.9.")
    top_k: int | None = Field(None, ge=0, description="Default 40; 0 disables it.")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-1, lt=2**32, description="-1 (or absent): a fresh seed per request.")
    stop: Annotated[list[StopText], Field(max_length=16)] | None = None
    repeat_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class _Request(WireRequest):
    model: str = Field(min_length=1)
    stream: bool = Field(True, description="NDJSON stream (the default) or one JSON object.")
    options: OllamaOptions | None = None
    format: Annotated[
        str | dict[str, Any] | None, Documented({"anyOf": [{"enum": ["", "json"]}, {"type": "object"}, NULL]})
    ] = Field(None, description='"json" (any JSON object), or a JSON schema the answer follows.')
    keep_alive: float | str | None = Field(None, description="Accepted; the served model always stays loaded.")
    cloud: bool = Field(True, description="Extension: false keeps this request off the cloud (--cloud), on the device.")
    think: Annotated[bool | str | None, Documented({"enum": [False, None]})] = Field(
        None, description="Not supported: must be absent or false."
    )


class GenerateRequest(_Request):
    prompt: str | None = Field(None, description="Empty or absent: only report that the model is loaded.")
    system: str | None = None
    raw: bool = Field(False, description="Send the prompt as is, without the model's chat template.")
    images: Annotated[list[str] | None, Documented(EMPTY_LIST)] = Field(
        None, description="Not supported: must be absent or empty."
    )


class OllamaFunction(Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(Strict):
    function: OllamaFunction


class OllamaMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: Annotated[list[str] | None, Documented(EMPTY_LIST)] = Field(
        None, description="Not supported: must be absent or empty."
    )
    tool_calls: list[OllamaToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_name: str | None = Field(None, description="A tool message: the tool that answered.")


TOOLS = {
    "anyOf": [
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["function"],
                "properties": {
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                            "description": {"type": "string"},
                            "parameters": {"type": "object"},
                        },
                    },
                },
            },
        },
        NULL,
    ]
}


class ChatRequest(_Request):
    messages: list[OllamaMessage] | None = Field(None, description="Empty or absent: only report the model is loaded.")
    tools: Annotated[list[dict[str, Any]] | None, Documented(TOOLS)] = Field(
        None, description="Functions the model may call; their parameters schema constrains the arguments."
    )


class ShowRequest(WireRequest):
    model_config = ConfigDict(
        strict=True, json_schema_extra={"anyOf": [{"required": ["model"]}, {"required": ["name"]}]}
    )

    model: Annotated[str | None, Documented(NAME)] = Field(None, min_length=1)
    name: Annotated[str | None, Documented(NAME)] = Field(None, min_length=1, description="Older spelling of model.")
    verbose: bool = False


# ---- responses ---------------------------------------------------------------------------------


class _Stats(BaseModel):
    model: str
    created_at: str
    done: bool
    #: ``stop``, ``length``, or ``load`` for a request that only loaded the model.
    done_reason: Literal["stop", "length", "load"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateResponse(_Stats):
    """One NDJSON line of /api/generate, or the whole answer with ``stream: false``."""

    response: str


class OllamaReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaToolCall] | None = None


class ChatResponse(_Stats):
    """One NDJSON line of /api/chat, or the whole answer with ``stream: false``."""

    message: OllamaReply


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str = ""
    quantization_level: str = ""


class ModelEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str = ""
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    size_vram: int = 0
    context_length: int


class PsResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


class OllamaError(BaseModel):
    """Every error from /api, and the last NDJSON line of a stream that failed."""

    error: str
