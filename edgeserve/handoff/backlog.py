"""The device work queued and running ahead of a new request, for the planner's device estimates.

With a cloud configured, every request reaches the engine through the handoff, so the handoff sees
all of the device's work: per request, the prompt tokens the device has not evaluated yet and the
answer tokens still to come, counted down from the request's own event stream (its first device
token means the prompt is in; every token is one fewer to come). The wait it predicts is that work
at the engine's measured rates, the decoding shared among the sequences the engine runs together.

Thread-safe (events arrive on the engine's and the sessions' threads); one per ``Handoff``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from edgeserve.handoff.session import CloudTokenEvent
from edgeserve.running import UNKNOWN_TOKENS, Request, Sink
from edgeserve.service import ServiceModel
from edgeserve.types import ErrorEvent, FinalEvent, StreamEvent, TokenEvent


@dataclass
class _Work:
    prompt_left: int
    answer_left: float


class Backlog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work: dict[int, _Work] = {}

    def track(self, request: Request, *, prompt_on_device: bool = True) -> None:
        """Count ``request`` as device work until its stream ends (wraps its sink).
        ``prompt_on_device=False``: a KV route, the device does not prefill the prompt."""
        key = id(request)
        answer = min(float(request.max_tokens), UNKNOWN_TOKENS)
        with self._lock:
            self._work[key] = _Work(len(request.prompt_tokens) if prompt_on_device else 0, answer)
        sink: Sink = request.sink

        def counted(event: StreamEvent) -> None:
            self._on(key, event)
            sink(event)

        request.sink = counted

    def _on(self, key: int, event: StreamEvent) -> None:
        with self._lock:
            work = self._work.get(key)
            if work is None:
                return
            if isinstance(event, FinalEvent | ErrorEvent):
                del self._work[key]
            elif isinstance(event, TokenEvent):
                if not isinstance(event, CloudTokenEvent):
                    work.prompt_left = 0
                work.answer_left = max(work.answer_left - 1, 0.0)

    def seconds(self, service: ServiceModel, parallel: int) -> float:
        """Predicted seconds before the device starts on a request that arrives now."""
        with self._lock:
            prompts = [w.prompt_left for w in self._work.values()]
            answer = sum(w.answer_left for w in self._work.values())
        prefill = sum(service.prefill_s(n) for n in prompts)
        return prefill + answer / service.decode_tok_s / max(parallel, 1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._work)
