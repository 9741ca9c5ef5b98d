"""Proxy overhead with one client: the same streamed requests straight to the upstream and through
``edgeserve proxy``, alternating, in one run. Targets (issue 5): TTFT p50 +<= 1 ms, streamed tok/s
>= 0.99x.

    python bench/proxy_overhead.py [--reps 40] [--tokens 64] [--threads 2] [--prefill warm|cold]
    python bench/proxy_overhead.py --model-free [--late-headers] [--reps 40] [--tokens 16]

Each prompt goes to both sides of a pair, so the upstream's prefix cache must treat both alike:
``--prefill warm`` (default) sends the prompt once, untimed, before the pair, so both sides find it
cached and TTFT is one token's evaluation plus the HTTP path (little jitter left to hide a 1 ms
effect); ``--prefill cold`` sends a seed, which makes edgeserve's engine prefill from scratch
(reproducible text needs the same evaluation path), so both sides pay a new prompt's full prefill,
and the prefill's jitter (tens of ms with every core busy) comes with it. The report gives a
bootstrap 95% interval for each paired median, so a figure that noise could explain says so.

``--model-free`` fronts a streaming upstream with no model (bench/_echo_upstream.py, 5 ms per chunk):
with the model's prefill and decode jitter gone, what remains is the proxy's own cost. With
``--late-headers`` that upstream sends its headers together with the first token, as Ollama does, so
the proxy's handling of the response headers is on the time to first token too.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from _plots import side_by_side

COLD = {"seed": 0}


def rate(o: h.Outcome) -> float:
    return (o.tokens_seen - 1) / (o.end - o.first_token)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", choices=("warm", "cold"), default="warm")
    ap.add_argument("--model-free", action="store_true", help="front a model-free streaming upstream")
    ap.add_argument(
        "--late-headers", action="store_true", help="model-free: headers come with the first token, as Ollama's do"
    )
    args = ap.parse_args()
    extra = COLD if args.prefill == "cold" and not args.model_free else None

    jobs = [h.Job(f"o{i}", j.prompt, j.real_tokens, args.tokens) for i, j in enumerate(h.workload(args.reps, 1.0, 7))]
    rows: list[dict[str, Any]] = []
    upstream = h.echo_upstream(args.late_headers) if args.model_free else h.upstream(args.threads)
    with upstream as up, h.proxy(up, "sjf") as px:
        asyncio.run(h.run_load(px, jobs[:2], [0.0, 0.0]))  # warm both paths
        for i, job in enumerate(jobs):
            if args.prefill == "warm" and not args.model_free:
                asyncio.run(h.run_load(up, [job], [0.0]))
            sides = [("direct", up), ("proxy", px)] if i % 2 == 0 else [("proxy", px), ("direct", up)]
            for side, base in sides:
                (o,) = asyncio.run(h.run_load(base, [job], [0.0], extra))
                rows.append({"rep": i, "side": side, "ttft_s": o.ttft_s, "tok_s": rate(o), "tokens": o.tokens_seen})
    med = {
        side: {
            "ttft_ms_p50": statistics.median(r["ttft_s"] for r in rows if r["side"] == side) * 1000,
            "tok_s_p50": statistics.median(r["tok_s"] for r in rows if r["side"] == side),
        }
        for side in ("direct", "proxy")
    }
    # Same prompt on both sides of a pair: per-pair differences cancel most of the machine's noise.
    pairs = [
        (
            next(r for r in rows if r["rep"] == i and r["side"] == "proxy"),
            next(r for r in rows if r["rep"] == i and r["side"] == "direct"),
        )
        for i in range(len(jobs))
    ]
    ttft_added = [(p["ttft_s"] - d["ttft_s"]) * 1000 for p, d in pairs]
    tok_ratio = [p["tok_s"] / d["tok_s"] for p, d in pairs]
    report = {
        "benchmark": "proxy_overhead",
        "upstream": (
            f"model-free echo (bench/_echo_upstream.py{' --late-headers' if args.late_headers else ''})"
            if args.model_free
            else "edgeserve serve"
        ),
        "reps": len(jobs),
        "gen_tokens": args.tokens,
        "threads": args.threads,
        "prefill": None if args.model_free else args.prefill,
        "prompts": "Clairvoyant labeled oasst1 (seed 7), one per rep, as chat messages",
        "summary": med,
        "ttft_added_ms_p50": statistics.median(ttft_added),
        "ttft_added_ms_p50_ci95": bootstrap_median_ci(ttft_added),
        "tok_s_ratio_p50": statistics.median(tok_ratio),
        "tok_s_ratio_p50_ci95": bootstrap_median_ci(tok_ratio),
        "targets": {"ttft_added_ms_p50": "<= 1.0", "tok_s_ratio_p50": ">= 0.99"},
        "rows": rows,
    }
    if args.model_free:
        name = "proxy_overhead_model_free" + ("_late_headers" if args.late_headers else "")
    else:
        name = "proxy_overhead" + ("_cold" if args.prefill == "cold" else "")
        name += "" if args.threads == 2 else f"_threads{args.threads}"
    path = h.save(name, report)
    plot(report, path.with_suffix(".png"))
    keys = ("summary", "ttft_added_ms_p50", "ttft_added_ms_p50_ci95", "tok_s_ratio_p50", "tok_s_ratio_p50_ci95")
    print({k: report[k] for k in keys})


def bootstrap_median_ci(values: list[float], resamples: int = 2000) -> list[float]:
    """95% percentile-bootstrap interval of the median (fixed seed: the same rows give the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def plot(report: dict[str, Any], path: Path) -> None:
    side_by_side(
        report["rows"],
        [("direct", "direct to upstream"), ("proxy", "through proxy")],
        [("ttft_s", 1000, "TTFT (ms)"), ("tok_s", 1, "streamed tok/s")],
        f"one client: TTFT +{report['ttft_added_ms_p50']:.2f} ms (p50 of pairs), "
        f"tok/s x{report['tok_s_ratio_p50']:.3f}",
        path,
    )


if __name__ == "__main__":
    main()
