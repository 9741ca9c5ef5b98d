"""The sidecar proxy against a real upstream process on loopback (``edgeserve serve --policy fcfs``
on the default model), driven with the official openai and ollama clients and raw httpx."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest
from server_fixtures import live_server, wait_for

from edgeserve.predictor import LengthPredictor
from edgeserve.proxy.app import create_proxy_app
from edgeserve.settings import ProxySettings

SHORT = "What is 2+2? Answer with one number."
LONG = "Write a detailed 2000-word essay on the history of the Roman Empire, with sections and examples."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def upstream(default_model_path: object) -> Iterator[str]:
    """A serial OpenAI + Ollama server in its own process: edgeserve's own, first come first served."""
    port = free_port()
    # One thread: llama.cpp's threads spin, and with both cores taken a busy test process slows the
    # upstream by an order of magnitude (seen in CI: a 60-token answer outlasting a 30 s wait).
    args = ["serve", "--port", str(port), "--policy", "fcfs", "--backend", "llama", "--n-ctx", "1024", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeserve", *args, "--log-level", "warning"],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the upstream exited: {proc.communicate()[1]}")
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{url}/health").status_code == 200
        return False

    try:
        wait_for(up, timeout=90, what="the upstream server")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return LengthPredictor.load()


@pytest.fixture(scope="module")
def proxy(upstream: str, predictor: LengthPredictor) -> Iterator[str]:
    settings = ProxySettings(upstream=upstream, policy="sjf", max_inflight=1, max_queue=3, aging_s=600)
    with live_server(create_proxy_app(settings, predictor=predictor), lifespan="on") as url:
        yield url


def queue_state(proxy: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{proxy}/queue").json()


def upstream_metric(upstream: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{upstream}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def blocker(proxy: str, tokens: int = 60) -> threading.Thread:
    """A long request holding the single upstream slot, so later ones queue."""
    body = {"model": "default", "prompt": "Go on:", "max_tokens": tokens, "ignore_eos": True}
    thread = threading.Thread(target=lambda: httpx.post(f"{proxy}/v1/completions", json=body, timeout=120))
    thread.start()
    wait_for(lambda: queue_state(proxy)["inflight"] == 1, what="the blocker to hold the slot")
    return thread


def test_openai_client_completion_and_stream_pass_through(proxy: str) -> None:
    client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="unused")
    done = client.completions.create(
        model="default", prompt="The capital of France is Paris. The capital of Germany is", max_tokens=6, temperature=0
    )
    assert "Berlin" in done.choices[0].text
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": SHORT}], max_tokens=4
    )
    assert raw.headers["x-queue-position"] == "0" and float(raw.headers["x-queue-wait-ms"]) >= 0
    # Admitted at once, it needed no prediction, and none was made on the way to its first token.
    assert "x-predicted-tokens" not in raw.headers
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Count slowly."}],
        max_tokens=48,
        extra_body={"ignore_eos": True},
        stream=True,
    )
    chunks = iter(stream)
    next(chunks)
    # The first chunk is here while the upstream is still generating: streamed through, not buffered.
    assert queue_state(proxy)["inflight"] == 1
    rest = list(chunks)
    assert len(rest) > 10 and rest[-1].choices[0].finish_reason == "length"


def test_ollama_client_chat_generate_stream_and_list(proxy: str) -> None:
    client = ollama.Client(host=proxy)
    reply = client.chat(model="default", messages=[{"role": "user", "content": SHORT}], options={"num_predict": 4})
    assert reply.done and reply.eval_count is not None and reply.eval_count <= 4
    parts = list(client.generate(model="default", prompt="Once upon a time", stream=True, options={"num_predict": 8}))
    assert parts[-1].done and sum(1 for p in parts if p.response) >= 2
    assert any(m.model for m in client.list().models)  # /api/tags passes straight through


def test_short_request_overtakes_a_long_one_queued_before_it(proxy: str) -> None:
    hold = blocker(proxy)
    finished: list[str] = []
    waits: dict[str, float] = {}

    positions: dict[str, str] = {}
    predicted: dict[str, float] = {}

    def ask(name: str, content: str) -> None:
        body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
        response = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200
        waits[name] = float(response.headers["x-queue-wait-ms"])
        positions[name] = response.headers["x-queue-position"]
        predicted[name] = float(response.headers["x-predicted-tokens"])
        finished.append(name)

    long = threading.Thread(target=ask, args=("long", LONG))
    long.start()
    wait_for(lambda: len(queue_state(proxy)["waiting"]) == 1, what="the long request to queue")
    short = threading.Thread(target=ask, args=("short", SHORT))
    short.start()
    wait_for(lambda: len(queue_state(proxy)["waiting"]) == 2, what="the short request to queue")
    waiting = queue_state(proxy)["waiting"]
    assert waiting[0]["predicted_tokens"] < waiting[1]["predicted_tokens"]
    assert all(set(w) == {"id", "position", "waited_ms", "predicted_tokens", "priority", "aged"} for w in waiting)
    for t in (hold, long, short):
        t.join(120)
    assert finished == ["short", "long"]
    assert waits["short"] < waits["long"]
    assert positions == {"long": "1", "short": "1"}  # each was next in line when it arrived
    assert predicted["short"] < predicted["long"]


@pytest.fixture(scope="module")
def priority_proxy(upstream: str, predictor: LengthPredictor) -> Iterator[str]:
    settings = ProxySettings(upstream=upstream, policy="priority", max_inflight=1, aging_s=600)
    with live_server(create_proxy_app(settings, predictor=predictor), lifespan="on") as url:
        yield url


def test_priority_header_goes_first_under_the_priority_policy(priority_proxy: str) -> None:
    proxy = priority_proxy
    hold = blocker(proxy)
    order: list[str] = []

    def ask(name: str, headers: dict[str, str]) -> None:
        body = {"model": "default", "messages": [{"role": "user", "content": SHORT}], "max_tokens": 2}
        httpx.post(f"{proxy}/v1/chat/completions", json=body, headers=headers, timeout=120)
        order.append(name)

    normal = threading.Thread(target=ask, args=("normal", {}))
    normal.start()
    wait_for(lambda: len(queue_state(proxy)["waiting"]) == 1, what="the first to queue")
    urgent = threading.Thread(target=ask, args=("urgent", {"X-Priority": "-5"}))
    urgent.start()
    wait_for(lambda: len(queue_state(proxy)["waiting"]) == 2, what="the second to queue")
    for t in (hold, normal, urgent):
        t.join(120)
    assert order == ["urgent", "normal"]


def test_client_leaving_the_queue_is_dropped(proxy: str) -> None:
    hold = blocker(proxy, tokens=300)
    body = json.dumps({"model": "default", "prompt": "Hello", "max_tokens": 4}).encode()
    host, port = proxy.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: len(queue_state(proxy)["waiting"]) == 1, what="the request to queue")
    sock.close()  # the client hangs up while waiting
    wait_for(lambda: not queue_state(proxy)["waiting"], what="the proxy to drop it")
    # Dropped, not served: the 300-token request ahead of it is still running.
    assert hold.is_alive() and queue_state(proxy)["inflight"] == 1
    metrics = httpx.get(f"{proxy}/metrics").text
    assert re.search(
        r'edgeserve_proxy_requests_total\{length_class="\w+",outcome="cancelled",policy="sjf"\} [1-9]', metrics
    )
    hold.join(120)


def test_client_leaving_mid_stream_closes_the_upstream_request(proxy: str, upstream: str) -> None:
    before = upstream_metric(upstream, "edgeserve_requests_total", outcome="cancelled")
    body = {"model": "default", "prompt": "Go on:", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as client, client.stream("POST", f"{proxy}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data:"):
            pass
    # Hung up after the first event: the upstream counts a cancelled request, long before 900 tokens.
    wait_for(
        lambda: upstream_metric(upstream, "edgeserve_requests_total", outcome="cancelled") > before,
        what="the upstream request to be cancelled",
    )
    wait_for(lambda: queue_state(proxy)["inflight"] == 0, what="the slot to be freed")
    generated = upstream_metric(upstream, "edgeserve_generation_tokens_total")
    assert generated < 900 * 8  # nowhere near another 900 tokens on top of the earlier tests


def test_full_queue_answers_429_with_retry_after(proxy: str) -> None:
    hold = blocker(proxy, tokens=80)
    body = {"model": "default", "prompt": "x", "max_tokens": 2}
    waiters = [
        threading.Thread(target=lambda: httpx.post(f"{proxy}/v1/completions", json=body, timeout=120)) for _ in range(3)
    ]
    for t in waiters:
        t.start()
    wait_for(lambda: len(queue_state(proxy)["waiting"]) == 3, what="the queue to fill")
    refused = httpx.post(f"{proxy}/v1/completions", json=body)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    refused_ollama = httpx.post(f"{proxy}/api/generate", json={"model": "default", "prompt": "x"})
    assert refused_ollama.status_code == 429 and "error" in refused_ollama.json()
    for t in (hold, *waiters):
        t.join(120)


@pytest.mark.parametrize(
    ("path", "content", "headers", "needle"),
    [
        ("/v1/chat/completions", b"{not json", {}, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", {}, "JSON object"),
        ("/v1/completions", json.dumps({"prompt": "x", "priority": "high"}).encode(), {}, "priority"),
        ("/v1/completions", json.dumps({"prompt": "x", "service_tier": "gold"}).encode(), {}, "service_tier"),
        ("/api/chat", json.dumps({"messages": []}).encode(), {"X-Priority": "soon"}, "x-priority"),
        ("/v1/completions", b"[" * 200_000, {}, "nests too deeply"),
    ],
)
def test_bad_requests_are_answered_by_the_proxy_at_once(
    proxy: str, path: str, content: bytes, headers: dict[str, str], needle: str
) -> None:
    response = httpx.post(f"{proxy}{path}", content=content, headers={"content-type": "application/json", **headers})
    assert response.status_code == 400
    message = response.json()["error"]
    message = message if isinstance(message, str) else message["message"]
    assert needle in message


def test_other_routes_pass_through(proxy: str) -> None:
    models = httpx.get(f"{proxy}/v1/models").json()
    assert models["data"][0]["id"]
    assert httpx.get(f"{proxy}/api/version").json()["version"]
    metrics = httpx.get(f"{proxy}/metrics").text
    assert re.search(r'edgeserve_proxy_requests_total\{length_class="short",outcome="ok",policy="sjf"\}', metrics)
    assert "edgeserve_proxy_queue_wait_seconds_bucket" in metrics


def test_dead_upstream_gives_502_and_the_proxy_stays_up(predictor: LengthPredictor) -> None:
    settings = ProxySettings(upstream=f"http://127.0.0.1:{free_port()}", max_queue=2)
    with live_server(create_proxy_app(settings, predictor=predictor), lifespan="on") as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for path in ("/v1/chat/completions", "/api/chat"):
            response = httpx.post(f"{url}{path}", json=body)
            assert response.status_code == 502
            assert "unreachable" in json.dumps(response.json())
        assert httpx.get(f"{url}/v1/models").status_code == 502  # pass-through too
        health = httpx.get(f"{url}/health", timeout=20)  # up itself, and saying its upstream is not
        assert health.status_code == 503 and "unreachable" in health.json()["reason"]
        assert queue_state(url)["inflight"] == 0


def test_proxy_command_rejects_a_bad_upstream_in_one_line() -> None:
    from click.testing import CliRunner

    from edgeserve.cli import main

    result = CliRunner().invoke(main, ["proxy", "--upstream", "localhost:11434"])
    assert result.exit_code == 2
    assert "must be an http:// or https:// URL" in result.output and "Traceback" not in result.output
    # The log level is a setting like serve's (a sidecar often runs quieter than one line a request).
    result = CliRunner().invoke(main, ["proxy", "--log-level", "loud"])
    assert result.exit_code == 2 and "warning" in result.output


def test_other_routes_bodies_pass_through_uncapped_and_untouched(upstream: str, predictor: LengthPredictor) -> None:
    settings = ProxySettings(upstream=upstream, max_body_bytes=2048)
    with live_server(create_proxy_app(settings, predictor=predictor), lifespan="on") as url:
        # A generation body over the proxy's cap is refused by the proxy itself ...
        big = {"model": "default", "prompt": "x" * 4096}
        assert httpx.post(f"{url}/v1/completions", json=big).status_code == 413
        # ... while another route's larger, non-JSON body goes upstream as sent (the upstream answers
        # 404 for a route it lacks, in its own words: the proxy neither capped nor rewrote it).
        upload = b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\n" + b"a" * 8192 + b"\r\n--b--\r\n"
        direct = httpx.post(
            f"{upstream}/v1/audio/transcriptions",
            content=upload,
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        proxied = httpx.post(
            f"{url}/v1/audio/transcriptions",
            content=upload,
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert proxied.status_code == direct.status_code != 413
        assert proxied.json() == direct.json()


def test_silent_upstream_gives_504(predictor: LengthPredictor) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        upstream = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = ProxySettings(upstream=upstream, first_byte_timeout_s=0.5)
        with live_server(create_proxy_app(settings, predictor=predictor), lifespan="on") as url:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
            assert response.status_code == 504 and "did not answer in time" in response.json()["error"]["message"]
            assert queue_state(url)["inflight"] == 0
