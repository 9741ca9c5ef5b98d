"""`edgeserve serve` under overload, a disconnect storm, and (optionally) a soak, as a real process on
loopback over the default model.

- **Overload**: N (1,000) requests at once. Every answer must be 200 or 429 (no 5xx, no dropped
  connection), the process must live, and its RSS stays bounded (sampled every 50 ms). Each 429's
  ``Retry-After`` is set against the wait that really followed it: the seconds until the queue had
  fully drained (``/health`` polled every 100 ms), and until it first had room. Then some of the
  refused clients retry once after their ``Retry-After``, as a well-behaved client does.
- **Disconnect storm**: C (100) streamed requests: one running (mid-stream: a token has arrived),
  the rest waiting (mid-queue); all clients leave at once. Reported: how long until the engine is idle
  and the queue empty, the tokens generated after the clients left (the server's count for the run,
  from /metrics, less the events the client had read: an upper bound, as events in flight count as
  generated after), the ``cancelled`` count, and the next request's first token time against an idle
  baseline.
- **Soak** (``--soak-s``): a mixed workload drawn from the Azure LLM inference trace (conversation
  part: context and generated token counts, scaled down for this CPU): chat and completion, OpenAI
  and Ollama routes, streamed and not, some clients leaving mid-answer, some invalid requests.
  Reported: errors (any 5xx or transport failure), statuses, latency per minute and P50/P95 by
  thirds of the run, and each process's RSS sampled over the run with its slope (least squares over
  the run after its first quarter, MB per minute).
- **Soak through the proxy** (``--proxy``): the same soak sent to ``edgeserve proxy`` (SJF, one
  request upstream at a time) in front of the server; both processes' RSS are sampled. The overload
  and the storm are skipped then (bench/proxy_overload.py drives those at the proxy).

    python bench/serve_overload.py [--requests 1000] [--storm 100] [--soak-s 0] [--threads 1] [--proxy]

Writes bench/results/serve_overload.json (the soak, when run, also serve_overload_soak.json); with
``--proxy`` the default name is proxy_soak.
``--tree DIR --name NAME`` serves another source tree (e.g. ``git archive COMMIT | tar -x -C DIR``),
for an A/B of the same load against an older server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DATA, free_port, pct, process, save, scrape, warm

MODEL = "default"
WORDS = "the of and to in is was for on that with as by at from his her an are were which river stone light"


class RssSampler:
    """The server's resident memory, sampled on a thread (the event loop may be busy)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []  # (monotonic s, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.monotonic(), self.proc.memory_info().rss / 2**20))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self, since: float = 0.0) -> float:
        return max((mb for t, mb in self.samples if t >= since), default=float("nan"))

    def now_mb(self) -> float:
        return float(self.proc.memory_info().rss / 2**20)


async def _poll_health(client: httpx.AsyncClient, base: str, timeline: list[tuple[float, int, bool]]) -> None:
    while True:
        with contextlib.suppress(httpx.HTTPError):
            h = (await client.get(f"{base}/health", timeout=10)).json()
            timeline.append((time.monotonic(), int(h["queue_depth"]), bool(h["busy"])))
        await asyncio.sleep(0.1)


def _first_after(timeline: list[tuple[float, int, bool]], t: float, ok: Any) -> float | None:
    return next((s for s, depth, busy in timeline if s >= t and ok(depth, busy)), None)


# ---- overload ---------------------------------------------------------------------------------------


async def overload(base: str, n: int, max_tokens: int, capacity: int, rss: RssSampler, retries: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    timeline: list[tuple[float, int, bool]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        poller = asyncio.create_task(_poll_health(client, base, timeline))
        start = time.monotonic()

        async def one(i: int) -> tuple[int | str, float, float | None]:
            body = {"model": MODEL, "prompt": f"Request {i}: once upon a time", "max_tokens": max_tokens}
            body["ignore_eos"] = True
            try:
                r = await client.post(f"{base}/v1/completions", json=body)
            except httpx.HTTPError as exc:
                return type(exc).__name__, time.monotonic(), None
            after = float(r.headers["retry-after"]) if r.status_code == 429 else None
            return r.status_code, time.monotonic(), after

        results = await asyncio.gather(*(one(i) for i in range(n)))
        refused = [(t, ra) for status, t, ra in results if status == 429 and ra is not None]
        retried = await _retry_after(client, base, refused[:retries], max_tokens)
        await asyncio.sleep(0.3)
        poller.cancel()
    waits = []
    for t, retry_after in refused:
        drained = _first_after(timeline, t, lambda depth, busy: depth == 0)
        room = _first_after(timeline, t, lambda depth, busy: depth < capacity)
        if drained is not None:
            waits.append({"retry_after_s": retry_after, "drain_s": drained - t, "room_s": (room or drained) - t})
    ratios = [w["retry_after_s"] / max(w["drain_s"], 1e-3) for w in waits]
    room_ratios = [w["retry_after_s"] / max(w["room_s"], 1e-3) for w in waits]
    statuses = Counter(str(status) for status, _, _ in results)
    return {
        "requests": n,
        "max_tokens": max_tokens,
        "statuses": dict(statuses),
        "only_200_and_429": set(statuses) <= {"200", "429"},
        "wall_s": max(t for _, t, _ in results) - start,
        "peak_rss_mb": rss.peak_mb(start),
        "retry_after_s": _stats([w["retry_after_s"] for w in waits]),
        "queue_drain_after_429_s": _stats([w["drain_s"] for w in waits]),
        "queue_room_after_429_s": _stats([w["room_s"] for w in waits]),
        "retry_after_over_drain": _stats(ratios),
        "within_2x_of_drain": sum(0.5 <= r <= 2 for r in ratios) / len(ratios) if ratios else None,
        "retry_after_over_room": _stats(room_ratios),
        "within_2x_of_room": sum(0.5 <= r <= 2 for r in room_ratios) / len(room_ratios) if room_ratios else None,
        "retries_after_retry_after": retried,
    }


async def _retry_after(
    client: httpx.AsyncClient, base: str, refused: list[tuple[float, float]], max_tokens: int
) -> dict[str, Any]:
    """Refused clients that wait their Retry-After and try once more."""

    async def again(t: float, retry_after: float) -> int:
        await asyncio.sleep(max(0.0, t + retry_after - time.monotonic()))
        body = {"model": MODEL, "prompt": "A retry: once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
        return (await client.post(f"{base}/v1/completions", json=body)).status_code

    statuses = await asyncio.gather(*(again(t, ra) for t, ra in refused))
    return {"retried": len(statuses), "statuses": dict(Counter(str(s) for s in statuses))}


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0}  # type: ignore[dict-item]
    return {"n": len(values), "min": min(values), "p50": pct(values, 50), "max": max(values)}


# ---- disconnect storm ------------------------------------------------------------------------------


async def _stream_open(base: str, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


async def _ttft(client: httpx.AsyncClient, base: str) -> float:
    body = {"model": MODEL, "prompt": "The next client: once upon a time", "max_tokens": 2, "stream": True}
    start = time.monotonic()
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return time.monotonic() - start
    return float("nan")


async def storm(base: str, clients: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        idle_ttft = statistics.median([await _ttft(client, base) for _ in range(3)])
        long_body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
        before = scrape(base)
        cancelled_before = _outcome_count(base, "cancelled")
        conns = [await _stream_open(base, {**long_body, "stream": True})]
        received = 0

        async def read_running(reader: asyncio.StreamReader) -> None:
            nonlocal received
            while line := await reader.readline():
                received += line.startswith(b"data: {")  # one token per event (one byte or more of text)

        running = asyncio.create_task(read_running(conns[0][0]))
        while not received:  # the first one is running: a token came
            await asyncio.sleep(0.01)
        conns += await asyncio.gather(*(_stream_open(base, {**long_body, "stream": True}) for _ in range(clients - 1)))
        while (await client.get(f"{base}/health")).json()["queue_depth"] < clients - 1:
            await asyncio.sleep(0.05)
        running.cancel()
        left = time.monotonic()
        for i, (_, writer) in enumerate(conns):  # everyone leaves: half close, half reset
            if i % 2:
                writer.transport.abort()
            else:
                writer.close()
        freed = None
        while freed is None:
            h = (await client.get(f"{base}/health")).json()
            if h["queue_depth"] == 0 and not h["busy"]:
                freed = time.monotonic() - left
            else:
                await asyncio.sleep(0.01)
        after = scrape(base)
        cancelled_after = _outcome_count(base, "cancelled")
        next_ttft = await _ttft(client, base)
    return {
        "clients": clients,
        "mid_stream": 1,
        "mid_queue": clients - 1,
        "seconds_until_idle": freed,
        # The server counts a cancelled request's tokens when it ends; only the running one had any.
        "tokens_generated": after["edgeserve_generation_tokens_total"] - before["edgeserve_generation_tokens_total"],
        "tokens_received_before_leaving": received,
        "tokens_generated_after_leaving": after["edgeserve_generation_tokens_total"]
        - before["edgeserve_generation_tokens_total"]
        - received,
        "cancelled_counted": cancelled_after - cancelled_before,
        "next_request_ttft_s": next_ttft,
        "idle_ttft_s": idle_ttft,
        "next_over_idle_ttft": next_ttft / idle_ttft,
    }


def _outcome_count(base: str, outcome: str) -> float:
    lines = httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
    wanted = f'outcome="{outcome}"'
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("edgeserve_requests_total{") and wanted in x)


# ---- soak -------------------------------------------------------------------------------------------


def azure_jobs(n: int, seed: int, scale: float) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) drawn from the Azure conversation trace, scaled by ``scale``."""
    path = DATA / "azure-llm-inference-2023" / "AzureLLMInferenceTrace_conv.csv"
    with path.open(newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    picked = rng.sample(rows, n)
    return [(max(4, min(1500, round(c * scale))), max(1, min(256, round(g * scale)))) for c, g in picked]


WORD_LIST = WORDS.split(" ")


def _text(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(WORD_LIST) for _ in range(tokens))


async def _soak_one(client: httpx.AsyncClient, base: str, rng: random.Random, job: tuple[int, int]) -> str:
    """One request of the mix; returns its outcome (a status, ``left`` or a transport error)."""
    prompt_tokens, answer_tokens = job
    text = _text(rng, prompt_tokens)
    kind = rng.random()
    if kind < 0.05:  # invalid: must be a 4xx
        r = await client.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": [], "stream": "yes"})
        return str(r.status_code)
    if kind < 0.45:
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        body |= {"max_tokens": answer_tokens, "ignore_eos": True}
        path = "/v1/chat/completions"
    elif kind < 0.75:
        body = {"model": MODEL, "prompt": text, "max_tokens": answer_tokens, "ignore_eos": True}
        path = "/v1/completions"
    else:
        body = {"model": MODEL, "prompt": text, "options": {"num_predict": answer_tokens}}
        path = "/api/generate"
    stream = rng.random() < 0.5
    leave_early = rng.random() < 0.1
    body["stream"] = stream or leave_early
    async with client.stream("POST", f"{base}{path}", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return str(r.status_code)
        async for line in r.aiter_lines():
            if leave_early and line.strip():
                return "left"  # closing the stream drops the connection mid-answer
    return "200"


async def soak(base: str, seconds: float, concurrency: int, rss: dict[str, RssSampler], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    jobs = azure_jobs(5000, seed, scale=1 / 8)
    outcomes: list[tuple[float, float, str]] = []  # (start, latency, outcome)
    start = time.monotonic()
    deadline = start + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                outcome = await _soak_one(client, base, rng, rng.choice(jobs))
            except httpx.HTTPError as exc:
                outcome = f"transport:{type(exc).__name__}"
            outcomes.append((t - start, time.monotonic() - t, outcome))

    async def machine_load() -> None:  # the 2 cores are shared: say how busy they were
        while time.monotonic() < deadline:
            loads.append(os.getloadavg()[0])
            await asyncio.sleep(10)

    loads: list[float] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(machine_load(), *(worker(client) for _ in range(concurrency)))
    per_minute: dict[int, list[float]] = {}
    thirds: dict[int, list[float]] = {}
    for t, latency, outcome in outcomes:
        if outcome == "200":
            per_minute.setdefault(int(t // 60), []).append(latency)
            thirds.setdefault(min(2, int(3 * t // seconds)), []).append(latency)
    statuses = Counter(o for _, _, o in outcomes)
    return {
        "seconds": seconds,
        "wall_s": time.monotonic() - start,
        "concurrency": concurrency,
        "requests": len(outcomes),
        "outcomes": dict(statuses),
        "errors": sum(n for o, n in statuses.items() if o.startswith(("5", "transport"))),
        "load_average_1m": {"min": min(loads), "mean": statistics.fmean(loads), "max": max(loads)},
        "rss": {name: _rss_report(sampler, start, seconds) for name, sampler in rss.items()},
        # Completed (200) requests by the third of the run they started in: a drift shows as a trend.
        "latency_by_third_s": {
            str(k): {"n": len(v), "p50": pct(v, 50), "p95": pct(v, 95)} for k, v in sorted(thirds.items())
        },
        "latency_p50_s_by_minute": {m: pct(v, 50) for m, v in sorted(per_minute.items())},
    }


def _rss_report(rss: RssSampler, start: float, seconds: float) -> dict[str, Any]:
    """One process's RSS over the soak: the slope leaves out the first quarter (warm-up, the
    allocator's first growth), and a sample every ~10 s is kept for a plot."""
    samples = [(t - start, mb) for t, mb in rss.samples if t >= start]
    steady = [(t, mb) for t, mb in samples if t >= seconds / 4]
    every = max(1, round(10 / rss.every_s))
    return {
        "start_mb": samples[0][1] if samples else None,
        "end_mb": samples[-1][1] if samples else None,
        "peak_mb": max((mb for _, mb in samples), default=None),
        "slope_mb_per_min": _slope(steady) * 60 if len(steady) > 2 else None,
        "samples_s_mb": [(round(t, 1), round(mb, 2)) for t, mb in samples[::every]],
    }


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return sum((t - mx) * (v - my) for t, v in points) / var if var else math.nan


# ---- main -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(threads: int, max_queue: int, tree: Path | None) -> Iterator[tuple[str, int]]:
    """``tree``: serve the edgeserve of another source tree (``git archive COMMIT | tar -x -C DIR``)."""
    port = free_port()
    args = ["serve", "--port", str(port), "--backend", "llama", "--n-ctx", "2048", "--threads", str(threads)]
    args += ["--max-queue", str(max_queue), "--log-level", "warning"]
    env = {"PYTHONPATH": str(tree)} if tree is not None else None
    with process(args, f"http://127.0.0.1:{port}/health", env=env) as proc:
        yield f"http://127.0.0.1:{port}", proc.pid


@contextlib.contextmanager
def fronted(upstream: str) -> Iterator[tuple[str, int]]:
    """``edgeserve proxy`` (its defaults: SJF, one request upstream at a time) in front of ``upstream``."""
    port = free_port()
    args = ["proxy", "--upstream", upstream, "--port", str(port), "--max-queue", "1024", "--log-level", "warning"]
    with process(args, f"http://127.0.0.1:{port}/health") as proc:
        yield f"http://127.0.0.1:{port}", proc.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="Concurrent requests of the overload.")
    parser.add_argument("--max-tokens", type=int, default=8, help="Tokens each overload request generates.")
    parser.add_argument("--max-queue", type=int, default=100, help="The server's queue (the storm needs storm-1).")
    parser.add_argument("--retries", type=int, default=32, help="Refused clients that retry after Retry-After.")
    parser.add_argument("--storm", type=int, default=100, help="Clients of the disconnect storm.")
    parser.add_argument("--soak-s", type=float, default=0.0, help="Seconds of soak (0: none; the issue asks 600).")
    parser.add_argument("--soak-concurrency", type=int, default=4)
    parser.add_argument("--proxy", action="store_true", help="Soak through edgeserve proxy (no overload, no storm).")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the server.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", type=Path, help="Serve another source tree (an A/B against an older commit).")
    parser.add_argument("--name", help="Name of the JSON under bench/results/ (serve_overload, or proxy_soak).")
    a = parser.parse_args()
    name = a.name or ("proxy_soak" if a.proxy else "serve_overload")

    report: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    report["load_average_1m_at_start"] = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        base, pid = stack.enter_context(server(a.threads, a.max_queue, a.tree))
        samplers = {"serve": stack.enter_context(RssSampler(pid))}
        if a.proxy:
            base, proxy_pid = stack.enter_context(fronted(base))
            samplers["proxy"] = stack.enter_context(RssSampler(proxy_pid))
        rss = samplers["serve"]
        warm(base)
        report["rss_after_warmup_mb"] = {k: s.now_mb() for k, s in samplers.items()}
        if a.requests and not a.proxy:
            report["overload"] = asyncio.run(overload(base, a.requests, a.max_tokens, a.max_queue, rss, a.retries))
            print(json.dumps(report["overload"], indent=1), flush=True)
        if a.storm and not a.proxy:
            report["storm"] = asyncio.run(storm(base, a.storm))
            print(json.dumps(report["storm"], indent=1), flush=True)
        if a.soak_s:
            report["soak"] = asyncio.run(soak(base, a.soak_s, a.soak_concurrency, samplers, a.seed))
            print(json.dumps({k: v for k, v in report["soak"].items() if k != "rss"}, indent=1), flush=True)
        alive = all(psutil.pid_exists(s.proc.pid) for s in samplers.values())
        report["processes_alive_at_end"] = alive and httpx.get(f"{base}/health", timeout=10).status_code == 200
        report["peak_rss_mb"] = {k: s.peak_mb() for k, s in samplers.items()}
    print("wrote", save(name, report))
    if a.soak_s and not a.proxy:
        save(f"{name}_soak", {"config": report["config"], **report["soak"]})


if __name__ == "__main__":
    main()
