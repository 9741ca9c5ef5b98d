"""Tool calls in and out of text: the instructions a prompt carries, the calls an answer holds, and
a streaming splitter that tells an answer from a call as the text arrives.

The format is ``spec.CALL_OPEN`` + ``{"name": ..., "arguments": {...}}`` + ``spec.CALL_CLOSE``. A
streamed answer and the same answer in one piece give the same calls: both are parsed from the
same final text (``parse_calls``), and the ids come from the request's id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from edgeserve.structured.spec import CALL_CLOSE, CALL_OPEN, Tool
from edgeserve.types import FinishReason, GenerationResult, ToolCall

_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


def instructions(tools: Sequence[Tool], choice: str) -> str:
    """A system prompt telling the model which tools exist and how to call one."""
    listed = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
        for t in tools
        if choice in ("auto", "required") or t.name == choice
    )
    must = "You must call one of these functions." if choice != "auto" else "You may call one of these functions."
    return (
        f"{must} To call a function, answer with exactly:\n"
        f'{CALL_OPEN}{{"name": "<function name>", "arguments": <arguments as a JSON object>}}{CALL_CLOSE}\n'
        f"Functions:\n{listed}"
    )


def render_call(call: Any) -> str:
    """An assistant message's OpenAI ``tool_calls`` entry as the text the model would have written."""
    fn = call.get("function", {}) if hasattr(call, "get") else {}
    arguments = fn.get("arguments", "{}")
    if not isinstance(arguments, str):  # Ollama sends arguments as an object, OpenAI as JSON text
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'{CALL_OPEN}{{"name": {json.dumps(fn.get("name", ""))}, "arguments": {arguments}}}{CALL_CLOSE}'


def parse_calls(text: str, request_id: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The text outside any complete call, and the calls; a call that does not parse stays text."""
    calls: list[ToolCall] = []
    rest: list[str] = []
    end = 0
    for match in _CALL.finditer(text):
        call = _call(match.group(1), request_id, len(calls))
        if call is None:
            continue
        rest.append(text[end : match.start()])
        end = match.end()
        calls.append(call)
    rest.append(text[end:])
    return "".join(rest).strip() if calls else text, tuple(calls)


def _call(body: str, request_id: str, index: int) -> ToolCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    digest = hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]
    return ToolCall(f"call_{digest}", data["name"], json.dumps(arguments, ensure_ascii=False))


def with_tool_calls(result: GenerationResult) -> GenerationResult:
    """The result with the calls its text holds parsed out; ``finish_reason`` becomes ``tool_calls``
    when the answer ended naturally with at least one (a call cut by max_tokens stays text, with
    finish ``length``: never a partial call reported as complete)."""
    if result.finish_reason is not FinishReason.STOP:
        return result
    text, calls = parse_calls(result.text, result.request_id)
    if not calls:
        return result
    return dataclasses.replace(result, text=text, tool_calls=calls, finish_reason=FinishReason.TOOL_CALLS)


class CallSplitter:
    """Sorts streamed text into answer text, sent on at once, and a call, held to the end.

    Under the ``auto`` grammar an answer never starts with ``<`` and a call always does, so the
    first non-empty piece decides; without a grammar (``tool_choice="none"``) nothing is held."""

    def __init__(self, active: bool) -> None:
        self._active = active
        self._decided = not active
        self.holding = False
        self.held: list[str] = []

    def push(self, text: str) -> str:
        """Text to send now (possibly empty)."""
        if not self._decided and text:
            self._decided = True
            self.holding = text.lstrip().startswith("<")
        if self.holding:
            self.held.append(text)
            return ""
        return text
