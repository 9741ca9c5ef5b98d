"""Helpers for the server tests: a live uvicorn server on a loopback port, and a backend double that
fails mid-generation (the real model never fails on cue)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import uvicorn
from starlette.types import ASGIApp

from edgeserve.engine import Engine
from edgeserve.types import Capabilities, SamplingParams


@contextmanager
def live_server(app: ASGIApp, *, lifespan: Literal["on", "off"] = "off") -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 on a free port from a background thread; yields the base URL.
    ``lifespan="on"`` runs the app's startup and shutdown (the proxy closes its upstream pool there)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(condition: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    wait_for(lambda: not engine.busy and engine.queue_depth == 0, timeout=timeout, what="the engine to go idle")


class DecodeCounter:
    """Wraps a backend's ``decode`` to count the tokens the model really produced: the proof that a
    cancelled request stopped early, whatever the machine's speed."""

    def __init__(self, decode: Callable[[SamplingParams], Iterator[int]]) -> None:
        self._decode = decode
        self.tokens = 0
        #: Requests that reached the model (one decode per request run).
        self.runs = 0

    def __call__(self, params: SamplingParams) -> Iterator[int]:
        self.runs += 1
        steps = self._decode(params)
        try:
            for token in steps:
                self.tokens += 1
                yield token
        finally:
            steps.close()  # type: ignore[attr-defined]


class FailingBackend:
    """Bytes as tokens; ``decode`` yields ``good_tokens`` letters, then fails like a lost device."""

    def __init__(self, good_tokens: int = 3) -> None:
        self.good_tokens = good_tokens

    def capabilities(self) -> Capabilities:
        return Capabilities(
            backend="fake", model="failing", n_ctx=256, n_vocab=258, eog_token_ids=frozenset({257}), bos_token_id=256
        )

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return ([256] if add_bos else []) + list(text.encode())

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return bytes(t for t in tokens if t < 256)

    def prefill(self, prompt: Sequence[int], *, reuse: bool = True) -> int:
        return 0

    def decode(self, params: SamplingParams) -> Iterator[int]:
        yield from [ord("a")] * self.good_tokens
        raise RuntimeError("device lost")

    def export_state(self) -> bytes:
        return b""

    def import_state(self, blob: bytes) -> list[int]:
        return []

    def close(self) -> None:
        pass
