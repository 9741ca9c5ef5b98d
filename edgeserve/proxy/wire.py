"""What the proxy reads from a generation request: enough to predict and prioritise it, nothing
more. The body itself goes upstream byte for byte."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgeserve.errors import InvalidParameterError
from edgeserve.predictor.tokens import approx_tokens

#: Generation routes that wait for an upstream slot; every other route passes straight through.
ADMITTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"})

#: OpenAI's service tiers on the priority scale (lower runs earlier, as in vLLM).
SERVICE_TIERS = {"priority": -1, "default": 0, "auto": 0, "flex": 1, "scale": 0}
PRIORITY_HEADER = "x-priority"


#: Tokens a chat template adds around each message (turn markers, role names): a rough constant.
TEMPLATE_TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True)
class Admitted:
    #: A prompt string or chat messages for the length predictor (None: nothing readable).
    source: str | list[dict[str, Any]] | None
    priority: int
    #: The request's own cap on the answer (max_tokens, max_completion_tokens, num_predict).
    max_tokens: int | None = None

    def prompt_tokens(self) -> int:
        """The prompt's length in tokens, estimated without a tokenizer (UTF-8 bytes / 4): the
        proxy serves any model, and only the prefill's share of the service time rests on it."""
        if isinstance(self.source, str):
            return approx_tokens(self.source)
        if self.source is None:
            return 0
        total = 0
        for message in self.source:
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
            total += approx_tokens(content if isinstance(content, str) else "") + TEMPLATE_TOKENS_PER_MESSAGE
        return total


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
    return Admitted(_source(path, payload), _priority(payload, headers), _max_tokens(payload))


def _max_tokens(payload: dict[str, Any]) -> int | None:
    options = payload.get("options")
    values = [payload.get("max_tokens"), payload.get("max_completion_tokens")]
    if isinstance(options, dict):
        values.append(options.get("num_predict"))  # Ollama; -1 means no cap
    caps = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(caps) if caps else None


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
