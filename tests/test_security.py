"""The server against hostile or broken clients, on a live loopback socket over the real default model:
DNS rebinding (a foreign Host), cross-origin posts from web pages (a foreign Origin, non-JSON bodies),
text that is not Unicode (lone surrogates), a crash inside a request, and slow or half-open clients.

Timing assertions are bounds on what used to be unbounded (a 20 s hang, heads held for ever) with
generous margins, never speed."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_fixtures import DecodeCounter, live_server, wait_idle

from edgeserve.engine import Engine
from edgeserve.server.app import create_app
from edgeserve.settings import ServerSettings

MODEL = "default"
HI = [{"role": "user", "content": "hi"}]
TINY = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    settings = ServerSettings()  # the defaults: loopback names only, no foreign origin
    with live_server(create_app(engine, settings), settings=settings) as url:
        yield url


@pytest.fixture(autouse=True)
def idle_engine(engine: Engine) -> Iterator[None]:
    wait_idle(engine)
    yield
    wait_idle(engine)


@pytest.fixture
def decoded(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> DecodeCounter:
    return DecodeCounter(engine.backend).install(engine.backend, monkeypatch)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ---- DNS rebinding: the Host header ------------------------------------------------------------------


def test_dns_rebinding_host_is_refused_before_anything_runs(base_url: str, decoded: DecodeCounter) -> None:
    # A rebinding page's requests carry its own name in Host, whatever address that name now has.
    for host in ("attacker.example", f"attacker.example:{_port(base_url)}", "localhost.attacker.example"):
        r = httpx.post(f"{base_url}/v1/completions", json=TINY, headers={"Host": host})
        assert r.status_code == 403, host
        error = r.json()["error"]
        assert error["code"] == "forbidden_origin" and "attacker.example" in error["message"]
    r = httpx.post(f"{base_url}/api/generate", json={"model": MODEL, "prompt": "hi"}, headers={"Host": "evil.test"})
    assert r.status_code == 403 and isinstance(r.json()["error"], str)  # the Ollama shape under /api
    assert httpx.get(f"{base_url}/health", headers={"Host": "evil.test"}).status_code == 403
    assert decoded.runs == 0  # nothing reached the model


def test_loopback_names_and_addresses_are_served(base_url: str) -> None:
    port = _port(base_url)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "app.localhost", "10.1.2.3"):
        assert httpx.get(f"{base_url}/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_are_configurable(engine: Engine) -> None:
    listed = ServerSettings(allowed_hosts="Edge.Example, other.example")
    with live_server(create_app(engine, listed)) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Host": "edge.example:8080"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Host": "third.example"}).status_code == 403
    anyone = ServerSettings(allowed_hosts="*")
    with live_server(create_app(engine, anyone)) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Host": "third.example"}).status_code == 200


# ---- cross-origin posts from web pages ------------------------------------------------------------


def test_cross_origin_post_is_refused(base_url: str, decoded: DecodeCounter) -> None:
    evil = {"Origin": "https://evil.example"}
    # The form a page can send without a preflight: text/plain, no CORS question asked.
    body = json.dumps(TINY).encode()
    r = httpx.post(f"{base_url}/v1/completions", content=body, headers={**evil, "content-type": "text/plain"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/completions", json=TINY, headers=evil)
    assert r.status_code == 403
    chat = {"model": MODEL, "messages": HI, "stream": False}
    assert httpx.post(f"{base_url}/api/chat", json=chat, headers=evil).status_code == 403
    preflight = {**evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = httpx.options(f"{base_url}/v1/completions", headers=preflight)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert httpx.post(f"{base_url}/v1/completions", json=TINY, headers={"Origin": "null"}).status_code == 403
    assert decoded.runs == 0


def test_loopback_and_same_origin_pages_may_call(base_url: str) -> None:
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", base_url):
        r = httpx.post(f"{base_url}/v1/completions", json=TINY, headers={"Origin": origin})
        assert r.status_code == 200, origin
    r = httpx.post(f"{base_url}/v1/completions", json=TINY, headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"  # CORS for allowed pages


def test_allowed_origins_get_cors_answers(engine: Engine) -> None:
    settings = ServerSettings(allowed_origins="https://app.example.com, http://*.lan:*")
    with live_server(create_app(engine, settings)) as url:
        preflight = {
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "http://box.lan:8000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://box.lan:8000"
        assert httpx.get(f"{url}/v1/models", headers={"Origin": "https://app.example.org"}).status_code == 403


def test_bodies_must_be_json(base_url: str, decoded: DecodeCounter) -> None:
    body = json.dumps(TINY).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = httpx.post(f"{base_url}/v1/completions", content=body, headers={"content-type": content_type})
        assert r.status_code == 415, content_type
        assert (
            r.json()["error"]["code"] == "unsupported_media_type" and "application/json" in r.json()["error"]["message"]
        )
    r = httpx.post(f"{base_url}/api/chat", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]  # Ollama's shape
    # No content type at all (a page's Blob body): refused too.
    r = httpx.post(f"{base_url}/v1/completions", content=body, headers={"content-type": ""})
    assert r.status_code == 415
    assert decoded.runs == 0
    ok = httpx.post(
        f"{base_url}/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200


# ---- text that is not Unicode, and crashes: 4xx/5xx, and the connection lives on --------------------


def _post(conn: http.client.HTTPConnection, path: str, body: Any) -> tuple[int, Any]:
    # json.dumps escapes a lone surrogate as \ud800 (valid JSON, no character); httpx would refuse to
    # encode it, which is why this goes through http.client.
    conn.request("POST", path, body=json.dumps(body), headers=JSON)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


SURROGATE = "a\ud800b"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": SURROGATE, "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["\udc00"], "max_tokens": 1}, "stop"),
        ("/v1/chat/completions", {"model": MODEL, "messages": HI, "logit_bias": {"\udfff": 1}}, "logit_bias"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": SURROGATE}]}, None),
        ("/api/generate", {"model": MODEL, "prompt": SURROGATE, "stream": False}, None),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "system": "\ud83d"}, None),
    ],
)
def test_lone_surrogate_is_a_400_and_the_connection_lives(base_url: str, path: str, body: Any, param: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", _port(base_url), timeout=60)
    try:
        status, answer = _post(conn, path, body)
        assert status == 400, answer
        if path.startswith("/api/"):
            assert "surrogate" in answer["error"]
        else:
            assert "surrogate" in answer["error"]["message"] and answer["error"]["param"] == param
        sock = conn.sock
        status, answer = _post(conn, "/v1/completions", TINY)  # the same keep-alive connection
        assert status == 200 and conn.sock is sock
    finally:
        conn.close()


def test_a_surrogate_pair_is_a_character(base_url: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", _port(base_url), timeout=60)
    try:
        status, _ = _post(conn, "/v1/completions", {**TINY, "prompt": "smile \ud83d\ude00"})  # escaped as a pair
        assert status == 200
    finally:
        conn.close()


def test_an_unexpected_error_is_a_500_that_keeps_the_connection(
    base_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root cause of the ECONNRESET after every 500: Starlette re-raised after the catch-all 500 and
    uvicorn closed the connection under the client's next request."""
    real = engine.submit_async

    def crash_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(engine, "submit_async", real)
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "a fault injected by the test")

    monkeypatch.setattr(engine, "submit_async", crash_once)
    conn = http.client.HTTPConnection("127.0.0.1", _port(base_url), timeout=60)
    try:
        status, answer = _post(conn, "/v1/completions", TINY)
        assert status == 500 and answer["error"]["type"] == "server_error"
        assert "UnicodeEncodeError" in answer["error"]["message"]
        sock = conn.sock
        for _ in range(3):
            status, _ = _post(conn, "/v1/completions", TINY)
            assert status == 200 and conn.sock is sock
    finally:
        conn.close()
    count = f'edgeserve_requests_total{{endpoint="/v1/completions",model="{MODEL}",outcome="error"}}'
    assert count in httpx.get(f"{base_url}/metrics").text


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", json.dumps(TINY), 415),
        ("application/json", json.dumps({**TINY, "prompt": "x" * (1 << 20)}), 413),  # answered before it is read
        ("application/json", "{not json", 400),
        ("application/json", json.dumps({**TINY, "model": "nope"}), 404),
    ],
)
def test_no_refusal_closes_the_connection(base_url: str, content_type: str, body: str, status: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", _port(base_url), timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"content-type": content_type})
        response = conn.getresponse()
        response.read()
        assert response.status == status
        sock = conn.sock
        assert _post(conn, "/v1/completions", TINY)[0] == 200 and conn.sock is sock
    finally:
        conn.close()


# ---- slow and half-open clients -------------------------------------------------------------------

HEAD_S = 1.0
BODY_S = 1.0
#: What "bounded" means here: the limits are 1 s; the old server held these for ever.
BOUND_S = 15.0


@pytest.fixture(scope="module")
def strict_url(engine: Engine) -> Iterator[str]:
    settings = ServerSettings(header_timeout_s=HEAD_S, body_timeout_s=BODY_S, max_connections=1000)
    with live_server(create_app(engine, settings), settings=settings) as url:
        yield url


def _connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(url)), timeout=BOUND_S)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_a_body_shorter_than_its_length_gets_a_408(strict_url: str) -> None:
    body = json.dumps(TINY).encode()
    sock = _connect(strict_url)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) + 50}\r\n\r\n"
    )
    start = time.monotonic()
    sock.sendall(head.encode() + body)  # 50 bytes short, and nothing more comes
    answer = _read_all(sock)  # the server answers, then closes
    sock.close()
    assert time.monotonic() - start < BOUND_S
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert b'"code":"request_timeout"' in answer


def test_half_open_heads_and_silent_connections_are_dropped(strict_url: str) -> None:
    partial = [_connect(strict_url) for _ in range(100)]
    for sock in partial:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    silent = [_connect(strict_url) for _ in range(100)]
    # Meanwhile the server serves others.
    assert httpx.get(f"{strict_url}/health", timeout=BOUND_S).status_code == 200
    start = time.monotonic()
    closed: dict[socket.socket, bytes] = {}
    waiting = partial + silent
    while waiting and time.monotonic() - start < BOUND_S:
        readable, _, _ = select.select(waiting, [], [], 0.5)
        for sock in readable:
            closed[sock] = _read_all(sock)
            waiting.remove(sock)
    for sock in partial + silent:
        sock.close()
    assert not waiting, f"{len(waiting)} of 200 connections still held after {BOUND_S:.0f} s"
    assert all(closed[s].startswith(b"HTTP/1.1 408") for s in partial)  # a head had begun: told why
    assert all(closed[s] == b"" for s in silent)  # not one byte came: just closed
    assert httpx.get(f"{strict_url}/health", timeout=BOUND_S).status_code == 200


def test_connections_beyond_the_cap_are_closed_at_once(engine: Engine) -> None:
    settings = ServerSettings(max_connections=10, header_timeout_s=60)
    with live_server(create_app(engine, settings), settings=settings) as url:
        held = [_connect(url) for _ in range(30)]
        start = time.monotonic()
        refused = 0
        for sock in held:
            readable, _, _ = select.select([sock], [], [], max(0.0, 5 - (time.monotonic() - start)))
            if readable and _read_all(sock) == b"":
                refused += 1
        assert refused == 20  # the ten within the cap are held (their head timeout is 60 s)
        for sock in held:
            sock.close()
        deadline = time.monotonic() + BOUND_S
        while True:  # the server sees the closes a moment later
            try:
                assert httpx.get(f"{url}/health", timeout=BOUND_S).status_code == 200
                break
            except (httpx.RemoteProtocolError, httpx.ReadError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
