"""Proxy overhead with one client: the same streamed requests straight to the upstream and through
``edgeserve proxy``, alternating, in one run. Targets (issue 5): TTFT p50 +<= 1 ms, streamed tok/s
>= 0.99x.

    python bench/proxy_overhead.py [--reps 20] [--tokens 64] [--threads 2] [--model-free]

``--model-free`` fronts a streaming upstream with no model (bench/_echo_upstream.py, 5 ms per chunk):
with the model's prefill and decode jitter gone, what remains is the proxy's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from _plots import side_by_side


def rate(o: h.Outcome) -> float:
    return (o.tokens_seen - 1) / (o.end - o.first_token)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-free", action="store_true", help="front a model-free streaming upstream")
    args = ap.parse_args()

    jobs = [h.Job(f"o{i}", j.prompt, j.real_tokens, args.tokens) for i, j in enumerate(h.workload(args.reps, 1.0, 7))]
    rows: list[dict[str, Any]] = []
    upstream = h.echo_upstream() if args.model_free else h.upstream(args.threads)
    with upstream as up, h.proxy(up, "sjf") as px:
        asyncio.run(h.run_load(px, jobs[:2], [0.0, 0.0]))  # warm both paths
        for i, job in enumerate(jobs):
            sides = [("direct", up), ("proxy", px)] if i % 2 == 0 else [("proxy", px), ("direct", up)]
            for side, base in sides:
                (o,) = asyncio.run(h.run_load(base, [job], [0.0]))
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
    report = {
        "benchmark": "proxy_overhead",
        "upstream": "model-free echo (bench/_echo_upstream.py)" if args.model_free else "edgeserve serve",
        "reps": len(jobs),
        "gen_tokens": args.tokens,
        "threads": args.threads,
        "prompts": "Clairvoyant labeled oasst1 (seed 7), one per rep, as chat messages",
        "summary": med,
        "ttft_added_ms_p50": statistics.median((p["ttft_s"] - d["ttft_s"]) * 1000 for p, d in pairs),
        "tok_s_ratio_p50": statistics.median(p["tok_s"] / d["tok_s"] for p, d in pairs),
        "targets": {"ttft_added_ms_p50": "<= 1.0", "tok_s_ratio_p50": ">= 0.99"},
        "rows": rows,
    }
    path = h.save("proxy_overhead", report)
    plot(report, path.with_suffix(".png"))
    print({k: report[k] for k in ("summary", "ttft_added_ms_p50", "tok_s_ratio_p50")})


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
