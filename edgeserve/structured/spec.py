"""What a request asks of its output, validated: ``response_format``, ``tools`` and ``tool_choice``
in OpenAI's shapes (the Ollama routes translate ``format`` into them), and the grammar that
enforces them.

Bad input is an ``InvalidParameterError`` (400) whose message names the field: a schema that is not
valid JSON Schema names the path inside it; a schema the grammar engine cannot enforce names the
construct (``grammar.GrammarCompiler``).

A tool call is written ``<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>``: the format
Hermes-style and Qwen templates use, and a fixed one, so that a streamed call can be cut into its
name and arguments. With ``tool_choice="auto"`` the grammar is ``answer | call``: the answer is
free text that does not start with ``<`` (or JSON under ``response_format``), so the first token
decides which, and a call's arguments always follow its tool's schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeserve.errors import InvalidParameterError
from edgeserve.structured.grammar import inline_schema, json_schema_grammar, lark_grammar

#: OpenAI's rule for function names; it also keeps them safe inside a grammar's string literal.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class OutputSpec:
    """A request's output contract: the grammar text (None: unconstrained), the field its errors
    name, and the tools on offer (``choice`` is ``auto``, ``required``, ``none`` or a tool's name)."""

    grammar: str | None
    param: str
    tools: tuple[Tool, ...] = ()
    choice: str = "none"

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def plan(response_format: Any = None, tools: Any = None, tool_choice: Any = None) -> OutputSpec | None:
    """Validate the three fields together; None when the output is free text with no tools."""
    schema = response_schema(response_format)
    offered = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, offered)
    param = "tools" if offered and choice != "none" else "response_format"
    try:
        if offered and choice != "none":
            return OutputSpec(lark_grammar(tool_lark(offered, choice, schema)), param, offered, choice)
        if schema is not None:
            return OutputSpec(json_schema_grammar(schema), param, offered, choice)
    except RecursionError:
        raise InvalidParameterError(f"{param}: the schema nests too deeply", param=param) from None
    except ValueError as exc:  # llguidance refuses what it cannot even write down as a grammar
        raise InvalidParameterError(f"{param}: the grammar engine cannot enforce it: {exc}", param=param) from None
    return OutputSpec(None, "tools", offered, choice) if offered else None


def response_schema(response_format: Any, param: str = "response_format") -> dict[str, Any] | None:
    """OpenAI's ``response_format`` (or a Pydantic model class) to the JSON schema its answer must
    follow; None for free text."""
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        schema: dict[str, Any] = response_format.model_json_schema()
        return schema
    if not isinstance(response_format, Mapping):
        raise InvalidParameterError(f"{param} must be an object with a type", param=param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind != "json_schema":
        raise InvalidParameterError(f"{param}.type must be text, json_object or json_schema, got {kind!r}", param=param)
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidParameterError(f"{param}.json_schema must be an object with a schema", param=param)
    if spec.get("name") is not None and not (isinstance(spec["name"], str) and TOOL_NAME.fullmatch(spec["name"])):
        raise InvalidParameterError(f"{param}.json_schema.name must match {TOOL_NAME.pattern}", param=param)
    schema = spec.get("schema", ANY_OBJECT)
    return checked_schema(schema, f"{param}.json_schema.schema")


def checked_schema(schema: Any, where: str) -> dict[str, Any]:
    """``schema`` if it is a valid JSON Schema (draft 2020-12, what OpenAI and Pydantic write);
    otherwise a 400 naming ``where`` and the path to the fault inside it."""
    import jsonschema

    param = re.split(r"[.\[]", where)[0]  # the request's own field (OpenAI's ``error.param``)
    if isinstance(schema, bool):  # true / false are schemas, but an answer needs a shape
        raise InvalidParameterError(f"{where} must be a JSON Schema object, not {json.dumps(schema)}", param=param)
    if not isinstance(schema, Mapping):
        raise InvalidParameterError(f"{where} must be a JSON Schema object", param=param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        inside = "/".join(str(p) for p in exc.path)
        at = f" at {inside}" if inside else ""
        raise InvalidParameterError(f"{where} is not a valid JSON Schema{at}: {exc.message}", param=param) from None
    except RecursionError:  # a body may nest deeper than any checker recurses
        raise InvalidParameterError(f"{where} nests too deeply", param=param) from None
    return dict(schema)


def parse_tools(tools: Any, param: str = "tools") -> tuple[Tool, ...]:
    """OpenAI's ``tools`` (``[{"type": "function", "function": {...}}]``) validated."""
    if tools is None:
        return ()
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise InvalidParameterError(f"{param} must be a list of functions", param=param)
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise InvalidParameterError(f'{where} must be {{"type": "function", "function": {{...}}}}', param=param)
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise InvalidParameterError(f"{where}.function must be an object", param=param)
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise InvalidParameterError(f"{where}.function.name must match {TOOL_NAME.pattern}", param=param)
        if any(t.name == name for t in out):
            raise InvalidParameterError(f"{where}.function.name {name!r} is given twice", param=param)
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise InvalidParameterError(f"{where}.function.description must be a string", param=param)
        parameters = checked_schema(fn.get("parameters", ANY_OBJECT), f"{where}.function.parameters")
        out.append(Tool(name, description, parameters))
    return tuple(out)


def parse_tool_choice(choice: Any, tools: Sequence[Tool], param: str = "tool_choice") -> str:
    """``none``, ``auto``, ``required`` or a tool's name. Absent: ``auto`` with tools, else ``none``."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidParameterError(f"{param} must be none, auto, required or a function", param=param)
        name = choice
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if not any(t.name == name for t in tools):
            raise InvalidParameterError(f"{param} names {name!r}, which is not among the tools", param=param)
        return str(name)
    else:
        raise InvalidParameterError(f'{param} must be a string or {{"type": "function", ...}}', param=param)
    if name != "none" and not tools:
        raise InvalidParameterError(f"{param}={name!r} needs tools", param=param)
    return name


def call_prefix(name: str) -> str:
    """The fixed text of a call up to its arguments."""
    return f'{CALL_OPEN}{{"name": "{name}", "arguments": '


def tool_lark(tools: Sequence[Tool], choice: str, answer_schema: dict[str, Any] | None) -> str:
    """The Lark grammar for a turn that may (``auto``) or must call a tool."""
    chosen = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    lines = ["call: " + " | ".join(f"call_{i}" for i in range(len(chosen)))]
    for i, tool in enumerate(chosen):
        lines.append(f"call_{i}: {json.dumps(call_prefix(tool.name))} args_{i} {json.dumps('}' + CALL_CLOSE)}")
        lines.append(f"args_{i}: %json {inline_schema(dict(tool.parameters))}")
    if choice != "auto":
        return "start: call\n" + "\n".join(lines) + "\n"
    # Free text may not start with "<", so the first token tells an answer from a call.
    answer = f"answer: %json {inline_schema(answer_schema)}" if answer_schema else "answer: TEXT\nTEXT: /[^<](.|\\n)*/"
    return "start: answer | call\n" + answer + "\n" + "\n".join(lines) + "\n"
