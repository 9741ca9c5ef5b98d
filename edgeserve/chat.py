"""Chat messages to a prompt string.

The model's own Jinja template wins when the model file has one. Otherwise a built-in format is
chosen by architecture, and the result names which one was used, because a wrong template silently
ruins answers (the default Gemma 3 270M GGUF ships none; llama-cpp-python then falls back to the
llama-2 format and Gemma answers nothing).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeserve.errors import InvalidParameterError
from edgeserve.structured.tools import render_call
from edgeserve.types import Capabilities, Message

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class RenderedChat:
    prompt: str
    #: ``model`` (the model's template) or ``builtin:<name>``.
    template: str
    #: ``prompt`` cut into (text, special) pieces: the template's own text, whose special-token
    #: markers become special tokens, and message content, which is tokenized as plain text so that
    #: a user who writes ``<start_of_turn>`` cannot forge a turn. Joined, the texts are ``prompt``.
    parts: tuple[tuple[str, bool], ...] = ()


def normalize(messages: Sequence[Message]) -> list[ChatTurn]:
    """Validate OpenAI-style messages and flatten content arrays to text."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidParameterError("messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not hasattr(m, "get"):
            raise InvalidParameterError(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidParameterError(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}", param="messages"
            )
        turns.append(ChatTurn("system" if role == "developer" else str(role), _turn_text(m, str(role), i)))
    return turns


def _turn_text(message: Message, role: str, index: int) -> str:
    """A message's text; tool calls and tool results written as the model reads them (the format
    of ``edgeserve.structured``: ``<tool_call>{...}</tool_call>``, ``<tool_response>...``)."""
    text = content_text(message.get("content"), index)
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, Sequence) or not all(hasattr(c, "get") for c in calls):
            raise InvalidParameterError(f"messages[{index}].tool_calls must be a list of calls", param="messages")
        text += "".join(render_call(c) for c in calls)
    if role == "tool":
        text = f"<tool_response>\n{text}\n</tool_response>"
    return text


def content_text(content: Any, index: int = 0) -> str:
    """OpenAI content: a string, null, or a list of parts of which only text parts can be served."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidParameterError(
                    f"messages[{index}].content: only text parts are supported, got {kind!r}",
                    param="messages",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidParameterError(f"messages[{index}].content must be a string or a list of parts", param="messages")


def _gemma(turns: list[ChatTurn], bos: str) -> str:
    # Gemma has no system role: its official template folds the system prompt into the first user turn.
    system = "\n\n".join(t.content for t in turns if t.role == "system")
    out = [bos]
    first_user = True
    for t in turns:
        if t.role == "system":
            continue
        text = t.content.strip()
        if t.role != "assistant" and first_user and system:
            text = f"{system}\n\n{text}"
        if t.role != "assistant":
            first_user = False
        role = "model" if t.role == "assistant" else "user"
        out.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def _chatml(turns: list[ChatTurn], bos: str) -> str:
    body = "".join(f"<|im_start|>{t.role}\n{t.content}<|im_end|>\n" for t in turns)
    return body + "<|im_start|>assistant\n"


def _plain(turns: list[ChatTurn], bos: str) -> str:
    # For models with neither a template nor a known format: a transcript any base model can continue.
    names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    return bos + "".join(f"{names[t.role]}: {t.content}\n" for t in turns) + "Assistant:"


BUILTIN: dict[str, Callable[[list[ChatTurn], str], str]] = {
    "gemma": _gemma,
    "chatml": _chatml,
    "plain": _plain,
}

#: Architecture prefix (as named in the model file) → built-in format, for models without a template.
BY_ARCHITECTURE = {"gemma": "gemma", "qwen": "chatml"}


def builtin_for(architecture: str) -> str:
    return next((fmt for prefix, fmt in BY_ARCHITECTURE.items() if architecture.startswith(prefix)), "plain")


def render(messages: Sequence[Message], caps: Capabilities) -> RenderedChat:
    turns = normalize(messages)
    if caps.chat_template:
        name = "model"
        fmt: Callable[[list[ChatTurn]], str] = lambda ts: _render_jinja(  # noqa: E731
            caps.chat_template or "", ts, caps.bos_token, caps.eos_token
        )
    else:
        builtin = builtin_for(caps.architecture)
        name = f"builtin:{builtin}"
        fmt = lambda ts: BUILTIN[builtin](ts, caps.bos_token)  # noqa: E731
        if builtin == "gemma":  # its format strips each turn; stripped here, the marks stay exact
            turns = [ChatTurn(t.role, t.content.strip()) for t in turns]
    # Each message's content goes through the template as a mark no user can type (a fresh random
    # nonce in private-use characters); the marks are then swapped back for the content, as plain text.
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(turns))]
    template_text = fmt([ChatTurn(t.role, mark) for t, mark in zip(turns, marks, strict=True)])
    parts: list[tuple[str, bool]] = []
    for i, piece in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", template_text)):
        if i % 2 == 0:
            if piece:
                parts.append((piece, True))
        elif content := turns[int(piece)].content:
            parts.append((content, False))
    return RenderedChat("".join(text for text, _ in parts), name, tuple(parts))


def _raise_exception(message: str) -> None:
    raise InvalidParameterError(f"the model's chat template refused the messages: {message}", param="messages")


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """A model's template compiled once (compiling costs milliseconds, rendering microseconds).
    Sandboxed: a chat template comes from a downloaded model file and is untrusted code."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _render_jinja(template: str, turns: list[ChatTurn], bos_token: str, eos_token: str) -> str:
    from jinja2 import TemplateError

    try:
        rendered: str = _compiled(template).render(
            messages=[{"role": t.role, "content": t.content} for t in turns],
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as exc:
        raise InvalidParameterError(f"the model's chat template failed: {exc}", param="messages") from exc
    return rendered
