"""What the predictor reads from a request: a prompt string or OpenAI-style chat messages.

Both shapes reduce to one :class:`Request`, so features are computed from one structure whatever
the caller sent. Validation happens here, once: an empty request is an ``InvalidParameterError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

from edgeserve.errors import InvalidParameterError

#: A prompt string, or a list of ``{"role": ..., "content": str | [parts] | None}`` messages.
PredictorInput: TypeAlias = str | Sequence[Mapping[str, Any]]

_USER_ROLES = frozenset({"user", "human"})
_SYSTEM_ROLES = frozenset({"system", "developer"})
_ASSISTANT_ROLES = frozenset({"assistant", "gpt", "model"})
#: UTF-16 surrogate code points: never text, yet a Python str can hold one (JSON's "\ud800" decodes
#: to it). Features encode text as UTF-8, which refuses them.
_SURROGATES = re.compile("[\ud800-\udfff]")


def _text(s: str) -> str:
    """``s`` with each lone surrogate replaced by U+FFFD, as a UTF-8 decoder shows broken text, so
    that the predictor accepts any string and every feature sees well-formed text."""
    return s if s.isascii() or not _SURROGATES.search(s) else _SURROGATES.sub("\ufffd", s)


@dataclass(frozen=True, slots=True)
class Request:
    """A request reduced to the parts that carry length signal.

    ``last_user`` is the turn being answered; earlier turns matter only through their sizes (how
    long this conversation's answers have been so far), so they are kept as numbers, not text.
    """

    last_user: str
    system: str
    user_turns: int
    assistant_turns: int
    #: Characters of the most recent assistant answer before ``last_user`` (0 if none).
    prev_assistant_chars: int
    #: Characters of all assistant answers so far.
    assistant_chars: int
    #: Characters of all earlier user turns (not counting ``last_user``).
    history_user_chars: int
    #: Non-text content parts (images, audio) in the last user turn.
    media_parts: int


def to_request(prompt: PredictorInput) -> Request:
    """Normalise a prompt string or chat messages; raise ``InvalidParameterError`` if there is no text."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidParameterError("prompt is empty", param="prompt")
        return Request(_text(prompt), "", 1, 0, 0, 0, 0, 0)
    if isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
        return _from_messages(cast(Sequence[Mapping[str, Any]], prompt))
    raise InvalidParameterError("prompt must be a string or a list of messages", param="prompt")


def _from_messages(messages: Sequence[Mapping[str, Any]]) -> Request:
    system_parts: list[str] = []
    last_user = ""
    last_user_media = 0
    user_turns = assistant_turns = 0
    prev_assistant = assistant_chars = history_user = 0
    for i, message in enumerate(messages):
        # The exact-type check first: messages are almost always plain dicts, and ABC checks are slow.
        if type(message) is not dict and not isinstance(message, Mapping):
            raise InvalidParameterError(f"messages[{i}] must be an object", param="messages")
        role = str(message.get("role", "")).lower()
        text, media = _content_text(message.get("content"), i)
        if role in _SYSTEM_ROLES:
            system_parts.append(text)
        elif role in _USER_ROLES:
            if user_turns:
                history_user += len(last_user)
            user_turns += 1
            last_user, last_user_media = text, media
        elif role in _ASSISTANT_ROLES:
            assistant_turns += 1
            assistant_chars += len(text)
            prev_assistant = len(text)
        # Tool results and unknown roles carry no instruction; they are ignored, not rejected.
    if not last_user.strip() and not last_user_media:
        raise InvalidParameterError("messages contain no user text to predict from", param="messages")
    return Request(
        last_user=last_user,
        system="\n".join(system_parts),
        user_turns=user_turns,
        assistant_turns=assistant_turns,
        prev_assistant_chars=prev_assistant,
        assistant_chars=assistant_chars,
        history_user_chars=history_user,
        media_parts=last_user_media,
    )


def _content_text(content: Any, index: int) -> tuple[str, int]:
    """OpenAI content: a string, null, or a list of parts. Returns (text, number of non-text parts)."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return _text(content), 0
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        texts: list[str] = []
        media = 0
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text"):
                texts.append(str(part.get("text") or ""))
            elif isinstance(part, Mapping):
                media += 1
            else:
                raise InvalidParameterError(f"messages[{index}].content parts must be objects", param="messages")
        return _text("\n".join(texts)), media
    raise InvalidParameterError(
        f"messages[{index}].content must be a string, a list of parts or null", param="messages"
    )
