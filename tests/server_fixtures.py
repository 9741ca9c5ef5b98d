"""Helpers for the server tests: a live uvicorn server on a loopback port, and a counter of the work a
backend really did."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import pytest
import uvicorn
from starlette.types import ASGIApp

from edgeserve.backend import Backend, SeqId, Step
from edgeserve.engine import Engine
from edgeserve.scripted import ScriptedBackend
from edgeserve.server.listen import uvicorn_options
from edgeserve.settings import ServerSettings


@contextmanager
def live_server(
    app: ASGIApp, *, lifespan: Literal["on", "off"] = "off", settings: ServerSettings | None = None
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 on a free port from a background thread; yields the base URL.
    ``lifespan="on"`` runs the app's startup and shutdown (the proxy closes its upstream pool there).
    ``settings``: serve with ``edgeserve serve``'s uvicorn options (its timeouts and limits)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = uvicorn_options(settings) if settings is not None else {}
    config = uvicorn.Config(app, **{**options, "log_level": "warning", "lifespan": lifespan})
    server = uvicorn.Server(config)
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
    """Wraps a backend's ``open`` and ``decode`` to count the requests that reached the model and the
    tokens it really produced: the proof that a cancelled request stopped early, whatever the
    machine's speed. Install with ``counter.install(backend, monkeypatch)``."""

    def __init__(self, backend: Backend) -> None:
        self._open = backend.open
        self._decode = backend.decode
        self.tokens = 0
        #: Requests that reached the model (one ``open`` per request run).
        self.runs = 0

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        self.runs += 1
        return self._open(seq, prompt, reuse=reuse)

    def decode(self, steps: Sequence[Step]) -> list[int]:
        out = self._decode(steps)
        self.tokens += len(out)
        return out

    def install(self, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> DecodeCounter:
        monkeypatch.setattr(backend, "open", self.open)
        monkeypatch.setattr(backend, "decode", self.decode)
        return self


class FailingBackend(ScriptedBackend):
    """The scripted double, failing each request on its fourth decode step like a lost device (the
    real model never fails on cue): three letters come out, then the error."""

    def __init__(self) -> None:
        super().__init__()
        self._steps: dict[SeqId, int] = {}

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        self._steps[seq] = 0
        return super().open(seq, prompt, reuse=reuse)

    def decode(self, steps: Sequence[Step]) -> list[int]:
        for step in steps:
            self._steps[step.seq] = self._steps.get(step.seq, 0) + 1
            if self._steps[step.seq] > 3:
                raise RuntimeError("device lost")
        return super().decode(steps)
