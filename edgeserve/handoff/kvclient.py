"""The device's side of a KV handoff: check that the cloud is an edgeserve on the very same model file
(SHA-256) and backend, then fetch a prompt's KV state from it, decoding chunks as they arrive.

A failure at any point (refused, cut mid-stream, corrupt, another model) becomes a ``KvArrived``
without a blob: the device's own prefill, which started at the same moment, goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from edgeserve.errors import EdgeserveError
from edgeserve.handoff.kvwire import Decoder, file_sha256
from edgeserve.handoff.session import KvArrived, KvStarted, KvStarter
from edgeserve.handoff.telemetry import Telemetry
from edgeserve.settings import CloudSettings

log = logging.getLogger("edgeserve.handoff")
KV_PATH = "/v1/edgeserve/kv"


def _headers(settings: CloudSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.cloud_api_key}"} if settings.cloud_api_key else {}


def probe(settings: CloudSettings, backend: str, model_file: Path | None, telemetry: Telemetry) -> bool:
    """Whether the cloud can send KV states this device can load; measures the round trip too."""
    if model_file is None or settings.cloud is None:
        return False
    try:
        with httpx.Client(timeout=settings.cloud_first_token_timeout_s) as client:
            response = client.get(f"{settings.cloud}{KV_PATH}", headers=_headers(settings))
            if response.status_code != 200:
                return False
            info = response.json()
            # The round trip from a second ask: the first one includes the cloud's first digest of
            # the model file (a second or more), which is no part of any later request.
            started = time.monotonic()
            client.get(f"{settings.cloud}{KV_PATH}", headers=_headers(settings))
            telemetry.rtt(time.monotonic() - started)
    except (httpx.HTTPError, ValueError) as exc:
        log.info("cloud KV probe failed: %s", exc)
        return False
    same = info.get("backend") == backend and info.get("kv_state") and info.get("sha256") == file_sha256(model_file)
    log.info("cloud KV handoff %s", "available" if same else "unavailable (another model or backend)")
    return bool(same)


def fetcher(
    settings: CloudSettings, telemetry: Telemetry, quantize: bool = True
) -> Callable[[Sequence[int], bool], KvStarter]:
    """A function that, given a request's tokens and whether the cloud streams its answer beside
    the KV state (token+kv), returns the starter of its KV fetch."""

    def for_tokens(tokens: Sequence[int], beside_answer: bool) -> KvStarter:
        def start(deliver: Callable[[KvStarted | KvArrived], None]) -> Callable[[], None]:
            fetch = _Fetch(settings, telemetry, list(tokens), quantize, deliver, beside_answer)
            return fetch.close

        return start

    return for_tokens


class _Fetch:
    def __init__(
        self,
        settings: CloudSettings,
        telemetry: Telemetry,
        tokens: list[int],
        quantize: bool,
        deliver: Callable[[KvStarted | KvArrived], None],
        beside_answer: bool,
    ) -> None:
        self._settings, self._telemetry, self._beside_answer = settings, telemetry, beside_answer
        self._tokens, self._quantize, self._deliver = tokens, quantize, deliver
        self._closed = threading.Event()
        self._decoder = Decoder()
        threading.Thread(target=self._run, name="edgeserve-kv", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        settings = self._settings
        timeout = httpx.Timeout(
            connect=settings.cloud_connect_timeout_s,
            read=settings.cloud_first_token_timeout_s,
            write=settings.cloud_connect_timeout_s,
            pool=settings.cloud_connect_timeout_s,
        )
        body = {"tokens": self._tokens, "quantize": self._quantize}
        first: float | None = None
        sent = time.monotonic()
        try:
            with (
                httpx.Client(timeout=timeout) as client,
                client.stream("POST", f"{settings.cloud}{KV_PATH}", json=body, headers=_headers(settings)) as response,
            ):
                if response.status_code != 200:
                    raise EdgeserveError(f"the cloud answered HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    if self._closed.is_set():
                        return
                    if first is None:  # the cloud's prefill is done: that measures its rate too
                        first = time.monotonic()
                        self._telemetry.kv_first_bytes(len(self._tokens), first - sent)
                        self._deliver(KvStarted())
                    self._decoder.feed(chunk)
            blob = self._decoder.finish()
        except (httpx.HTTPError, OSError, EdgeserveError) as exc:
            if not self._closed.is_set():
                self._telemetry.cloud_failed()
                self._deliver(KvArrived(None, self._decoder.wire_bytes, f"{type(exc).__name__}: {exc}"))
            return
        if first is not None:
            seconds = time.monotonic() - first
            wire = self._decoder.wire_bytes
            self._telemetry.kv_transfer(len(self._tokens), wire, seconds, beside_answer=self._beside_answer)
        if not self._closed.is_set():
            self._deliver(KvArrived(blob, self._decoder.wire_bytes))
