"""Structured output and tool calling through the HTTP APIs, with the official clients, over real HTTP
on loopback, on the real default model (issue 17).

The model is a 270M base model: what its JSON says is poor, but that it parses and follows the
schema is the grammar's doing, which is what these tests check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field
from server_fixtures import live_server, wait_idle

from edgeserve.engine import Engine
from edgeserve.server.app import create_app
from edgeserve.settings import ServerSettings

MODEL = "default"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    with live_server(create_app(engine, ServerSettings(api_key=None))) as url:
        yield url


@pytest.fixture(autouse=True)
def idle_engine(engine: Engine) -> Iterator[None]:
    wait_idle(engine)
    yield
    wait_idle(engine)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


# ---- OpenAI -------------------------------------------------------------------------------------


def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a user of a web site as JSON."}],
        response_format=Person,
        max_tokens=80,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


def test_openai_json_object_and_schema_follow_it(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
        "required": ["colors"],
        "additionalProperties": False,
    }
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "palette", "schema": schema}}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name colors."}], response_format=fmt, max_tokens=60
    )
    jsonschema.validate(json.loads(out.choices[0].message.content or ""), schema)
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=60, temperature=0
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content or ""), dict)


def test_max_tokens_mid_json_is_length_not_stop(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}
    out = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.choices[0].message.content or "")


@pytest.mark.parametrize(
    ("fmt", "where"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, '"not"'),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_bad_response_format_is_a_400_naming_it(base_url: str, fmt: dict[str, Any], where: str) -> None:
    body = {"model": MODEL, "messages": ASK, "response_format": fmt}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert where in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"


def test_bad_tool_parameters_are_a_400_naming_the_tool(base_url: str) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}
    body = {"model": MODEL, "messages": ASK, "tools": [tool]}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "tools[0].function.parameters" in r.json()["error"]["message"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_streamed_assembles_to_the_non_streamed_call(client: openai.OpenAI, choice: Any) -> None:
    kwargs: Any = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": choice}
    whole = client.chat.completions.create(**kwargs, max_tokens=60, temperature=0, seed=1)
    first = whole.choices[0]
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]

    with client.chat.completions.stream(**kwargs, max_tokens=60, temperature=0, seed=1) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    (same,) = streamed.message.tool_calls or []
    assert same.id.startswith("call_")  # ids are per request
    assert (same.function.name, same.function.arguments) == ("get_weather", call.function.arguments)
    # The arguments stream as they are generated, not in one piece at the end.
    chunks = client.chat.completions.create(**kwargs, max_tokens=60, temperature=0, seed=1, stream=True)
    pieces = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].function and pieces[0].function.name == "get_weather" and len(pieces) >= 3


def test_tool_results_go_back_as_tool_messages(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages: Any = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.choices[0].message.tool_calls is None
    assert out.usage is not None and out.usage.prompt_tokens > 40  # the call and its result were rendered


def test_auto_tool_choice_answers_text_or_a_valid_call(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0)
    choice = out.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        args = json.loads(choice.message.tool_calls[0].function.arguments)
        jsonschema.validate(args, WEATHER["function"]["parameters"])  # type: ignore[index]
    else:
        assert not (choice.message.content or "").startswith("<tool_call>")


# ---- Ollama -------------------------------------------------------------------------------------


def test_ollama_format_schema_and_json(base_url: str) -> None:
    client = ollama.Client(host=base_url)
    schema = Person.model_json_schema()
    r = client.chat(model=MODEL, messages=ASK, format=schema, options={"temperature": 0, "num_predict": 80})
    assert r.done_reason == "stop"
    Person.model_validate_json(r.message.content or "")
    g = client.generate(model=MODEL, prompt="A JSON object:", format="json", options={"num_predict": 40})
    if g.done_reason == "stop":
        assert isinstance(json.loads(g.response), dict)


def test_ollama_bad_format_is_a_400(base_url: str) -> None:
    client = ollama.Client(host=base_url)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL, messages=ASK, format={"type": "object", "properties": {"a": {"type": 3}}})
    assert info.value.status_code == 400 and "format" in str(info.value)


def test_ollama_tools_give_message_tool_calls(base_url: str) -> None:
    """Ollama has no tool_choice; with a system prompt that asks for a call, the answer is one."""
    messages = [{"role": "system", "content": "Always call a function."}, *ASK]
    ollama_client = ollama.Client(host=base_url)
    options = {"temperature": 0, "num_predict": 60}
    r = ollama_client.chat(model=MODEL, messages=messages, tools=[WEATHER], options=options)
    streamed = list(ollama_client.chat(model=MODEL, messages=messages, tools=[WEATHER], stream=True, options=options))
    calls = [c for part in streamed for c in part.message.tool_calls or ()]
    if r.message.tool_calls:
        (call,) = r.message.tool_calls
        jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
            (call.function.name, dict(call.function.arguments))
        ]
    else:
        assert not calls and "".join(p.message.content or "" for p in streamed) == r.message.content
