"""Decode rate per sequence and in aggregate for N = 1..8 concurrent long answers (issue 18).

For each N, a fresh ``edgeserve serve --parallel N`` (and, for reference, llama.cpp's
``llama-server -np N -c N*ctx``, built by ``bench/build_llama_server.sh``), every server at
``--threads`` (2), default model. N different long-class prompts of the Clairvoyant labeled oasst1
set are sent at once, streamed over loopback HTTP, each answering ``--tokens`` greedy tokens
(``ignore_eos``; every request has the same ``max_tokens``, so it tells no scheduler anything).

Figures per N (median over ``--reps``):
- ``steady_aggregate_tok_s``: chunks streamed by all N answers between the moment the last one
  started (its first token) and the moment the first one ended, over that window: the decode rate
  with N sequences in the batch, prefill excluded;
- ``steady_per_sequence_tok_s``: the same divided by N;
- ``per_request_tok_s_p50``: each answer's own (tokens - 1) / (last chunk - first chunk), median;
- ``overall_aggregate_tok_s``: all tokens / (last end - first send), prefill and ramp included.
``speedup_vs_n1`` divides each steady aggregate by the same server's N = 1 figure.

    nice -n 5 .venv/bin/python bench/batch_scaling.py [--max-n 8] [--tokens 96] [--reps 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from batch_burst import has_parallel_flag, llama_server_binary

COMMON = {"seed": 0, "cache_prompt": False}


def long_jobs(n: int, tokens: int, seed: int) -> list[h.Job]:
    rows = [r for r in h.workload_rows() if h.length_class(int(r["actual_output_tokens"])) == "long"]
    picked = random.Random(seed).sample(rows, n)
    return [
        h.Job(f"n{n}r{seed}j{i}", r["prompt"], int(r["actual_output_tokens"]), tokens) for i, r in enumerate(picked)
    ]


def rates(outcomes: Sequence[h.Outcome]) -> dict[str, float]:
    last_start = max(o.token_times[0] for o in outcomes)
    first_end = min(o.token_times[-1] for o in outcomes)
    window = first_end - last_start
    inside = sum(last_start < t <= first_end for o in outcomes for t in o.token_times)
    own = [(len(o.token_times) - 1) / (o.token_times[-1] - o.token_times[0]) for o in outcomes]
    span = max(o.end for o in outcomes) - min(o.sent for o in outcomes)
    out = {
        "per_request_tok_s_p50": statistics.median(own),
        "overall_aggregate_tok_s": sum(o.completion_tokens or o.tokens_seen for o in outcomes) / span,
        "window_s": window,
        "ttft_max_s": max(o.ttft_s for o in outcomes),
    }
    if window > 0:
        out["steady_aggregate_tok_s"] = inside / window
        out["steady_per_sequence_tok_s"] = inside / window / len(outcomes)
    return out


@contextlib.contextmanager
def server(kind: str, n: int, args: argparse.Namespace, binary: str) -> Iterator[h.Served]:
    if kind == "llama-server":
        with h.llama_server(binary, args.threads, n, args.ctx_per_slot) as served:
            yield served
    else:
        with h.serve(None, args.threads, n_ctx=None, extra=["--parallel", str(n)]) as served:
            yield served


def run_n(kind: str, n: int, args: argparse.Namespace, binary: str) -> dict[str, Any]:
    reps = []
    with server(kind, n, args, binary) as served:
        h.warm(served.url)
        for rep in range(args.reps):
            jobs = long_jobs(n, args.tokens, args.seed + rep)
            load = os.getloadavg()[0]
            cpu = served.cpu_s()
            outcomes = asyncio.run(h.run_load(served.url, jobs, [0.0] * n, {**COMMON, "max_tokens": args.tokens}))
            figures = rates(outcomes) | {"server_cpu_s": served.cpu_s() - cpu, "load_average_1m": load}
            figures["answers_short_of_tokens"] = sum(
                (o.completion_tokens or o.tokens_seen) < args.tokens for o in outcomes
            )
            reps.append(figures)
    keys = sorted({k for r in reps for k in r if isinstance(r[k], float)})
    medians = {k: statistics.median(r[k] for r in reps if k in r) for k in keys}
    return {"reps": reps, "median": medians}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-per-slot", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--servers", nargs="*", default=["edgeserve", "llama-server"])
    ap.add_argument("--name", default="batch_scaling")
    ap.add_argument("--from", dest="source", type=Path, help="re-plot a saved run, run nothing")
    args = ap.parse_args()
    if args.source:
        plot(json.loads(args.source.read_text()), h.OUT / f"{args.source.stem}.png")
        return
    kinds = [k for k in args.servers if k != "edgeserve" or has_parallel_flag()]
    binary = llama_server_binary() if "llama-server" in kinds else ""
    report: dict[str, Any] = {
        "benchmark": "batch_scaling",
        "command": f"nice -n {os.nice(0)} python " + " ".join(sys.argv),
        "workload": f"N long-class prompts of ../shared/data/clairvoyant-labeled/oasst1_labeled.csv (seeds "
        f"{args.seed}..{args.seed + args.reps - 1}), {args.tokens} greedy tokens each (ignore_eos), sent at once",
        "servers": {
            "edgeserve": f"edgeserve serve --backend llama --threads {args.threads} --parallel N",
            "llama-server": f"llama-server -t {args.threads} -tb {args.threads} -np N -c N*{args.ctx_per_slot} "
            "-fa off --no-jinja --chat-template gemma",
        },
        "skipped": [k for k in args.servers if k not in kinds],
        "threads": args.threads,
        "niceness": os.nice(0),
        "load_average_at_start": os.getloadavg(),
        "code_at_start": h.code_version(),
        "results": {k: {} for k in kinds},
    }
    started = time.monotonic()
    for n in range(1, args.max_n + 1):
        for kind in kinds:
            result = run_n(kind, n, args, binary)
            report["results"][kind][str(n)] = result
            m = result["median"]
            print(
                f"{kind} N={n}: steady {m.get('steady_aggregate_tok_s', 0):.1f} tok/s aggregate, "
                f"{m.get('steady_per_sequence_tok_s', 0):.1f} per sequence, "
                f"per request {m['per_request_tok_s_p50']:.1f}",
                flush=True,
            )
        finish(report, args.name)
    report["wall_s"] = time.monotonic() - started
    report["load_average_at_end"] = os.getloadavg()
    report["code_at_end"] = h.code_version()
    finish(report, args.name)


def finish(report: dict[str, Any], name: str) -> None:
    for per_n in report["results"].values():
        one = per_n.get("1", {}).get("median", {}).get("steady_aggregate_tok_s")
        for result in per_n.values():
            agg = result["median"].get("steady_aggregate_tok_s")
            if one and agg:
                result["speedup_vs_n1"] = agg / one
    path = h.save(name, report)
    plot(report, path.with_suffix(".png"))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, per_n in report["results"].items():
        ns = sorted(int(n) for n in per_n)
        for ax, key in zip(axes, ("steady_aggregate_tok_s", "steady_per_sequence_tok_s"), strict=True):
            ax.plot(ns, [per_n[str(n)]["median"].get(key) for n in ns], "o-", label=kind)
    for ax, label in zip(axes, ("aggregate decode tok/s", "decode tok/s per sequence"), strict=True):
        ax.set_xlabel("concurrent sequences N")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(f"Decode rate with N long answers at once, 2-core CPU, {report['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
