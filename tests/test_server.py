"""The server on a live loopback socket over the real default model, driven by the official OpenAI and
Ollama clients, and by raw httpx and raw sockets where a client would hide the protocol (errors,
disconnects, 429). Assertions are about behaviour, never about speed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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
from server_fixtures import DecodeCounter, FailingBackend, live_server, wait_for, wait_idle

from edgeserve.engine import Engine
from edgeserve.server.app import create_app
from edgeserve.settings import ServerSettings

PROMPT = "The capital of France is Paris. The capital of Germany is"
MODEL = "default"
KEY = "s3cret-key"
LONG = 1500  # tokens: a request that would run for many seconds unless cancelled
#: Tokens a cancelled LONG request may still decode: the time the server takes to notice, in decode steps.
STOPPED_EARLY = 200


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    settings = ServerSettings(api_key=None, max_body_bytes=64 * 1024)
    with live_server(create_app(engine, settings), settings=settings) as url:
        yield url


@pytest.fixture(scope="module")
def secured_url(engine: Engine) -> Iterator[str]:
    with live_server(create_app(engine, ServerSettings(api_key=KEY))) as url:
        yield url


@pytest.fixture(scope="module")
def failing_url() -> Iterator[str]:
    with Engine(FailingBackend()) as eng, live_server(create_app(eng, ServerSettings())) as url:
        yield url


@pytest.fixture(autouse=True)
def idle_engine(engine: Engine) -> Iterator[None]:
    """Every test starts and leaves the shared engine idle."""
    wait_idle(engine)
    yield
    wait_idle(engine)


@pytest.fixture
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def olm(base_url: str) -> ollama.Client:
    return ollama.Client(host=base_url)


def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when the series does not exist yet)."""
    text = httpx.get(f"{base_url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- the OpenAI client --------------------------------------------------------------------------


def test_openai_completion(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert "Berlin" in out.choices[0].text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_openai_completion_stream_equals_whole(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_openai_chat(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_completion_tokens=6, temperature=0
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None and 1 <= out.usage.completion_tokens <= 6
    assert out.model == MODEL and out.object == "chat.completion"


def test_openai_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, seed=1)
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_openai_async_requests_queue_and_never_interrupt(base_url: str) -> None:
    async def main() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:

            async def one(i: int) -> tuple[str, int]:
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                finish, tokens = "", 0
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                return finish, tokens

            return await asyncio.gather(*(one(i) for i in range(3)))

    # Three at once on a serial backend: each runs to its full length; none is cut short by another.
    assert asyncio.run(main()) == [("length", 8)] * 3


def test_openai_sampling_controls(oai: openai.OpenAI, engine: Engine) -> None:
    base = dict(model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=16, temperature=0)
    free = oai.completions.create(**base).choices[0].text  # type: ignore[call-overload]
    assert " 10" in free
    stopped = oai.completions.create(**base, stop=[" 10"]).choices[0]  # type: ignore[call-overload]
    assert stopped.finish_reason == "stop" and stopped.text == free[: free.index(" 10")]
    (z,) = engine.tokenize("Z", add_bos=False)
    forced = oai.completions.create(**base, logit_bias={str(z): 100}).choices[0].text  # type: ignore[call-overload]
    assert forced == "Z" * 16
    (berlin,) = engine.tokenize(" Berlin", add_bos=False)
    banned = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={berlin: -100})
    assert not banned.choices[0].text.startswith(" Berlin")
    seeded = dict(model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, seed=7)
    first = oai.completions.create(**seeded).choices[0].text  # type: ignore[call-overload]
    assert oai.completions.create(**seeded).choices[0].text == first  # type: ignore[call-overload]
    exact = oai.completions.create(
        model=MODEL, prompt="Say nothing.", max_tokens=20, temperature=0.9, seed=3, extra_body={"ignore_eos": True}
    )
    assert exact.usage is not None and exact.usage.completion_tokens == 20


def test_openai_models_and_client_errors(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n=1"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)


# ---- the Ollama client --------------------------------------------------------------------------


def test_ollama_generate_and_stream(olm: ollama.Client) -> None:
    options = {"num_predict": 10, "temperature": 0}
    whole = olm.generate(model=MODEL, prompt=PROMPT, options=options)
    assert "Berlin" in whole.response
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count is not None and 1 <= whole.eval_count <= 10
    assert whole.prompt_eval_count and whole.total_duration and whole.total_duration > 0
    parts = list(olm.generate(model=MODEL, prompt=PROMPT, options=options, stream=True))
    assert "".join(p.response or "" for p in parts) == whole.response
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count


def test_ollama_chat_and_stream(olm: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    options = {"num_predict": 8, "temperature": 0, "seed": 5, "stop": ["\n\n\n"], "top_k": 10, "top_p": 0.9}
    whole = olm.chat(model=MODEL, messages=messages, options=options, keep_alive="5m")
    assert whole.message.role == "assistant" and isinstance(whole.message.content, str)
    assert whole.done and whole.eval_count is not None and whole.eval_count <= 8
    parts = list(olm.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason


def test_ollama_model_routes(olm: ollama.Client, engine: Engine, base_url: str) -> None:
    (entry,) = olm.list().models
    assert entry.model == MODEL and entry.details is not None and entry.details.family == "gemma3"
    (running,) = olm.ps().models
    assert running.model == MODEL and running.context_length == engine.capabilities.n_ctx
    shown = olm.show(MODEL)
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.modelinfo is not None and shown.modelinfo["gemma3.context_length"] == engine.capabilities.n_ctx
    assert olm.show(f"{MODEL}:latest").details is not None
    with pytest.raises(ollama.ResponseError) as err:
        olm.show("llama3.2:1b")
    assert err.value.status_code == 404
    assert httpx.get(f"{base_url}/api/version").json()["version"]


def test_ollama_empty_prompt_only_loads(olm: ollama.Client) -> None:
    # Ollama's documented preload: no prompt (or no messages) → done_reason "load", nothing generated.
    assert olm.generate(model=MODEL).done_reason == "load"
    assert olm.chat(model=MODEL, messages=[]).done_reason == "load"


def test_ollama_errors_are_ollama_shaped(olm: ollama.Client, base_url: str) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        olm.generate(model="nope", prompt="hi")
    assert err.value.status_code == 404 and "nope" in err.value.error
    r = httpx.post(f"{base_url}/api/generate", json={"model": MODEL, "prompt": "hi", "options": {"num_predict": -7}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str) and "num_predict" in r.json()["error"]
    for loose in ({"stream": "yes"}, {"options": {"temperature": True}}, {"options": {"num_predict": "4"}}):
        r = httpx.post(f"{base_url}/api/generate", json={"model": MODEL, "prompt": "hi", **loose})
        assert r.status_code == 400 and isinstance(r.json()["error"], str), loose
    # `curl -d` sends form data: refused (a web page could send it cross-origin without a preflight),
    # with a message that says what to send instead.
    r = httpx.post(
        f"{base_url}/api/generate",
        content=b'{"model": "default", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]


# ---- bad input: 4xx with a clear message, never a 500 -------------------------------------------

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        (CHAT, b'{"model": "default", "messages": [', 400, "not valid JSON"),
        (CHAT, {"model": MODEL, "messages": HI, "max_tokens": "many"}, 400, "max_tokens"),
        (CHAT, {"model": MODEL, "messages": HI, "max_tokens": -5}, 400, "max_tokens"),
        (CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
        (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        (CHAT, {"model": MODEL, "messages": HI, "temperature": 7}, 400, "temperature"),
        (CHAT, {"model": MODEL, "messages": HI, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
        (CHAT, {"model": MODEL, "messages": HI, "stream": True, "max_tokens": 0}, 400, "max_tokens"),
        (CHAT, {"messages": HI}, 400, "model"),
        (CHAT, {"model": "no-such-model", "messages": HI}, 404, "no-such-model"),
        (CHAT, [1, 2, 3], 400, "body"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 3000}, 400, "context"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "at most 1 item"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
        ("/v1/nothing-here", {}, 404, "Not Found"),
        # Strict types, as OpenAI: no boolean as a number, no string as a boolean.
        (CHAT, {"model": MODEL, "messages": HI, "temperature": True}, 400, "temperature"),
        (CHAT, {"model": MODEL, "messages": HI, "max_tokens": True}, 400, "max_tokens"),
        (CHAT, {"model": MODEL, "messages": HI, "stream": "yes"}, 400, "stream"),
        (CHAT, {"model": MODEL, "messages": HI, "stream_options": {"include_usage": 1}}, 400, "include_usage"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": "7"}, 400, "seed"),
    ],
)
def test_bad_input_is_a_clear_openai_error(base_url: str, path: str, body: object, status: int, needle: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{base_url}{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle.lower() in error["message"].lower()


def test_error_codes_and_params(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "word " * 3000})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{base_url}{CHAT}", json={"model": "x", "messages": HI})
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"],
        "type": "not_found_error",
        "param": None,
        "code": "model_not_found",
    }
    r = httpx.post(f"{base_url}{CHAT}", json={"model": MODEL, "messages": HI, "top_p": 0})
    assert r.json()["error"]["param"] == "top_p"


def test_oversized_body_is_413(base_url: str) -> None:
    big = {"model": MODEL, "prompt": "x" * 70_000}
    r = httpx.post(f"{base_url}/v1/completions", json=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap must hold while reading
        yield b'{"model": "default", "prompt": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(f"{base_url}/api/generate", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert httpx.get(f"{base_url}/health").status_code == 200


# ---- security -------------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health(secured_url: str) -> None:
    for path in ("/v1/models", "/api/tags", "/metrics", "/openapi.json", "/api/version"):
        r = httpx.get(f"{secured_url}{path}")
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{secured_url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{secured_url}/health").status_code == 200
    with openai.OpenAI(base_url=f"{secured_url}/v1", api_key=KEY, max_retries=0) as client:
        assert [m.id for m in client.models.list()] == [MODEL]
    with (
        openai.OpenAI(base_url=f"{secured_url}/v1", api_key="wrong", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    client = ollama.Client(host=secured_url, headers={"Authorization": f"Bearer {KEY}"})
    assert client.list().models[0].model == MODEL


def test_prompts_are_logged_only_when_asked(base_url: str, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    secret = "zebra-credit-card-4242"
    with caplog.at_level("DEBUG"):
        httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": secret, "max_tokens": 2})
    assert any("edgeserve.server" in r.name for r in caplog.records)
    assert secret not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"), live_server(create_app(engine, ServerSettings(log_prompts=True))) as url:
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": secret, "max_tokens": 2})
    assert secret in caplog.text  # only when asked for


# ---- cancellation on disconnect --------------------------------------------------------------------


def _long_body(stream: bool) -> dict[str, object]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True, "stream": stream}


def _raw_request(base_url: str, path: str, body: dict[str, object]) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@pytest.fixture
def decoded(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> DecodeCounter:
    return DecodeCounter(engine.backend).install(engine.backend, monkeypatch)


def test_streaming_client_disconnect_stops_generation(base_url: str, engine: Engine, decoded: DecodeCounter) -> None:
    cancelled = metric(base_url, "edgeserve_requests_total", endpoint="/v1/completions", outcome="cancelled")
    with httpx.stream("POST", f"{base_url}/v1/completions", json=_long_body(True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: the request is running
        assert engine.busy
    wait_idle(engine, timeout=60)
    assert decoded.tokens < STOPPED_EARLY  # stopped within a few decode steps, not after LONG
    after = metric(base_url, "edgeserve_requests_total", endpoint="/v1/completions", outcome="cancelled")
    assert after == cancelled + 1
    out = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
    assert out.status_code == 200


def test_non_streaming_client_disconnect_stops_generation(
    engine: Engine, base_url: str, decoded: DecodeCounter
) -> None:
    sock = _raw_request(base_url, "/v1/completions", _long_body(False))
    wait_for(lambda: decoded.tokens > 0, what="the request to start")
    sock.close()
    wait_idle(engine, timeout=60)
    assert decoded.tokens < STOPPED_EARLY


def test_ollama_stream_disconnect_stops_generation(base_url: str, engine: Engine, decoded: DecodeCounter) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "options": {"num_predict": LONG}}
    with httpx.stream("POST", f"{base_url}/api/generate", json=body) as r:
        next(r.iter_lines())
    wait_idle(engine, timeout=60)
    assert decoded.tokens < STOPPED_EARLY


def test_waiting_request_leaves_the_queue_when_its_client_does(
    base_url: str, engine: Engine, decoded: DecodeCounter
) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", json=_long_body(True)) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        waiting = _raw_request(base_url, "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 4})
        wait_for(lambda: engine.queue_depth == 1, what="the second request to queue")
        waiting.close()
        wait_for(lambda: engine.queue_depth == 0, timeout=60, what="the abandoned request to leave the queue")
        assert next(line for line in lines if line.startswith("data: {"))  # the running one goes on
    wait_idle(engine, timeout=60)
    assert decoded.runs == 1  # the abandoned request never reached the model


def test_full_queue_is_429_with_retry_after(base_url: str, engine: Engine, decoded: DecodeCounter) -> None:
    capacity = engine.settings.max_queue

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client, contextlib.AsyncExitStack() as stack:
            for _ in range(capacity + 1):  # one runs, the rest fill the queue
                await stack.enter_async_context(client.stream("POST", "/v1/completions", json=_long_body(True)))
            await asyncio.to_thread(wait_for, lambda: engine.queue_depth == capacity)
            openai_429 = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
            ollama_429 = await client.post("/api/generate", json={"model": MODEL, "prompt": "hi"})
            return openai_429, ollama_429

    openai_429, ollama_429 = asyncio.run(main())
    # Honest Retry-After: the queue holds minutes of work (1,500 tokens each), so not the old fixed 1.
    assert openai_429.status_code == 429 and int(openai_429.headers["retry-after"]) > 1
    assert openai_429.json()["error"]["type"] == "rate_limit_error"
    assert ollama_429.status_code == 429 and "queue" in ollama_429.json()["error"]
    wait_idle(engine, timeout=60)  # every client left: every request was cancelled, the waiting ones unrun
    assert decoded.tokens < STOPPED_EARLY
    assert metric(base_url, "edgeserve_requests_total", endpoint="/v1/completions", outcome="queue_full") >= 1


def test_retry_after_is_the_engines_estimate_rounded_up() -> None:
    from edgeserve.errors import QueueFullError
    from edgeserve.server.http_errors import edgeserve_error_response

    for estimate, header in ((7.2, "8"), (30.0, "30"), (0.2, "1")):
        response = edgeserve_error_response("/v1/completions", QueueFullError("full", retry_after_s=estimate))
        assert response.status_code == 429 and response.headers["retry-after"] == header


# ---- backend failure --------------------------------------------------------------------------------


def test_backend_failure_mid_stream_is_an_error_event(failing_url: str) -> None:
    with openai.OpenAI(base_url=f"{failing_url}/v1", api_key="x", max_retries=0) as client:
        stream = client.completions.create(model="scripted", prompt="hi", max_tokens=20, stream=True)
        texts = []
        with pytest.raises(openai.APIError, match="device lost"):
            for chunk in stream:
                texts.append(chunk.choices[0].text)
        assert len("".join(texts)) == 3  # three tokens of one byte each, then the failure
    with httpx.stream(
        "POST", f"{failing_url}/v1/chat/completions", json={"model": "scripted", "messages": HI, "stream": True}
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"
    assert events[-1] == "data: [DONE]"
    with pytest.raises(ollama.ResponseError, match="device lost"):
        list(ollama.Client(host=failing_url).generate(model="scripted", prompt="hi", stream=True))
    r = httpx.post(f"{failing_url}/v1/completions", json={"model": "scripted", "prompt": "hi"})
    assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
    assert httpx.get(f"{failing_url}/health").json()["status"] == "ok"


# ---- schema and metrics ---------------------------------------------------------------------------


def test_openapi_describes_the_real_models(base_url: str) -> None:
    spec = httpx.get(f"{base_url}/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show"):
        assert "requestBody" in paths[path]["post"], path
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    data = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]  # one SSE event: JSON chunk or [DONE]
    assert {"const": "[DONE]"} in data
    chunk = next(d for d in data if "contentSchema" in d)["contentSchema"]["anyOf"]
    assert {"$ref": "#/components/schemas/ChatCompletionChunk"} in chunk
    assert "ChatCompletionChunk" in spec["components"]["schemas"]
    prompt = spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert any(p.get("items", {}).get("maximum") == 262143 for p in prompt)  # the model's vocabulary
    assert all("422" not in op["responses"] for p in paths.values() for op in p.values())
    for path in ("/v1/models", "/api/tags", "/api/ps", "/api/version", "/health", "/metrics"):
        assert "get" in paths[path], path


def test_metrics_are_labelled_by_model_and_endpoint(base_url: str, oai: openai.OpenAI) -> None:
    oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{base_url}/metrics").text
    for name in (
        "edgeserve_time_to_first_token_seconds_bucket",
        "edgeserve_time_per_output_token_seconds_bucket",
        "edgeserve_queue_wait_seconds_bucket",
        "edgeserve_e2e_request_latency_seconds_bucket",
    ):
        assert f'{name}{{endpoint="/v1/completions",' in text, name
    assert metric(base_url, "edgeserve_prompt_tokens_total", model=MODEL, endpoint="/v1/completions") > 0
    assert metric(base_url, "edgeserve_generation_tokens_total", model=MODEL, endpoint="/v1/completions") > 0
    assert "edgeserve_queue_depth{" in text
    step = metric(base_url, "edgeserve_decode_step_seconds", model=MODEL, width="1")
    assert 0 < step < 60  # one sequence's decode step, measured


def test_refused_requests_are_counted(base_url: str) -> None:
    """Validation 400s and 404s are requests too: counted once, under a bounded set of endpoints."""

    def count(endpoint: str, outcome: str) -> float:
        return metric(base_url, "edgeserve_requests_total", endpoint=endpoint, outcome=outcome)

    cases = [
        (CHAT, {"model": MODEL, "messages": HI, "temperature": True}, CHAT, "invalid"),
        (CHAT, {"model": "no-such-model", "messages": HI}, CHAT, "not_found"),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_predict": 0}}, "/api/generate", "invalid"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 3000}, "/v1/completions", "invalid"),
        ("/no/such/route/123", {}, "other", "not_found"),
    ]
    for path, body, endpoint, outcome in cases:
        before = count(endpoint, outcome)
        r = httpx.post(f"{base_url}{path}", json=body)
        assert r.status_code in (400, 404), r.text
        assert count(endpoint, outcome) == before + 1, (path, body)
    assert 'endpoint="/no/such/route/123"' not in httpx.get(f"{base_url}/metrics").text


def test_concurrent_clients_on_threads_all_complete(base_url: str) -> None:
    results: list[int] = []

    def one() -> None:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
            out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
            results.append(out.usage.completion_tokens if out.usage else -1)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [5, 5, 5]


# ---- the command ----------------------------------------------------------------------------------


def test_serve_flags_come_from_the_settings() -> None:
    from click.testing import CliRunner

    from edgeserve.server.cli import serve

    out = CliRunner().invoke(serve, ["--help"]).output
    for flag in ("--host", "--port", "--api-key", "--max-body-bytes", "--log-prompts", "--model", "--max-queue"):
        assert flag in out, flag
    assert "EDGESERVE_API_KEY" in out
    assert ServerSettings.model_fields["host"].default == "127.0.0.1"  # loopback unless asked otherwise


def test_serve_command_runs_a_server(default_model_path: object) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EDGESERVE_API_KEY": KEY}
    code = "from edgeserve.server.cli import serve; serve()"
    args = ["--port", str(port), "--backend", "llama", "--n-ctx", "512", "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/health").status_code == 200
            return False

        wait_for(up, timeout=60, what="edgeserve serve to answer")
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from EDGESERVE_API_KEY
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        assert "Berlin" in httpx.post(f"{url}/v1/completions", json=body, headers=auth).json()["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
