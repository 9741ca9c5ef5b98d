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
  Reported: errors (any 5xx or transport failure), statuses, latency per minute, and the RSS slope
  (least squares over the run after its first quarter, MB per minute).

    python bench/serve_overload.py [--requests 1000] [--storm 100] [--soak-s 0] [--threads 1]

Writes bench/results/serve_overload.json (the soak, when run, also serve_overload_soak.json).
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


async def soak(base: str, seconds: float, concurrency: int, rss: RssSampler, seed: int) -> dict[str, Any]:
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

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    samples = [(t - start, mb) for t, mb in rss.samples if t >= start]
    steady = [(t, mb) for t, mb in samples if t >= seconds / 4]
    per_minute: dict[int, list[float]] = {}
    for t, latency, outcome in outcomes:
        if outcome == "200":
            per_minute.setdefault(int(t // 60), []).append(latency)
    statuses = Counter(o for _, _, o in outcomes)
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        "requests": len(outcomes),
        "outcomes": dict(statuses),
        "errors": sum(n for o, n in statuses.items() if o.startswith(("5", "transport"))),
        "rss_start_mb": samples[0][1] if samples else None,
        "rss_end_mb": samples[-1][1] if samples else None,
        "rss_peak_mb": max((mb for _, mb in samples), default=None),
        "rss_slope_mb_per_min": _slope(steady) * 60 if len(steady) > 2 else None,
        "latency_p50_s_by_minute": {m: pct(v, 50) for m, v in sorted(per_minute.items())},
        "latency_p99_s_by_minute": {m: pct(v, 99) for m, v in sorted(per_minute.items())},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="Concurrent requests of the overload.")
    parser.add_argument("--max-tokens", type=int, default=8, help="Tokens each overload request generates.")
    parser.add_argument("--max-queue", type=int, default=100, help="The server's queue (the storm needs storm-1).")
    parser.add_argument("--retries", type=int, default=32, help="Refused clients that retry after Retry-After.")
    parser.add_argument("--storm", type=int, default=100, help="Clients of the disconnect storm.")
    parser.add_argument("--soak-s", type=float, default=0.0, help="Seconds of soak (0: none; the issue asks 600).")
    parser.add_argument("--soak-concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the server.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", type=Path, help="Serve another source tree (an A/B against an older commit).")
    parser.add_argument("--name", default="serve_overload", help="Name of the JSON under bench/results/.")
    a = parser.parse_args()

    report: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    with server(a.threads, a.max_queue, a.tree) as (base, pid), RssSampler(pid) as rss:
        warm(base)
        report["rss_after_warmup_mb"] = rss.now_mb()
        if a.requests:
            report["overload"] = asyncio.run(overload(base, a.requests, a.max_tokens, a.max_queue, rss, a.retries))
            print(json.dumps(report["overload"], indent=1), flush=True)
        if a.storm:
            report["storm"] = asyncio.run(storm(base, a.storm))
            print(json.dumps(report["storm"], indent=1), flush=True)
        if a.soak_s:
            report["soak"] = asyncio.run(soak(base, a.soak_s, a.soak_concurrency, rss, a.seed))
            print(json.dumps(report["soak"], indent=1), flush=True)
        alive = psutil.pid_exists(pid) and httpx.get(f"{base}/health", timeout=10).status_code == 200
        report["process_alive_at_end"] = alive
        report["peak_rss_mb"] = rss.peak_mb()
    print("wrote", save(a.name, report))
    if a.soak_s:
        save(f"{a.name}_soak", {"config": report["config"], **report["soak"]})


if __name__ == "__main__":
    main()
