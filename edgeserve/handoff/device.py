"""The device's two moves in a handoff, over the engine's API:

- ``start_prefill``: prefill the prompt (all but its last token) as a scheduled, cancellable job
  that yields the sequence's KV blob (``Engine.prefill_state``);
- ``continue_from``: run the request from a KV blob (``Engine.submit(..., kv_state=blob)``) with
  the cloud's covered tokens appended to the prompt.

Where the engine predates those (``prefill_state``/``kv_state``), the same moves go through
``export_state`` on a worker thread and ``import_state`` + a prefix-cache hit: slower to cancel, the
same text.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgeserve.engine import Engine, Handle
from edgeserve.types import SamplingParams, StreamEvent


class PrefillJob(Protocol):
    @property
    def future(self) -> concurrent.futures.Future[bytes]: ...

    def cancel(self) -> None: ...


@dataclass
class _ThreadJob:
    future: concurrent.futures.Future[bytes]

    def cancel(self) -> None:
        self.future.cancel()  # a running export finishes; nobody reads its blob


def start_prefill(engine: Engine, tokens: Sequence[int]) -> PrefillJob:
    native = getattr(engine, "prefill_state", None)
    if native is not None:
        job: PrefillJob = native(list(tokens))
        return job
    future: concurrent.futures.Future[bytes] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(engine.export_state(list(tokens)))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="edgeserve-prefill", daemon=True).start()
    return _ThreadJob(future)


def supports_kv_state(engine: Engine) -> bool:
    return hasattr(engine, "prefill_state")


def continue_from(
    engine: Engine,
    tokens: Sequence[int],
    params: SamplingParams,
    blob: bytes | None,
    on_event: Callable[[StreamEvent], None],
    request_id: str,
) -> Handle:
    """Submit the device's part; bypasses the handoff (``cloud=False``) so it cannot recurse."""
    kwargs: dict[str, Any] = {"request_id": request_id, "on_event": on_event}
    if _has_cloud_switch(engine):
        kwargs["cloud"] = False
    if blob is not None and supports_kv_state(engine):
        kwargs["kv_state"] = blob
    elif blob is not None:
        engine.import_state(blob)  # the prefix cache: the request below evaluates only the rest
    handle: Handle = engine.submit(list(tokens), params, **kwargs)
    return handle


def _has_cloud_switch(engine: Engine) -> bool:
    return getattr(engine, "handoff", None) is not None
