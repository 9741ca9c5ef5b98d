"""The proxy in front of a failing upstream: a real second process (``_fault_upstream.py``) that is
killed mid-stream, falls silent, sends garbage or malformed answers, or drops keep-alive
connections. The assertions are on what the official openai and ollama SDKs do: raise, never
return a truncated answer as if it were complete. And the proxy recovers when the upstream does."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from server_fixtures import live_server, wait_for

from edgeserve.errors import EdgeserveError, UpstreamError, UpstreamTimeout
from edgeserve.predictor import LengthPredictor
from edgeserve.proxy.app import create_proxy_app
from edgeserve.settings import ProxySettings

FAULT_UPSTREAM = Path(__file__).parent / "_fault_upstream.py"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
JSON = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultUpstream:
    """The fault-injecting upstream process, restartable on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FAULT_UPSTREAM), str(self.port)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def mode(self, mode: str, **options: Any) -> None:
        httpx.post(f"{self.url}/_mode", json={"mode": mode, **options}, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/_stats", timeout=5).json()
        return stats


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream()
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def up(fault: FaultUpstream) -> Iterator[FaultUpstream]:
    """The upstream running and well-behaved at the start of each test (a test may kill it)."""
    if fault.proc is None or fault.proc.poll() is not None:
        fault.start()
    fault.mode("ok")
    yield fault


def fault_settings(upstream: str, **overrides: Any) -> ProxySettings:
    defaults = {"max_inflight": 1, "connect_timeout_s": 2.0, "first_byte_timeout_s": 1.0, "chunk_timeout_s": 1.0}
    return ProxySettings(upstream=upstream, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def proxy(fault: FaultUpstream) -> Iterator[str]:
    with live_server(create_proxy_app(fault_settings(fault.url)), lifespan="on") as url:
        yield url


def openai_client(proxy: str) -> openai.OpenAI:
    # No retries: the SDK would otherwise retry a 502/504 twice and hide what the proxy answered.
    return openai.OpenAI(base_url=f"{proxy}/v1", api_key="client-key", max_retries=0, timeout=20)


def openai_stream(proxy: str) -> str:
    stream = openai_client(proxy).chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def openai_whole(proxy: str) -> str:
    done = openai_client(proxy).chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    return done.choices[0].message.content or ""


def ollama_stream(proxy: str) -> str:
    parts = ollama.Client(host=proxy, timeout=20).chat(model="m", messages=MESSAGES, stream=True)
    return "".join(p.message.content or "" for p in parts)


def ollama_whole(proxy: str) -> str:
    return ollama.Client(host=proxy, timeout=20).chat(model="m", messages=MESSAGES).message.content or ""


CLIENTS: dict[str, Callable[[str], str]] = {
    "openai-stream": openai_stream,
    "openai-whole": openai_whole,
    "ollama-stream": ollama_stream,
    "ollama-whole": ollama_whole,
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_a_well_behaved_upstream_answers_through_every_client(up: FaultUpstream, proxy: str, client: str) -> None:
    assert CLIENTS[client](proxy) == "Paris is the capital."


#: Faults and what each client must raise: (exception type, status where the head was not sent yet).
FAULTS = ["kill", "silent", "headers_then_silence", "garbage", "garbage_body", "invalid_json", "no_end"]


def expected(client: str, mode: str) -> tuple[type[Exception], int | None]:
    before_head = {"silent": 504, "garbage": 502}
    whole = client.endswith("whole")
    status = before_head.get(mode)
    if whole and status is None:  # a non-streamed answer is checked before its head goes out
        status = 504 if mode == "headers_then_silence" else 502
    if client.startswith("openai"):
        return (openai.APIStatusError if status else openai.APIError), status
    return ollama.ResponseError, status


STREAM_ONLY = ("garbage_body", "no_end")


@pytest.mark.parametrize(
    ("client", "mode"),
    [(c, m) for c in sorted(CLIENTS) for m in FAULTS if not (c.endswith("whole") and m in STREAM_ONLY)],
)
def test_every_fault_makes_the_official_clients_raise(up: FaultUpstream, proxy: str, client: str, mode: str) -> None:
    error, status = expected(client, mode)
    up.mode(mode)
    with pytest.raises(error) as raised:
        CLIENTS[client](proxy)
    exc = raised.value
    if status is not None:
        assert getattr(exc, "status_code", None) == status
    message = str(exc)
    assert "upstream" in message, message
    # The proxy is still up, its slot free, and it serves again once the upstream does.
    if mode == "kill":
        wait_for(lambda: up.proc is not None and up.proc.poll() is not None, what="the upstream to die")
        up.start()
    up.mode("ok")
    wait_for(lambda: httpx.get(f"{proxy}/queue").json()["inflight"] == 0, what="the slot to be freed")
    assert CLIENTS[client](proxy) == "Paris is the capital."


def test_health_reports_a_dead_or_hung_upstream_and_recovers(up: FaultUpstream) -> None:
    with live_server(create_proxy_app(fault_settings(up.url)), lifespan="on") as proxy:
        assert httpx.get(f"{proxy}/health").status_code == 200
        up.mode("silent")
        with pytest.raises(openai.APIStatusError):
            openai_whole(proxy)
        sick = httpx.get(f"{proxy}/health", timeout=20)
        assert sick.status_code == 503 and sick.json()["status"] == "upstream_failing"
        assert "1 s" in sick.json()["reason"]
        up.mode("ok")
        assert openai_whole(proxy)
        assert httpx.get(f"{proxy}/health").status_code == 200
        # Dead and idle: no request needed, the probe finds it; and it comes back without traffic.
        up.stop()
        wait_for(lambda: httpx.get(f"{proxy}/health", timeout=20).status_code == 503, timeout=20, what="a 503")
        assert "unreachable" in httpx.get(f"{proxy}/health", timeout=20).json()["reason"]
        up.start()
        wait_for(lambda: httpx.get(f"{proxy}/health", timeout=20).status_code == 200, timeout=20, what="a 200")


def test_upstream_credentials_go_upstream_once_and_are_never_shown(
    up: FaultUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-pass"
    with_creds = up.url.replace("http://", f"http://alice:{secret}@")
    caplog.set_level(logging.INFO, logger="edgeserve.proxy")
    with live_server(create_proxy_app(fault_settings(with_creds)), lifespan="on") as proxy:
        # The OpenAI SDK always sends its own Authorization: the URL's credentials replace it.
        assert openai_whole(proxy) == "Paris is the capital."
        assert up.stats()["authorization"] == "Basic YWxpY2U6czNjcjN0LXBhc3M="  # alice:s3cr3t-pass
        health = httpx.get(f"{proxy}/health")
        assert secret not in health.text and "alice" not in health.text and "***@" in health.text
    dead = f"http://alice:{secret}@127.0.0.1:{free_port()}"
    with live_server(create_proxy_app(fault_settings(dead)), lifespan="on") as proxy:
        refused = httpx.post(f"{proxy}/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert refused.status_code == 502 and secret not in refused.text and "***@" in refused.text
        assert httpx.get(f"{proxy}/v1/models").status_code == 502
        health = httpx.get(f"{proxy}/health", timeout=20)
        assert health.status_code == 503 and secret not in health.text
    assert secret not in caplog.text
    # An upstream key replaces the client's; with neither, the client's own passes through.
    with live_server(create_proxy_app(fault_settings(up.url, upstream_api_key="up-key")), lifespan="on") as proxy:
        openai_whole(proxy)
        assert up.stats()["authorization"] == "Bearer up-key"
    with live_server(create_proxy_app(fault_settings(up.url)), lifespan="on") as proxy:
        openai_whole(proxy)
        assert up.stats()["authorization"] == "Bearer client-key"
    with pytest.raises(ValueError, match="credentials once") as bad:
        ProxySettings(upstream=with_creds, upstream_api_key="k")
    assert secret not in str(bad.value)


def burst(proxy: str, n: int) -> list[int]:
    statuses: list[int] = []

    def ask() -> None:
        body = {"model": "m", "messages": MESSAGES}
        statuses.append(httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=30).status_code)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


def proxy_metric(proxy: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{proxy}/metrics").text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("announce", [False, True])
def test_connections_the_upstream_drops_lose_no_request(up: FaultUpstream, announce: bool) -> None:
    """Issue 19, defect 10: an upstream that closes each connection after 2 requests. Unannounced,
    the requests it drops are retried on a new connection; announced (Keep-Alive: max), the proxy
    stops reusing the connection first and nothing is dropped at all."""
    up.mode("ok", close_after=2, announce=announce, delay=0.002)
    dropped_before = up.stats()["dropped"]
    with live_server(create_proxy_app(fault_settings(up.url, max_inflight=4)), lifespan="on") as proxy:
        assert burst(proxy, 24) == [200] * 24
        retries = proxy_metric(proxy, "edgeserve_proxy_upstream_retries_total")
    dropped = up.stats()["dropped"] - dropped_before
    if announce:
        assert dropped == 0 and retries == 0
    else:
        assert dropped > 0 and retries == dropped


def test_relayed_headers_follow_rfc_9110(up: FaultUpstream, proxy: str) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    hop = {"Connection": "keep-alive, x-hop", "X-Hop": "1"}
    with httpx.stream("POST", f"{proxy}/v1/chat/completions", json=body, headers=hop) as r:
        r.read()
    assert len(r.headers.get_list("date")) == 1 and len(r.headers.get_list("server")) == 1
    assert r.headers["server"] != "fault-upstream" and "edgeserve-proxy" in r.headers["via"]
    sent = up.stats()["headers"]
    assert "edgeserve-proxy" in sent["via"] and "x-hop" not in sent


def test_rejected_requests_are_counted(up: FaultUpstream) -> None:
    settings = fault_settings(up.url, max_body_bytes=2048)
    with live_server(create_proxy_app(settings), lifespan="on") as proxy:
        bad = httpx.post(
            f"{proxy}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        big = httpx.post(f"{proxy}/api/generate", json={"model": "m", "prompt": "x" * 4096})
        assert big.status_code == 413
        assert proxy_metric(proxy, "edgeserve_proxy_requests_total", outcome="invalid_request") == 1
        assert proxy_metric(proxy, "edgeserve_proxy_requests_total", outcome="http_413") == 1


def test_a_lone_surrogate_is_served_and_counted_queued_or_not(up: FaultUpstream) -> None:
    """Issue 19, defect 3: the length predictor takes any string."""
    up.mode("ok", delay=0.2)
    app = create_proxy_app(fault_settings(up.url, first_byte_timeout_s=10), predictor=LengthPredictor.load())
    with live_server(app, lifespan="on") as proxy:
        body = {"model": "m", "messages": [{"role": "user", "content": "a\ud800 what?"}]}
        content = json.dumps(body).encode()  # "\ud800" escaped: a JSON body any client can send
        statuses: list[int] = []

        def ask() -> None:
            r = httpx.post(
                f"{proxy}/v1/chat/completions", content=content, headers={"content-type": "application/json"}
            )
            statuses.append(r.status_code)

        first = threading.Thread(target=ask)
        first.start()  # straight through
        wait_for(lambda: httpx.get(f"{proxy}/queue").json()["inflight"] == 1, what="the first to go upstream")
        second = threading.Thread(target=ask)
        second.start()  # queued, so predicted on the way
        wait_for(lambda: len(httpx.get(f"{proxy}/queue").json()["waiting"]) == 1, what="the second to queue")
        for t in (first, second):
            t.join(30)
        assert statuses == [200, 200]
        assert proxy_metric(proxy, "edgeserve_proxy_requests_total", outcome="ok") == 2


@dataclass(frozen=True)
class Fixed:
    expected_tokens: float = 50.0
    length_class: str = "short"


class SameAnswerLength:
    """A length predictor double that predicts every answer alike: only the prompt differs."""

    def predict(self, prompt: object) -> Fixed:
        return Fixed()


def test_sjf_orders_by_service_time_so_a_long_prompt_waits(up: FaultUpstream) -> None:
    """Issue 12: the proxy's sjf orders by predicted service time. Two requests predicted to answer
    alike: the one whose prompt takes ~10k tokens to prefill runs after the short one, though it came
    first (answer length alone would tie them, and the tie goes to arrival)."""
    up.mode("ok", delay=0.3)
    app = create_proxy_app(fault_settings(up.url, first_byte_timeout_s=10), predictor=SameAnswerLength())
    with live_server(app, lifespan="on") as proxy:
        order: list[str] = []

        def ask(name: str, content: str) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": content}], "stream": True}
            with httpx.stream("POST", f"{proxy}/v1/chat/completions", json=body, timeout=30) as r:
                r.read()
            order.append(name)

        threads = [
            threading.Thread(target=ask, args=("holder", "hold the slot")),
            threading.Thread(target=ask, args=("long-prompt", "history " * 5000)),
            threading.Thread(target=ask, args=("short-prompt", "and now?")),
        ]
        threads[0].start()
        wait_for(lambda: httpx.get(f"{proxy}/queue").json()["inflight"] == 1, what="the holder")
        threads[1].start()
        wait_for(lambda: len(httpx.get(f"{proxy}/queue").json()["waiting"]) == 1, what="the long prompt to queue")
        threads[2].start()
        wait_for(lambda: len(httpx.get(f"{proxy}/queue").json()["waiting"]) == 2, what="the short one to queue")
        for t in threads:
            t.join(60)
        assert order == ["holder", "short-prompt", "long-prompt"]


def test_the_service_model_learns_the_upstreams_own_timings(up: FaultUpstream) -> None:
    """The rates that order sjf are the upstream's: Ollama reports its prefill and decode durations."""
    app = create_proxy_app(fault_settings(up.url))
    with live_server(app, lifespan="on") as proxy:
        assert ollama_whole(proxy) == "Paris is the capital."
    service = app.app.state.proxy.service
    assert service.prefill_tok_s == pytest.approx(300) and service.decode_tok_s == pytest.approx(100)


def test_upstream_errors_are_in_the_one_error_tree() -> None:
    assert issubclass(UpstreamTimeout, UpstreamError) and issubclass(UpstreamError, EdgeserveError)
    assert (UpstreamError("x").http_status, UpstreamTimeout("x").http_status) == (502, 504)
    from edgeserve import errors

    assert re.search(r"UpstreamError .*\(502\)", errors.__doc__ or "")


def test_stream_check_relays_whole_events_only_and_knows_a_finished_stream() -> None:
    from edgeserve.proxy.relay import BadStream, Framing, StreamCheck, error_event

    sse = StreamCheck(Framing.SSE)
    assert sse.feed(b'data: {"a": 1}\n\ndata: {"b"') == b'data: {"a": 1}\n\n'  # the partial event waits
    assert sse.feed(b": 2}\r\n\r\n: keep-alive\r\n\r\n") == b'data: {"b": 2}\r\n\r\n: keep-alive\r\n\r\n'
    assert sse.unfinished() is not None and "[DONE]" in (sse.unfinished() or "")
    sse.feed(b"data: [DONE]\n\n")
    assert sse.unfinished() is None
    with pytest.raises(BadStream):
        StreamCheck(Framing.SSE).feed(b"garbage line\n\n")
    with pytest.raises(BadStream):
        StreamCheck(Framing.NDJSON).feed(b"[1, 2]\n")
    nd = StreamCheck(Framing.NDJSON)
    nd.feed(b'{"done": false}\n{"done": tr')
    assert nd.unfinished() == "the stream broke off inside an event"
    nd.feed(b"ue}\n")
    assert nd.unfinished() is None
    assert json.loads(error_event("/api/chat", Framing.NDJSON, "boom")) == {"error": "boom"}
    event = error_event("/v1/completions", Framing.SSE, "boom")
    assert event.startswith(b"data: ") and json.loads(event[6:])["error"]["message"] == "boom"


def test_the_proxy_refuses_rebound_hosts_foreign_pages_and_non_json_bodies(up: FaultUpstream) -> None:
    """Issue 19, defect 6, for the proxy too: with no key, a web page must not drive the upstream."""
    with live_server(create_proxy_app(fault_settings(up.url)), lifespan="on") as proxy:
        body = {"model": "m", "messages": MESSAGES}
        rebound = httpx.post(f"{proxy}/v1/chat/completions", json=body, headers={"Host": "attacker.example"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden_origin"
        assert httpx.get(f"{proxy}/v1/models", headers={"Host": "attacker.example:8081"}).status_code == 403
        foreign = httpx.post(f"{proxy}/api/chat", json=body, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403 and "error" in foreign.json()
        plain = httpx.post(
            f"{proxy}/v1/chat/completions", content=json.dumps(body), headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 415
        assert httpx.post(
            f"{proxy}/v1/chat/completions", json=body, headers={"Origin": "http://localhost:3000"}
        ).is_success
        assert proxy_metric(proxy, "edgeserve_proxy_requests_total", outcome="http_403") == 2
        assert proxy_metric(proxy, "edgeserve_proxy_requests_total", outcome="http_415") == 1
    settings = fault_settings(up.url, allowed_hosts="proxy.lan", allowed_origins="https://app.example")
    with live_server(create_proxy_app(settings), lifespan="on") as proxy:
        headers = {"Host": "proxy.lan", "Origin": "https://app.example"}
        assert httpx.post(f"{proxy}/v1/chat/completions", json=body, headers=headers).status_code == 200
