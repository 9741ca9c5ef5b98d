"""The cloud-device handoff end to end, with real second processes: a real ``edgeserve serve`` on
loopback as the cloud (same model), one that is killed mid-stream, the fault-injecting upstream
(``_fault_upstream.py``) and a port nobody listens on.

The device is this process's engine. So that the cloud's tokens really reach the user before the
device takes over, the device is busy with another request when the handed-off one arrives (fcfs: its
prefill waits), as a device serving someone else would be; the cloud, a separate process, answers
meanwhile. Greedy sampling throughout: the handed-off text must equal the device-only text.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_fixtures import live_server, wait_for, wait_idle

from edgeserve.engine import Engine
from edgeserve.handoff import CloudTokenEvent, HandoffReport, Route
from edgeserve.server.app import create_app
from edgeserve.settings import CloudSettings, EngineSettings, ModelSettings
from edgeserve.types import FinalEvent, GenerationResult, TokenEvent

FAULT_UPSTREAM = Path(__file__).parent / "_fault_upstream.py"
#: Counting: every next token is far likelier than the runner-up, so the greedy text does not hinge on
#: the last bits of a float (a KV state restored or computed in other chunks gives the same text).
PROMPT = "Counting: " + ", ".join(str(i) for i in range(1, 80)) + ","
MAX_TOKENS = 160


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cloud:
    """``edgeserve serve`` in a child process: the same model, one thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "edgeserve", "serve", "--port", str(self.port), "--threads", "1"]
        cmd += ["--n-ctx", "2048", "--log-level", "warning", "--policy", "fcfs"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._up, timeout=120, what="the cloud server")

    def _up(self) -> bool:
        assert self.proc.poll() is None, "the cloud server exited"
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    server = Cloud()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def device() -> Iterator[Engine]:
    """The device engine; each test attaches the handoff it needs (``attach``). One sequence at a
    time, so that ``busy`` holds the device and the cloud answers first whatever the machine's load
    (with a batch, the handoff's own prefill ran beside it and sometimes won the race)."""
    model = ModelSettings(model="default", backend="llama", n_ctx=2048, threads=1, parallel=1)
    with Engine.from_settings(model, EngineSettings(policy="fcfs")) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(device: Engine) -> str:
    return device.generate(PROMPT, temperature=0, max_tokens=MAX_TOKENS).text


def attach(engine: Engine, url: str, **settings: Any) -> list[HandoffReport]:
    from edgeserve.handoff import Handoff

    options = {"handoff": "always", "kv_handoff": False, "cloud_first_token_timeout_s": 20.0, **settings}
    engine.handoff = Handoff(engine, CloudSettings(cloud=url, **options))
    reports: list[HandoffReport] = []
    engine.handoff.listeners.append(reports.append)
    return reports


def busy(engine: Engine) -> None:
    """Occupy the device for a while (a request of someone else's), so the cloud answers first."""
    engine.submit("Tell me a story about a dragon.", temperature=0, max_tokens=48, ignore_eos=True, cloud=False)


def run(engine: Engine, route: Route | None = Route.TOKEN, on_text: Any = None) -> tuple[GenerationResult, str]:
    """Submit PROMPT through the handoff; returns the result and the text as streamed, with the
    cloud's pieces in brackets."""
    assert engine.handoff is not None
    streamed = []
    result = None
    for event in engine.handoff.submit(PROMPT, temperature=0, max_tokens=MAX_TOKENS, route=route):
        if isinstance(event, FinalEvent):
            result = event.result
        elif isinstance(event, TokenEvent):
            cloud = isinstance(event, CloudTokenEvent)
            streamed.append(f"[{event.text}]" if cloud else event.text)
            if on_text is not None:
                on_text(event)
        else:
            raise AssertionError(f"unexpected {event}")
    assert result is not None
    return result, "".join(streamed)


def test_token_handoff_is_seamless_and_equals_the_device_only_text(
    device: Engine, cloud: Cloud, reference: str
) -> None:
    reports = attach(device, cloud.url)
    busy(device)
    result, streamed = run(device)
    report = reports[-1]
    assert result.text == reference
    assert streamed.replace("[", "").replace("]", "") == result.text  # nothing repeated, nothing lost
    assert report.route == "token" and report.taken_over_by == "local"
    assert report.cloud_tokens_kept > 0, "the cloud's tokens reached the user before the takeover"
    # The cloud was asked for a few tokens at a time and continued while the device was busy: the
    # seams between its answers are as invisible as the takeover.
    assert report.cloud_requests > 1
    assert streamed.startswith("["), "the first token came from the cloud"
    assert result.completion_tokens == MAX_TOKENS  # usage spans both halves
    assert not report.seam_diverged and report.cloud_error is None
    wait_idle(device)


def test_penalties_span_the_seam(device: Engine, cloud: Cloud) -> None:
    """The cloud applies the penalties to its part and the device's sampler counts the cloud's
    tokens in its history: greedy with penalties, the handed-off text is the device-only text."""
    penalties = {"temperature": 0, "max_tokens": 48, "repetition_penalty": 1.3, "presence_penalty": 0.4}
    alone = device.generate(PROMPT, cloud=False, **penalties).text
    assert alone != device.generate(PROMPT, cloud=False, temperature=0, max_tokens=48).text  # they bite
    reports = attach(device, cloud.url)
    assert device.handoff is not None
    busy(device)
    streamed = []
    result = None
    for event in device.handoff.submit(PROMPT, route=Route.TOKEN, **penalties):
        if isinstance(event, FinalEvent):
            result = event.result
        elif isinstance(event, TokenEvent):
            streamed.append(f"[{event.text}]" if isinstance(event, CloudTokenEvent) else event.text)
    assert result is not None and result.text == alone
    assert "".join(streamed).replace("[", "").replace("]", "") == alone
    assert reports[-1].route == "token" and reports[-1].cloud_tokens_kept > 0
    assert result.completion_tokens == 48
    wait_idle(device)


def test_cloud_killed_mid_stream_device_goes_on(device: Engine, reference: str) -> None:
    doomed = Cloud()
    reports = attach(device, doomed.url)

    def kill_on_first_cloud_token(event: TokenEvent) -> None:
        if isinstance(event, CloudTokenEvent):
            doomed.kill()

    busy(device)
    try:
        result, streamed = run(device, on_text=kill_on_first_cloud_token)
    finally:
        doomed.kill()
    assert result.text == reference
    assert streamed.startswith("["), "the cloud had started"
    assert reports[-1].cloud_error is not None
    wait_idle(device)


@pytest.mark.parametrize("mode", ["garbage_body", "headers_then_silence", "invalid_json", "kill"])
def test_faulty_cloud_device_goes_on(device: Engine, reference: str, mode: str) -> None:
    """The fault upstream is not this model: what it did say before dying ("kill": two words) stays
    shown, and the device continues from there; the other faults show nothing from it."""
    port = free_port()
    fault = subprocess.Popen([sys.executable, str(FAULT_UPSTREAM), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert fault.stdout is not None and fault.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/_mode", json={"mode": mode}, timeout=5).raise_for_status()
        reports = attach(device, url, cloud_first_token_timeout_s=2.0, cloud_chunk_timeout_s=1.0)
        result, streamed = run(device)
    finally:
        fault.kill()
        fault.wait(10)
    if mode == "kill":
        assert streamed.startswith("[Paris]") and streamed.replace("[", "").replace("]", "") == result.text
        assert result.text.startswith("Paris") and len(result.text) > len("Paris is")
        assert reports[-1].cloud_error is not None
        return
    assert result.text == reference and "[" not in streamed
    # A silent cloud is simply overtaken (closed at the takeover) if the device is ready first.
    assert reports[-1].cloud_error is not None or mode == "headers_then_silence"


def test_cloud_http_error_device_goes_on(device: Engine, cloud: Cloud, reference: str) -> None:
    reports = attach(device, cloud.url, cloud_model="no-such-model")  # the cloud answers 404
    result, streamed = run(device)
    assert result.text == reference and "[" not in streamed
    assert "404" in str(reports[-1].cloud_error)


def test_unreachable_cloud_device_goes_on(device: Engine, reference: str) -> None:
    reports = attach(device, f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result, streamed = run(device)
    assert result.text == reference and "[" not in streamed
    assert reports[-1].cloud_error is not None
    assert time.monotonic() - started < 60
    # The planner leaves a failed cloud alone for a while: the next request stays local.
    assert device.handoff is not None
    run(device, route=None)
    assert reports[-1].route == "local"


def test_kv_handoff_loads_the_clouds_state(device: Engine, cloud: Cloud, reference: str) -> None:
    reports = attach(device, cloud.url, kv_handoff=True)
    assert device.handoff is not None
    wait_for(lambda: device.handoff is not None and device.handoff.kv_fetcher is not None, what="the KV probe")
    busy(device)
    result, streamed = run(device, route=Route.KV)
    report = reports[-1]
    assert report.taken_over_by == "kv" and report.kv_wire_bytes > 0
    assert result.text == reference and "[" not in streamed
    wait_idle(device)


def test_server_privacy_switch_keeps_the_prompt_on_the_device(device: Engine, reference: str) -> None:
    port = free_port()
    fault = subprocess.Popen([sys.executable, str(FAULT_UPSTREAM), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert fault.stdout is not None and fault.stdout.readline().strip() == "ready"
        upstream = f"http://127.0.0.1:{port}"
        attach(device, upstream, cloud_first_token_timeout_s=2.0)
        body = {"model": "default", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}

        def cloud_saw_a_generation() -> bool:
            return bool(httpx.get(f"{upstream}/_stats", timeout=5).json()["headers"])

        with live_server(create_app(device)) as url:
            off = httpx.post(f"{url}/v1/completions", json=body, headers={"X-Edgeserve-Cloud": "off"}, timeout=120)
            assert off.status_code == 200 and off.json()["choices"][0]["text"] == reference
            off = httpx.post(f"{url}/v1/completions", json={**body, "cloud": False}, timeout=120)
            assert off.status_code == 200 and off.json()["choices"][0]["text"] == reference
            assert not cloud_saw_a_generation()  # neither reached the cloud
            on = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 4}, timeout=120)
            assert on.status_code == 200 and cloud_saw_a_generation()  # the control: this one did
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        fault.kill()
        fault.wait(10)
    assert 'edgeserve_handoff_requests_total{model="default",route="token"} 1.0' in metrics
    assert 'edgeserve_handoff_ttft_seconds_count{kind="actual",model="default",route="token"} 1.0' in metrics


def test_kv_wire_round_trip_quantized_keeps_the_greedy_text(device: Engine, reference: str) -> None:
    from edgeserve.errors import KVStateError
    from edgeserve.handoff import kvwire

    blob = device.export_state(PROMPT)
    assert kvwire.quantized(blob), "the llama.cpp state layout was parsed"
    wire = list(kvwire.encode(blob))
    assert sum(map(len, wire)) < len(blob) / 2  # int8 + per-token scales + zlib
    decoder = kvwire.Decoder()
    for chunk in wire:
        decoder.feed(chunk)
    restored = decoder.finish()
    assert len(restored) == len(blob) and restored != blob  # same layout, quantized values
    again = device.generate(PROMPT, temperature=0, max_tokens=MAX_TOKENS, cloud=False, kv_state=restored)
    assert again.text == reference
    cut = kvwire.Decoder()
    cut.feed(b"".join(wire)[: len(blob) // 8])
    with pytest.raises(KVStateError):
        cut.finish()


def test_cloud_killed_mid_kv_device_goes_on(device: Engine, reference: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeserve.handoff import kvwire

    doomed = Cloud()
    reports = attach(device, doomed.url, kv_handoff=True)
    wait_for(lambda: device.handoff is not None and device.handoff.kv_fetcher is not None, what="the KV probe")
    feed = kvwire.Decoder.feed

    def kill_after_first_chunk(self: kvwire.Decoder, chunk: bytes) -> None:
        feed(self, chunk)
        doomed.kill()  # the cloud dies with the KV state half sent

    monkeypatch.setattr(kvwire.Decoder, "feed", kill_after_first_chunk)
    try:
        result, _ = run(device, route=Route.KV)
    finally:
        doomed.kill()
    report = reports[-1]
    assert result.text == reference and report.taken_over_by == "local"
    assert report.kv_wire_bytes > 0


def test_planner_counts_device_work_that_bypasses_the_handoff(device: Engine, cloud: Cloud) -> None:
    attach(device, cloud.url)
    assert device.handoff is not None
    wait_idle(device, timeout=60)
    assert device.backlog_s() == 0
    before = device.handoff.plan_for(PROMPT).local_ttft_s
    # Someone else's request, straight to the engine (cloud=False): the handoff never sees it.
    handle = device.submit("Tell me a story about a dragon.", temperature=0, max_tokens=200, cloud=False)
    try:
        assert device.backlog_s() > 0
        assert device.handoff.plan_for(PROMPT).local_ttft_s > before
    finally:
        handle.cancel()
