"""What the proxy reads from a generation request: enough to predict and prioritise it, nothing
more. The body itself goes upstream byte for byte."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgeserve.errors import InvalidParameterError

#: Generation routes that wait for an upstream slot; every other route passes straight through.
ADMITTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"})

#: OpenAI's service tiers on the priority scale (lower runs earlier, as in vLLM).
SERVICE_TIERS = {"priority": -1, "default": 0, "auto": 0, "flex": 1, "scale": 0}
PRIORITY_HEADER = "x-priority"


@dataclass(frozen=True)
class Admitted:
    #: A prompt string or chat messages for the length predictor (None: nothing readable).
    source: str | list[dict[str, Any]] | None
    priority: int


def parse(path: str, body: bytes, headers: dict[str, str]) -> Admitted:
    """Read a generation request. Raises ``InvalidParameterError`` for a body the upstream could not
    take either (not JSON, not an object, a malformed priority): answered here, without a wait."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidParameterError("the request body nests too deeply to be a request") from None
    if not isinstance(payload, dict):
        raise InvalidParameterError("the request body must be a JSON object")
    return Admitted(_source(path, payload), _priority(payload, headers))


def _source(path: str, payload: dict[str, Any]) -> str | list[dict[str, Any]] | None:
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        return [m for m in messages if isinstance(m, dict)] or None
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompt = prompt[0]  # n prompts batched: the first stands for the rest
    if isinstance(prompt, str) and prompt.strip():
        system = payload.get("system") if path == "/api/generate" else None
        if isinstance(system, str) and system.strip():
            return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return prompt
    return None


def _priority(payload: dict[str, Any], headers: dict[str, str]) -> int:
    if PRIORITY_HEADER in headers:
        try:
            return int(headers[PRIORITY_HEADER])
        except ValueError:
            raise InvalidParameterError(f"header {PRIORITY_HEADER} must be an integer", param="priority") from None
    priority = payload.get("priority")
    if priority is not None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError("priority must be an integer (lower runs earlier)", param="priority")
        return priority
    tier = payload.get("service_tier")
    if tier is not None:
        if tier not in SERVICE_TIERS:
            raise InvalidParameterError(
                f"service_tier must be one of {', '.join(sorted(SERVICE_TIERS))}", param="service_tier"
            )
        return SERVICE_TIERS[tier]
    return 0
