"""The device's two moves in a handoff, over the engine's API:

- ``start_prefill``: prefill the prompt (all but its last token) as a scheduled, cancellable job
  that yields the sequence's KV blob (``Engine.prefill_state``);
- ``continue_from``: run the request from a KV blob (``Engine.submit(..., kv_state=blob)``) with
  the cloud's covered tokens appended to the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edgeserve.engine import Engine, Handle
from edgeserve.handles import PrefillJob
from edgeserve.types import SamplingParams, StreamEvent


def start_prefill(engine: Engine, tokens: Sequence[int]) -> PrefillJob:
    return engine.prefill_state(list(tokens))


def continue_from(
    engine: Engine,
    tokens: Sequence[int],
    params: SamplingParams,
    blob: bytes | None,
    on_event: Callable[[StreamEvent], None],
    request_id: str,
) -> Handle:
    """Submit the device's part; bypasses the handoff (``cloud=False``) so it cannot recurse."""
    return engine.submit(list(tokens), params, request_id=request_id, on_event=on_event, cloud=False, kv_state=blob)
