"""The device's two moves in a handoff, over the engine's API:

- ``start_prefill``: prefill the prompt (all but its last token) as a scheduled, cancellable job
  that yields the sequence's KV blob (``Engine.prefill_state``);
- ``continue_from``: run the request from a KV blob (``kv_state``) with the cloud's covered tokens
  either appended to the prompt (one prefill of them: the fast way) or, when the request has
  penalties, forced as its first answer tokens (``ForcedPrefix``): the sampler then picks them
  itself, so its penalty history holds them exactly as in a device-only run, one decode step each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeserve.engine import Engine, Handle
from edgeserve.handles import PrefillJob
from edgeserve.types import SamplingParams, StreamEvent


def start_prefill(engine: Engine, tokens: Sequence[int]) -> PrefillJob:
    return engine.prefill_state(list(tokens))


def has_penalties(params: SamplingParams) -> bool:
    return bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)


class ForcedPrefix:
    """A ``Constraint`` that allows only ``tokens[i]`` at the i-th step, then anything: the answer
    starts with the cloud's tokens, picked by the request's own sampler (a penalty can lower a forced
    token's logit, never below the -inf of the others). Never ends the answer."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self._tokens = list(tokens)
        self._next = 0

    def mask(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        if self._next < len(self._tokens):
            token = self._tokens[self._next]
            keep = logits[token]
            logits[:] = -np.inf
            logits[token] = keep

    def accept(self, token: int) -> None:
        self._next += 1

    @property
    def done(self) -> bool:
        return False

    def close(self) -> None:
        """Nothing to free."""


def continue_from(
    engine: Engine,
    tokens: Sequence[int],
    params: SamplingParams,
    blob: bytes | None,
    on_event: Callable[[StreamEvent], None],
    request_id: str,
    *,
    forced: Sequence[int] = (),
) -> Handle:
    """Submit the device's part; bypasses the handoff (``cloud=False``) so it cannot recurse.
    ``forced``: tokens the answer must start with (``ForcedPrefix``); ``tokens`` is then the prompt
    alone."""
    if not forced:
        return engine.submit(list(tokens), params, request_id=request_id, on_event=on_event, cloud=False, kv_state=blob)
    request = engine.prepare(list(tokens), None, params, request_id, on_event)
    request.kv_state = blob
    request.constraint = ForcedPrefix(forced)
    return engine.submit_prepared(request)
