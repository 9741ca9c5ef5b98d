"""The cloud's side of a token handoff: one streamed OpenAI-compatible request, read on its own thread.

Any OpenAI-compatible server works (vLLM, SGLang, llama.cpp's server, another ``edgeserve serve``):
``/v1/completions`` for a prompt, ``/v1/chat/completions`` for messages, ``stream: true``. Every way
the cloud can fail (no connection, an HTTP error, silence past a timeout, a stream cut or garbled)
becomes one ``CloudFailed`` message with an ``UpstreamError``, mapped here once; the session then
goes on with the device alone. A stream that ends without ``[DONE]`` is a failure too, never an end.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from edgeserve.errors import UpstreamError, UpstreamTimeout
from edgeserve.settings import CloudSettings
from edgeserve.types import Message, SamplingParams


@dataclass(frozen=True)
class CloudDelta:
    text: str
    at: float


@dataclass(frozen=True)
class CloudEnd:
    """The cloud finished its answer (``stop``) or its token cap (``length``)."""

    finish_reason: str
    at: float


@dataclass(frozen=True)
class CloudFailed:
    error: UpstreamError
    at: float


CloudMessage = CloudDelta | CloudEnd | CloudFailed


def request_body(
    model: str,
    params: SamplingParams,
    max_tokens: int,
    *,
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of the cloud's request: the user's sampling, the planner's token cap."""
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    # Penalties only when set: presence and frequency are OpenAI's; repetition_penalty is the extension
    # vLLM, SGLang and edgeserve take (the device's history holds the cloud's tokens; ``device``).
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if messages is not None:
        return "/v1/chat/completions", {**body, "messages": [dict(m) for m in messages]}
    return "/v1/completions", {**body, "prompt": prompt}


def _headers(settings: CloudSettings) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if settings.cloud_api_key:
        headers["Authorization"] = f"Bearer {settings.cloud_api_key}"
    return headers


def _timeout(settings: CloudSettings) -> httpx.Timeout:
    # The read timeout is the first token's budget; later reads are checked against the chunk timeout.
    return httpx.Timeout(
        connect=settings.cloud_connect_timeout_s,
        read=settings.cloud_first_token_timeout_s,
        write=settings.cloud_connect_timeout_s,
        pool=settings.cloud_connect_timeout_s,
    )


def _delta_text(event: Mapping[str, Any]) -> tuple[str, str | None]:
    if "error" in event:
        raise UpstreamError(f"the cloud reported an error mid-stream: {event['error']}")
    choices = event.get("choices") or []
    if not choices:
        return "", None  # a usage chunk
    choice = choices[0]
    delta = choice.get("delta")
    text = (delta or {}).get("content") if delta is not None else choice.get("text")
    return str(text or ""), choice.get("finish_reason")


class CloudStream:
    """One streamed request on a daemon thread; messages go to ``deliver`` in order, the last one a
    ``CloudEnd`` or ``CloudFailed`` (none after ``close``)."""

    def __init__(
        self,
        settings: CloudSettings,
        path: str,
        body: Mapping[str, Any],
        deliver: Callable[[CloudMessage], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._url = f"{settings.cloud}{path}"
        self._body = dict(body)
        self._deliver = deliver
        self._clock = clock
        self._closed = threading.Event()
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()
        self.started_at = clock()
        self._thread = threading.Thread(target=self._run, name="edgeserve-cloud", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop reading and close the connection, so the cloud stops generating."""
        self._closed.set()
        with self._lock:
            response = self._response
        if response is not None:
            # Closing from another thread may race the reader; the stream ends either way.
            with contextlib.suppress(Exception):
                response.close()

    def _send(self, message: CloudMessage) -> None:
        if not self._closed.is_set():
            self._deliver(message)

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=_timeout(self._settings)) as client:
                self._stream(client)
        except UpstreamError as exc:
            self._send(CloudFailed(exc, self._clock()))
        except httpx.TimeoutException as exc:
            self._send(CloudFailed(UpstreamTimeout(f"the cloud timed out: {type(exc).__name__}"), self._clock()))
        except (httpx.HTTPError, OSError, ValueError) as exc:
            if not self._closed.is_set():
                self._send(CloudFailed(UpstreamError(f"the cloud failed: {type(exc).__name__}: {exc}"), self._clock()))

    def _stream(self, client: httpx.Client) -> None:
        with client.stream("POST", self._url, json=self._body, headers=_headers(self._settings)) as response:
            with self._lock:
                self._response = response
            if self._closed.is_set():
                return
            if response.status_code != 200:
                response.read()
                raise UpstreamError(f"the cloud answered HTTP {response.status_code}: {response.text[:200]}")
            last: float | None = None  # the first event may take the whole first-token budget
            for line in response.iter_lines():
                if self._closed.is_set():
                    return
                now = self._clock()
                if last is not None and line and now - last > self._settings.cloud_chunk_timeout_s:
                    raise UpstreamTimeout("the cloud went silent mid-stream")
                if line:
                    last = now
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                text, finish = _delta_text(json.loads(data))
                if text:
                    self._send(CloudDelta(text, now))
                if finish is not None:
                    self._send(CloudEnd(str(finish), now))
                    return
            raise UpstreamError("the cloud's stream ended without [DONE]")
