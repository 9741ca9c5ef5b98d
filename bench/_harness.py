"""Shared pieces of the admission benchmarks: a real serial upstream and the proxy as processes on
loopback, a workload of real prompts with real answer lengths, and a load generator that times
every request from the client's side."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results"
CLASSES = ("short", "medium", "long")


def length_class(tokens: int) -> str:
    """Clairvoyant's classes, on the real (unscaled) answer length."""
    return "short" if tokens < 200 else ("long" if tokens >= 800 else "medium")


@dataclass(frozen=True)
class Job:
    job_id: str
    prompt: str
    #: What the answer really was (tokens of the model that wrote the dataset).
    real_tokens: int
    #: What this CPU generates for it: real_tokens scaled down (ignore_eos + max_tokens).
    gen_tokens: int

    @property
    def cls(self) -> str:
        return length_class(self.real_tokens)


def workload(n: int, scale: float, seed: int, source: str = "oasst1") -> list[Job]:
    """``n`` prompts of the Clairvoyant labeled set (cross-distribution for the predictor, which
    trained on ShareGPT), each to generate its real answer length times ``scale``."""
    rng = random.Random(seed)
    picked = rng.sample(workload_rows(source), n)
    return [
        Job(f"j{i}", r["prompt"], int(r["actual_output_tokens"]), max(1, round(int(r["actual_output_tokens"]) * scale)))
        for i, r in enumerate(picked)
    ]


def workload_rows(source: str = "oasst1") -> list[dict[str, str]]:
    path = DATA / "clairvoyant-labeled" / f"{source}_labeled.csv"
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["prompt"].strip()]


#: max_tokens of every request whose answer ends by a stop sequence: above every answer here (the
#: longest oasst1 answer is 154 tokens at scale 1/16) and every prediction (at most ~770), so it
#: tells the scheduler nothing. A cap equal to each answer's own length would: the engine bounds a
#: request's predicted length by its max_tokens, which would make any policy that reads it an oracle.
UNIFORM_MAX_TOKENS = 1024


def unique_suffix(text: str) -> str:
    """The shortest tail of ``text`` found nowhere earlier in it: as a stop sequence it ends the same
    greedy answer exactly where ``text`` ends ("" for an empty text)."""
    for k in range(1, len(text) + 1):
        if text.find(text[-k:]) == len(text) - k:
            return text[-k:]
    return text


def ended_by_stop(outcomes: Sequence[Outcome], cap: int = UNIFORM_MAX_TOKENS) -> dict[str, dict[str, Any]]:
    """Request fields that end each answer where a greedy, seeded run with ``max_tokens`` = its
    length ended it (``outcomes``), without telling the server that length: a stop sequence and one
    uniform cap. An answer with no text to stop on keeps its own max_tokens (counted by the caller)."""
    fields: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        # A character cut by max_tokens shows as U+FFFD; the stop run would never see it complete.
        stop = unique_suffix(o.text.rstrip("\ufffd"))
        fields[o.job_id] = {"max_tokens": cap, "stop": [stop]} if stop else {"max_tokens": o.gen_tokens}
    return fields


def code_version() -> dict[str, Any]:
    """The commit the servers run and whether the engine's files differ from it: each run starts
    fresh ``edgeserve serve`` processes, so a change landing mid-run would mix versions (compare
    the value at the start and at the end)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "edgeserve", "backends"], capture_output=True, text=True)
    return {"head": head, "uncommitted_engine_files": [line[3:] for line in dirty.stdout.splitlines()]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(args: Sequence[str], health: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``edgeserve ARGS`` until ``health`` answers 200; SIGINT at the end."""
    with program([sys.executable, "-m", "edgeserve", *args], health, env) as proc:
        yield proc


@contextlib.contextmanager
def program(cmd: Sequence[str], health: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """Any server process (edgeserve, llama.cpp's llama-server) until ``health`` answers 200."""
    # stderr to a file, not a pipe: nobody reads a pipe while the benchmark runs, and a server that
    # logs every request would block once its 64 KiB filled.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            list(cmd),
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )

        def tail() -> str:
            log.seek(0)
            return log.read()[-2000:]

        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd)} exited: {tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(health, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd)} did not start: {tail()}")
                time.sleep(0.2)
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def upstream(threads: int, n_ctx: int = 2048) -> Iterator[str]:
    """The serial backend: edgeserve's own server, first come first served, on the default model."""
    with serve("fcfs", threads, n_ctx=n_ctx) as server:
        yield server.url


@dataclass(frozen=True)
class Served:
    url: str
    pid: int

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (all its threads): unlike wall time, not
        stretched by other processes on a shared machine."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


@contextlib.contextmanager
def serve(policy: str | None, threads: int, *, n_ctx: int | None = 2048, extra: Sequence[str] = ()) -> Iterator[Served]:
    """``edgeserve serve --policy POLICY`` on the default model (llama.cpp, ``threads`` pinned);
    ``extra``: more flags (``--no-predict-lengths``, ``--aging-s``). ``policy`` or ``n_ctx`` None:
    the server's default."""
    port = free_port()
    args = ["serve", "--port", str(port), "--backend", "llama"]
    args += ["--policy", policy] if policy is not None else []
    args += ["--n-ctx", str(n_ctx)] if n_ctx is not None else []
    args += ["--threads", str(threads), "--max-queue", "1024", "--log-level", "warning", *extra]
    with process(args, f"http://127.0.0.1:{port}/health") as proc:
        yield Served(f"http://127.0.0.1:{port}", proc.pid)


def default_gguf() -> str:
    """The embedded default model's GGUF, as ``edgeserve models --json`` reports it."""
    out = subprocess.run([sys.executable, "-m", "edgeserve", "models", "--json"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        entry = json.loads(line)
        if entry.get("name") == "default":
            return str(entry["path"])
    raise RuntimeError(f"edgeserve models --json lists no default model: {out.stdout[-500:]} {out.stderr[-500:]}")


@contextlib.contextmanager
def llama_server(
    binary: str, threads: int, parallel: int, ctx_per_slot: int = 2048, flash_attn: str = "auto"
) -> Iterator[Served]:
    """llama.cpp's own ``llama-server`` (bench/build_llama_server.sh) on the default model:
    ``parallel`` slots, continuous batching (its default), first come first served, each slot
    ``ctx_per_slot`` tokens; flash attention ``flash_attn`` (auto: on for a CPU, as edgeserve's default); Gemma's chat
    template."""
    port = free_port()
    cmd = [binary, "-m", default_gguf(), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx_per_slot * parallel)]
    cmd += ["-fa", flash_attn, "--no-jinja", "--chat-template", "gemma", "--no-webui", "-lv", "1"]
    with program(cmd, f"http://127.0.0.1:{port}/health") as proc:
        yield Served(f"http://127.0.0.1:{port}", proc.pid)


def warm(base: str) -> None:
    """One short request, so the server has measured its prefill and decode rates (as a live server
    has) and the first request of a run pays no first-use cost."""
    body = {"model": "default", "prompt": "Warm-up: " + "the quick brown fox jumps over the lazy dog. " * 4}
    body.update(max_tokens=8, ignore_eos=True, temperature=0)
    httpx.post(f"{base}/v1/completions", json=body, timeout=120).raise_for_status()


def scrape(base: str, prefix: str = "edgeserve_") -> dict[str, float]:
    """The server's Prometheus counters and gauges, each summed over its labels (no histograms)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if not line.startswith(prefix) or "_bucket" in line:
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{", 1)[0]
        if key.endswith("_created"):  # a counter's creation timestamp, not a count
            continue
        out[key] = out.get(key, 0.0) + float(value)
    return out


@contextlib.contextmanager
def echo_upstream(late_headers: bool = False) -> Iterator[str]:
    """A model-free streaming upstream (bench/_echo_upstream.py): isolates the proxy's own cost."""
    port = free_port()
    args = [sys.executable, str(ROOT / "bench" / "_echo_upstream.py"), str(port)]
    proc = subprocess.Popen(args + (["--late-headers"] if late_headers else []), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the echo upstream did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def proxy(upstream_url: str, policy: str, aging_s: float | None = None) -> Iterator[str]:
    port = free_port()
    args = ["proxy", "--upstream", upstream_url, "--port", str(port), "--policy", policy, "--max-queue", "1024"]
    args += ["--log-level", "warning"]
    if aging_s is not None:
        args += ["--aging-s", str(aging_s)]
    with process(args, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@dataclass
class Outcome:
    job_id: str
    cls: str
    real_tokens: int
    gen_tokens: int
    sent: float
    first_token: float
    end: float
    tokens_seen: int
    queue_wait_ms: float | None
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = ""
    #: The answer's text (kept out of ``rows``: the JSON carries no model output).
    text: str = ""
    #: When each content chunk arrived, seconds since the run's start (kept out of ``rows``).
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.sent

    @property
    def latency_s(self) -> float:
        return self.end - self.sent


async def send(
    client: httpx.AsyncClient,
    base: str,
    job: Job,
    t0: float,
    extra: dict[str, Any] | None = None,
    cut_after: int | None = None,
) -> Outcome:
    """One streamed chat completion; TTFT is the first content chunk, latency the last byte. ``extra``
    adds fields to the request body. ``cut_after``: the client stops reading and closes the stream
    once it has that many content chunks (finish_reason "client_cut"), as a user pressing stop."""
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": job.prompt}],
        "max_tokens": job.gen_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    sent = time.monotonic()
    first = None
    seen = 0
    prompt_tokens = completion_tokens = 0
    finish = ""
    pieces: list[str] = []
    times: list[float] = []
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        wait = response.headers.get("x-queue-wait-ms")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
                completion_tokens = event["usage"]["completion_tokens"]
            if not event.get("choices"):
                continue
            finish = event["choices"][0].get("finish_reason") or finish
            delta = event["choices"][0]["delta"].get("content")
            if delta:
                pieces.append(delta)
                times.append(time.monotonic() - t0)
                seen += 1
                if first is None:
                    first = time.monotonic()
                if cut_after is not None and seen >= cut_after:
                    finish = "client_cut"
                    break
    end = time.monotonic()
    return Outcome(
        job.job_id,
        job.cls,
        job.real_tokens,
        job.gen_tokens,
        sent - t0,
        (first or end) - t0,
        end - t0,
        seen,
        float(wait) if wait is not None else None,
        prompt_tokens,
        completion_tokens,
        finish,
        "".join(pieces),
        times,
    )


async def run_load(
    base: str,
    jobs: Sequence[Job],
    arrivals: Sequence[float],
    extra: dict[str, Any] | None = None,
    per_job: Sequence[dict[str, Any]] | None = None,
    cuts: Sequence[int | None] | None = None,
) -> list[Outcome]:
    """Send ``jobs[i]`` at ``arrivals[i]`` seconds after the start, all concurrently; ``per_job[i]``
    adds fields to ``jobs[i]``'s body (after ``extra``); ``cuts[i]``: ``send``'s ``cut_after``."""
    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        t0 = time.monotonic()

        async def at(job: Job, when: float, own: dict[str, Any], cut: int | None) -> Outcome:
            await asyncio.sleep(max(0.0, when - (time.monotonic() - t0)))
            return await send(client, base, job, t0, {**(extra or {}), **own}, cut)

        owns = per_job or [{} for _ in jobs]
        cut_list = list(cuts) if cuts is not None else [None] * len(jobs)
        return list(await asyncio.gather(*(at(*x) for x in zip(jobs, arrivals, owns, cut_list, strict=True))))


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in (*CLASSES, "all"):
        group = [o for o in outcomes if cls in ("all", o.cls)]
        if not group:
            continue
        lat = [o.latency_s for o in group]
        ttft = [o.ttft_s for o in group]
        out[cls] = {
            "n": len(group),
            "latency_p50_s": pct(lat, 50),
            "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99),
            "latency_mean_s": statistics.fmean(lat),
        }
    return out


def rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(o).items() if k not in ("text", "token_times")} for o in outcomes]


def save(name: str, report: dict[str, Any]) -> Path:
    """Write the report, with the load average at the end: the machine is shared and noisy."""
    report.setdefault("load_average_1m_at_end", os.getloadavg()[0])
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def fit_profile(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """Service time = overhead + prompt/prefill + tokens/decode, fitted by least squares to requests
    served back to back (each one's service is the gap since the previous one ended)."""
    import numpy as np

    ordered = sorted(outcomes, key=lambda o: o.end)
    xs, ys = [], []
    for prev, cur in itertools.pairwise(ordered):
        start = max(prev.end, cur.sent)
        xs.append([1.0, cur.prompt_tokens, cur.gen_tokens])
        ys.append(cur.end - start)
    coef, *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    overhead, per_prompt, per_token = (float(c) for c in coef)
    return {
        "overhead_s": max(overhead, 0.0),
        "prefill_tok_s": 1 / per_prompt if per_prompt > 0 else float("inf"),
        "decode_tok_s": 1 / per_token,
    }
