"""Server overhead: `edgeserve serve` over HTTP vs the Engine in-process, same model, prompt and settings,
one run.

The server runs as its own process (the real `serve` command, as deployed) on loopback; the
in-process side is an Engine in this process. Both are timed from the caller's side with the same
clock: TTFT is request start → first text (the first SSE chunk with content, or the first
TokenEvent), decode tok/s is (tokens - 1) / (last token - first token) as the caller receives them.
Each repetition runs both sides on the same token prompt (500 tokens, a window starting at a
different place each time so no side reuses a cached prefix) and generates 128 tokens (greedy, EOS
ignored), alternating which side goes first. Reported: medians per side and the ratios server/engine,
also paired per repetition; and, for each server request, the client's timings against the server's
own engine timings of that same generation (from /metrics), which isolate the HTTP layer from load
drift between generations on a shared machine.

    python bench/server_overhead.py [--reps 7] [--prompt-tokens 500] [--gen-tokens 128] [--threads 1]

On a shared two-core machine use --threads 1: llama.cpp with two threads degrades badly when another
process holds a core, and the server's event loop and this client need a core of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from _plots import side_by_side  # noqa: E402
from engine_vs_raw import prompt_text  # noqa: E402 (the same prompt source as the engine benchmark)


def engine_run(engine: Any, tokens: list[int], n_gen: int) -> tuple[float, float, float]:
    """TTFT (s), decode tok/s and end-to-end seconds through the Engine, timed by the caller."""
    from edgeserve import SamplingParams, TokenEvent

    start = time.perf_counter()
    stamps = []
    for event in engine.submit(tokens, SamplingParams(max_tokens=n_gen, temperature=0, ignore_eos=True)):
        if isinstance(event, TokenEvent) and event.text:
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    return _timings(start, stamps, end, n_gen)


def engine_side(client: Any) -> tuple[float, float]:
    """The server's own engine timings so far (sums of TTFT and of seconds per token over requests
    to /v1/completions), from /metrics: their change over one request is that request's."""
    text = client.get("/metrics").text

    def value(name: str) -> float:
        match = re.search(rf'^{name}_sum{{endpoint="/v1/completions",model="default"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    return value("edgeserve_time_to_first_token_seconds"), value("edgeserve_time_per_output_token_seconds")


def server_run(client: Any, tokens: list[int], n_gen: int) -> tuple[float, float, float]:
    """The same through POST /v1/completions with stream: true, timed by the client."""
    body = {"model": "default", "prompt": tokens, "max_tokens": n_gen, "temperature": 0, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps = []
    usage = None
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    assert usage is not None and usage["completion_tokens"] == n_gen, usage
    return _timings(start, stamps, end, n_gen)


def _timings(start: float, stamps: list[float], end: float, n_gen: int) -> tuple[float, float, float]:
    # Text arrives per token except where a multi-byte character spans tokens; the rate counts tokens.
    return stamps[0] - start, (n_gen - 1) / (stamps[-1] - stamps[0]), end - start


def start_server(port: int, threads: int, n_ctx: int) -> subprocess.Popen[bytes]:
    code = "from edgeserve.server.cli import serve; serve()"
    args = ["--port", str(port), "--model", "default", "--backend", "llama", "--n-ctx", str(n_ctx)]
    args += ["--threads", str(threads), "--log-level", "warning"]
    return subprocess.Popen([sys.executable, "-c", code, *args])


def wait_up(client: Any, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=500)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import httpx

    from edgeserve import Engine, ModelSettings

    settings = ModelSettings(model="default", backend="llama", n_ctx=2048)
    if args.threads:
        settings = settings.model_copy(update={"threads": args.threads})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()
    server = start_server(port, settings.threads, settings.n_ctx)
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client,
            Engine.from_settings(settings) as engine,
        ):
            wait_up(client)
            base = engine.tokenize(prompt_text())
            n_prompt = args.prompt_tokens
            if len(base) < n_prompt + args.reps + 1:
                raise SystemExit(f"prompt text too short: {len(base)} tokens")
            # Warm both (page in the weights, allocate buffers, open the connection) before measuring.
            engine_run(engine, base[1 : n_prompt // 2], 8)
            server_run(client, base[: n_prompt // 2], 8)

            rows = []
            for rep in range(args.reps):
                tokens = [base[0], *base[2 + rep : 1 + rep + n_prompt]]
                sides = [
                    ("engine", lambda t=tokens: engine_run(engine, t, args.gen_tokens)),
                    ("server", lambda t=tokens: server_run(client, t, args.gen_tokens)),
                ]
                if rep % 2:
                    sides.reverse()
                for name, fn in sides:
                    before = engine_side(client)
                    ttft, rate, total = fn()
                    row = {"rep": rep, "side": name, "ttft_s": ttft, "decode_tok_s": rate, "e2e_s": total}
                    if name == "server":  # the same generation as the server's engine timed it
                        after = engine_side(client)
                        row["engine_side_ttft_s"] = after[0] - before[0]
                        row["engine_side_decode_tok_s"] = 1.0 / (after[1] - before[1])
                    rows.append(row)
                    print(
                        f"rep {rep} {name:>6}: TTFT {ttft * 1000:7.1f} ms  decode {rate:6.1f} tok/s  "
                        f"e2e {total:6.2f} s",
                        flush=True,
                    )
    finally:
        server.terminate()
        server.wait(timeout=60)
    load_after = os.getloadavg()

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["side"] == side)

    summary = {
        side: {
            "ttft_ms_p50": med(side, "ttft_s") * 1000,
            "decode_tok_s_p50": med(side, "decode_tok_s"),
            "e2e_s_p50": med(side, "e2e_s"),
        }
        for side in ("engine", "server")
    }

    def ratio(key: str) -> float:
        return summary["server"][key] / summary["engine"][key]

    def paired(key: str) -> float:
        # Per repetition, server over engine on the same prompt: load drift between repetitions on a
        # shared machine cancels out of these, not out of the ratio of medians.
        by_rep = {(r["rep"], r["side"]): r[key] for r in rows}
        return statistics.median(by_rep[(rep, "server")] / by_rep[(rep, "engine")] for rep in range(args.reps))

    ratios = {
        "decode_tok_s_server_over_engine": ratio("decode_tok_s_p50"),
        "ttft_server_over_engine": ratio("ttft_ms_p50"),
        "e2e_server_over_engine": ratio("e2e_s_p50"),
        "paired_median": {
            "decode_tok_s_server_over_engine": paired("decode_tok_s"),
            "ttft_server_over_engine": paired("ttft_s"),
            "e2e_server_over_engine": paired("e2e_s"),
        },
    }
    server_rows = [r for r in rows if r["side"] == "server"]
    within_request = {
        # Client-observed over engine-observed, on the very same generation: what the HTTP layer adds,
        # free of the load drift between separate generations.
        "ttft_added_ms_p50": statistics.median((r["ttft_s"] - r["engine_side_ttft_s"]) * 1000 for r in server_rows),
        "decode_tok_s_client_over_engine_p50": statistics.median(
            r["decode_tok_s"] / r["engine_side_decode_tok_s"] for r in server_rows
        ),
    }
    report = {
        "benchmark": "server_overhead",
        "command": " ".join(["python", "bench/server_overhead.py", *sys.argv[1:]]),
        "model": "default (Gemma 3 270M Q4_K_M)",
        "transport": "POST /v1/completions, stream: true, token-id prompt, loopback, server in its own process",
        "prompt_tokens": n_prompt,
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "threads": settings.threads,
        "load_average_before_after": [load_before[0], load_after[0]],
        "machine": {"system": platform.system(), "machine": platform.machine(), "cores": os.cpu_count()},
        "summary": summary,
        "ratios": ratios,
        "server_within_request": within_request,
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "server_overhead.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "server_overhead.png")
    print(json.dumps({"summary": summary, "ratios": ratios, "server_within_request": within_request}, indent=2))


def plot(report: dict[str, Any], path: Path) -> None:
    r = report["ratios"]
    side_by_side(
        report["rows"],
        [("engine", "engine in-process"), ("server", "edgeserve serve (HTTP SSE)")],
        [("ttft_s", 1000, "TTFT (ms)"), ("decode_tok_s", 1, "decode (tok/s)")],
        f"{report['prompt_tokens']}-token prompt, {report['gen_tokens']} tokens, {report['threads']} thread(s): "
        f"decode ratio {r['decode_tok_s_server_over_engine']:.3f}, TTFT ratio {r['ttft_server_over_engine']:.3f}",
        path,
    )


if __name__ == "__main__":
    main()
