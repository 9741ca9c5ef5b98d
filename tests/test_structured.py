"""Structured output on the scripted backend (a byte-level vocabulary, no model; seconds in all): the
grammar constraint, its cache, its errors, tool calls, and that a parked request's constraint
resumes where it stopped. The real model's side is in test_structured_api.py and the conformance
suite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import numpy as np
import pytest

from edgeserve import Engine, FinishReason, InvalidParameterError, SamplingParams, TokenEvent
from edgeserve.handles import outcome
from edgeserve.scripted import ScriptedBackend
from edgeserve.settings import EngineSettings
from edgeserve.structured import CallSplitter, StructuredOutput, parse_calls, plan
from edgeserve.structured.grammar import closed

SEEDED = SamplingParams(max_tokens=400, temperature=0.9, seed=3)
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
    },
    {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {"point": {"$ref": "#/$defs/point"}, "ok": {"type": "boolean"}},
        "required": ["point", "ok"],
        "$defs": {
            "point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}},
        },
    },
]
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"key": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "maximum": 9}},
            "required": ["key", "n"],
        },
    },
}


def _fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(step_s=0.002)


@pytest.fixture
def engine(backend: ScriptedBackend) -> Iterator[Engine]:
    settings = EngineSettings(policy="srpt", preempt_quantum_s=0.0, aging_s=1000.0)
    with Engine(backend, settings) as eng:
        yield eng


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array", "ref"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_answers_follow_the_schema_whatever_the_logits(engine: Engine, schema: dict[str, Any], seed: int) -> None:
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=seed)
    result = engine.generate("x", params, response_format=_fmt(schema))
    assert result.finish_reason is FinishReason.STOP
    jsonschema.validate(json.loads(result.text), schema)


def test_json_object_mode_gives_an_object(engine: Engine) -> None:
    result = engine.generate("x", SEEDED, response_format={"type": "json_object"})
    if result.finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(result.text), dict)
    else:
        assert result.text.startswith("{")


def test_max_tokens_mid_json_is_length(engine: Engine) -> None:
    result = engine.generate("x", SamplingParams(max_tokens=3, temperature=0), response_format=_fmt(SCHEMAS[0]))
    assert result.finish_reason is FinishReason.LENGTH
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_a_parked_request_resumes_its_json_exactly(engine: Engine, backend: ScriptedBackend) -> None:
    fmt = _fmt(SCHEMAS[0])
    solo = engine.generate("a long one", SEEDED, response_format=fmt)
    events = iter(engine.submit("a long one", SEEDED, predicted_tokens=500, response_format=fmt))
    next(e for e in events if isinstance(e, TokenEvent))  # started
    short = engine.generate("short", SamplingParams(max_tokens=4, temperature=0), predicted_tokens=4)
    result = next(r for e in events if (r := outcome(e)) is not None)
    assert result.preemptions == 1 and short.preemptions == 0
    assert result.text == solo.text
    jsonschema.validate(json.loads(result.text), SCHEMAS[0])


@pytest.mark.parametrize(
    ("fmt", "says"),
    [
        (_fmt({"type": "strnig"}), "response_format.json_schema.schema is not a valid JSON Schema at type"),
        (_fmt({"type": "object", "not": {"required": ["a"]}}), 'Unimplemented keys: ["not"]'),
        (_fmt({"type": "string", "pattern": "(?=a)b"}), "look-around"),
        (_fmt(True), "must be a JSON Schema object"),
        ({"type": "yaml"}, "response_format.type must be text, json_object or json_schema"),
        ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ],
)
def test_bad_or_unsupported_schemas_are_400s_naming_the_field(engine: Engine, fmt: Any, says: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        engine.submit("x", SEEDED, response_format=fmt)
    assert says in str(info.value) and info.value.param == "response_format"
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("tools", "choice", "says"),
    [
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}], None, "function.parameters"),
        ([TOOL, TOOL], None, "given twice"),
        ([TOOL], {"type": "function", "function": {"name": "other"}}, "not among the tools"),
        ([TOOL], "sometimes", "tool_choice must be"),
        (None, "required", "needs tools"),
    ],
)
def test_bad_tools_are_400s(engine: Engine, tools: Any, choice: Any, says: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        engine.submit(messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice=choice)
    assert says in str(info.value)


def test_tools_need_messages(engine: Engine) -> None:
    with pytest.raises(InvalidParameterError, match="messages"):
        engine.submit("a prompt", tools=[TOOL])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "lookup"}}])
def test_a_forced_call_is_parsed_and_its_arguments_follow_the_schema(engine: Engine, choice: Any) -> None:
    messages = [{"role": "user", "content": "look it up"}]
    result = engine.generate(messages=messages, params=SEEDED, tools=[TOOL], tool_choice=choice)
    assert result.finish_reason is FinishReason.TOOL_CALLS and result.text == ""
    (call,) = result.tool_calls
    assert call.name == "lookup" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), TOOL["function"]["parameters"])  # type: ignore[index]
    streamed = [e for e in engine.stream(messages=messages, params=SEEDED, tools=[TOOL], tool_choice=choice)]
    final = streamed[-1].result  # type: ignore[union-attr]
    assert [(c.name, c.arguments) for c in final.tool_calls] == [(call.name, call.arguments)]


def test_auto_answers_text_or_a_call_and_none_never_calls(engine: Engine) -> None:
    messages = [{"role": "user", "content": "look it up"}]
    for seed in range(4):
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=seed)
        result = engine.generate(messages=messages, params=params, tools=[TOOL])
        if result.tool_calls:
            assert result.finish_reason is FinishReason.TOOL_CALLS
        else:
            assert not result.text.startswith("<")  # the grammar keeps "<" for calls
        assert not engine.generate(messages=messages, params=params, tools=[TOOL], tool_choice="none").tool_calls


def test_tool_calls_and_results_are_rendered_into_the_prompt(engine: Engine) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "k", "n": 1}'}}
    messages = [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "RESULT-42"},
    ]
    handle = engine.submit(messages=messages, params=SamplingParams(max_tokens=1), tools=[TOOL], tool_choice="none")
    handle.result()
    prompt = engine.backend.detokenize(handle._request.prompt_tokens).decode()
    assert '<tool_call>{"name": "lookup", "arguments": {"key": "k", "n": 1}}</tool_call>' in prompt
    assert "<tool_response>\nRESULT-42\n</tool_response>" in prompt


def test_grammars_are_compiled_once_per_schema(backend: ScriptedBackend) -> None:
    structured = StructuredOutput(backend)
    spec = plan(_fmt(SCHEMAS[0]))
    first = structured.constraint(spec)
    second = structured.constraint(plan(_fmt(SCHEMAS[0])))
    assert structured.compiler.misses == 1 and structured.compiler.hits == 1
    assert first is not second  # each request its own state
    logits = np.zeros(backend.capabilities().n_vocab, dtype=np.float32)
    assert first is not None
    first.mask(logits)
    assert np.isfinite(logits).sum() == 1  # only "{" may open this object


def test_objects_that_list_their_properties_are_closed() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}, "allOf": [SCHEMAS[0]]}
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["allOf"][0]
    assert closed({"type": "object", "properties": {}, "additionalProperties": True})["additionalProperties"] is True


def test_calls_parse_from_text_and_the_splitter_holds_only_calls() -> None:
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    rest, calls = parse_calls(text, "req-1")
    assert rest == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]
    assert parse_calls(text, "req-1")[1][0].id == calls[0].id  # the same request gives the same id
    assert parse_calls('<tool_call>{"name": "f", "arguments": {"x": </tool_call>', "r") == (
        '<tool_call>{"name": "f", "arguments": {"x": </tool_call>',
        (),
    )
    text_splitter = CallSplitter(True)
    assert [text_splitter.push(p) for p in ["", "Hi", " <b>"]] == ["", "Hi", " <b>"]
    assert text_splitter.calls() == [] and not text_splitter.started_call


def test_a_streamed_call_assembles_to_the_parsed_one() -> None:
    text = '<tool_call>{"name": "lookup", "arguments": {"key": "caf\u00e9", "n": 7}}</tool_call>'
    splitter = CallSplitter(True, "req-9")
    pieces = []
    for i in range(0, len(text), 3):  # three characters a token
        assert splitter.push(text[i : i + 3]) == ""
        pieces += splitter.calls()
    (call,) = parse_calls(text, "req-9")[1]
    pieces += splitter.finish([call])
    assert (pieces[0].id, pieces[0].name, pieces[0].arguments) == (call.id, "lookup", "")
    assert len(pieces) > 3  # the arguments went out as they came, not at the end
    assert "".join(p.arguments for p in pieces) == call.arguments == '{"key": "caf\u00e9", "n": 7}'
    assert {p.index for p in pieces} == {0} and all(p.id is None for p in pieces[1:])


def test_a_schema_nested_past_any_checker_is_a_400(engine: Engine) -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(5000):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(InvalidParameterError, match="nests too deeply"):
        engine.submit("x", SEEDED, response_format=_fmt(deep))
