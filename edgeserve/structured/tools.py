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
from dataclasses import dataclass
from typing import Any

from edgeserve.structured.spec import CALL_CLOSE, CALL_OPEN, Tool, call_prefix
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
    # The model's own text when the call is in the grammar's form (what a stream sends piece by
    # piece), else the arguments written anew.
    prefix = call_prefix(data["name"])[len(CALL_OPEN) :]
    raw = body[len(prefix) : -1] if body.startswith(prefix) and body.endswith("}") else ""
    text = raw if raw and _same_json(raw, arguments) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(call_id(request_id, index), data["name"], text)


def _same_json(text: str, value: Any) -> bool:
    try:
        return bool(json.loads(text) == value)
    except json.JSONDecodeError:
        return False


def call_id(request_id: str, index: int) -> str:
    """A call's id: from its request, so a streamed answer and its final result name it alike."""
    return "call_" + hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]


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


@dataclass(frozen=True)
class CallDelta:
    """A piece of a streamed call: the first names it (``id``, ``name``), the rest extend its
    arguments (OpenAI's ``delta.tool_calls``)."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


_HEAD = re.compile(re.escape(CALL_OPEN) + r'\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')
#: What may still close a call: its arguments' text never ends with it until the end.
_TAIL = len("}" + CALL_CLOSE)


class CallSplitter:
    """Sorts streamed text into answer text, sent on at once, and a call, streamed as ``CallDelta``s.

    Under the ``auto`` grammar an answer never starts with ``<`` and a call always does, so the
    first non-empty piece decides; without a grammar (``tool_choice="none"``) nothing is held. A
    call's name goes out once it is complete, its arguments as they come, less the last characters
    that may be the call's closing ``}</tool_call>``; ``finish`` sends the rest from the final
    result, whose arguments are the same text (``parse_calls`` keeps the model's own)."""

    def __init__(self, active: bool, request_id: str = "") -> None:
        self._active = active
        self._decided = not active
        self._request_id = request_id
        self.holding = False
        self.held: list[str] = []
        self._name: str | None = None
        self._sent = 0  # characters of the first call's arguments already sent

    def push(self, text: str) -> str:
        """Answer text to send now (possibly empty); a call's pieces come from ``calls``."""
        if not self._decided and text:
            self._decided = True
            self.holding = text.lstrip().startswith("<")
        if self.holding:
            self.held.append(text)
            return ""
        return text

    @property
    def started_call(self) -> bool:
        """A call's first piece went out (what follows belongs to it, complete or cut short)."""
        return self._name is not None

    def calls(self) -> list[CallDelta]:
        """The pieces of the first call that can go out now."""
        if not self.holding:
            return []
        held = "".join(self.held)
        head = _HEAD.match(held.lstrip())
        if head is None:
            return []
        out = []
        if self._name is None:
            self._name = head.group(1)
            out.append(CallDelta(0, "", call_id(self._request_id, 0), self._name))
        arguments = held.lstrip()[head.end() :]
        safe = len(arguments) - _TAIL
        if safe > self._sent:
            out.append(CallDelta(0, arguments[self._sent : safe]))
            self._sent = safe
        return out

    def finish(self, calls: Sequence[ToolCall]) -> list[CallDelta]:
        """What is left of the calls, once the answer is complete."""
        out = []
        for i, call in enumerate(calls):
            if i == 0 and self._name is not None and call.arguments.startswith(self._streamed()):
                out.append(CallDelta(0, call.arguments[self._sent :]))
                continue
            out += [CallDelta(i, "", call.id, call.name), CallDelta(i, call.arguments)]
        return [d for d in out if d.arguments or d.id]

    def _streamed(self) -> str:
        held = "".join(self.held).lstrip()
        head = _HEAD.match(held)
        return held[head.end() : head.end() + self._sent] if head else ""
