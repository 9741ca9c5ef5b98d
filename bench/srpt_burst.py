"""Burst straight at ``edgeserve serve``: FCFS vs SJF vs SRPT vs SRPT without a predictor, one run.

Issue 12, benchmarks 1 and 2. Each policy is its own ``edgeserve serve --policy P`` process on the
default model (llama.cpp, one thread). A burst is ``--n`` prompts of the Clairvoyant labeled oasst1
set sent at once, each answer its real length times ``--scale`` (the workload of ``sjf_burst.py``);
classes are the real lengths' (short < 200 tokens, long >= 800).

How answers end without telling the scheduler their length. The engine bounds a request's predicted
length by its ``max_tokens``, so ``max_tokens`` = the scaled length (what ``sjf_burst.py`` sends
through the proxy, which ignores it) would make SJF and SRPT oracles here. So FCFS runs first with
that ``max_tokens`` (FCFS reads no length), greedy and seeded; its text gives each answer a stop
sequence that ends the same greedy text at the same token, and every later run sends that stop
sequence and one cap for all (``_harness.UNIFORM_MAX_TOKENS``). Each run checks that every answer
still has the FCFS run's token count.

Aging: by default each server derives its own (the engine's default, which learns from answers that
end naturally, as these do); ``--aging short-service`` sets it as ``sjf_burst.py`` does instead.
The code version (commit, uncommitted engine files) is recorded at the start and the end: every run
starts fresh servers, so an engine change landing mid-run would mix versions.

Per burst: latency P50 by class and the makespan, as ratios to FCFS; preemptions, parked bytes and
park/resume seconds from the server's metrics; and the oracle bound: SJF by the answer lengths the
FCFS run measured (with every request there at once, that is what SRPT with a perfect predictor does).

Targets (issue 12): SRPT short P50 <= 0.15x FCFS, long P50 <= 1.10x, makespan <= 1.03x; without a
predictor, SRPT short P50 <= 0.5x.

    nice -n 10 python bench/srpt_burst.py [--n 48] [--scale 0.0625] [--bursts 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from _plots import side_by_side
from sjf_burst import short_service_s

from edgeserve.settings import AGING_FACTOR

#: (name, policy, extra serve flags); FCFS first: its answers give the others their stop sequences.
CONFIGS = (
    ("fcfs", "fcfs", ()),
    ("sjf", "sjf", ()),
    ("srpt", "srpt", ()),
    ("srpt-no-predictor", "srpt", ("--no-predict-lengths",)),
)
COUNTERS = ("preemptions", "parked_bytes", "park_seconds", "resume_seconds")
#: Per run, besides the counters: the server's CPU seconds for the burst (makespan in work, not wall time).
CPU = "server_cpu_seconds"
TARGETS = {
    "srpt": {"short_latency_p50": 0.15, "long_latency_p50": 1.10, "makespan": 1.03},
    "srpt-no-predictor": {"short_latency_p50": 0.5},
}
SEED = {"seed": 0}  # a seeded request never reuses a cached prefix: the same evaluation path, the same text


def makespan(outcomes: list[h.Outcome]) -> float:
    return max(o.end for o in outcomes) - min(o.sent for o in outcomes)


def oracle(fcfs: list[h.Outcome]) -> list[h.Outcome]:
    """The burst served shortest-first by each request's service time as the FCFS run measured it
    (the gap since the previous one ended), back to back from the first request's start."""
    ordered = sorted(fcfs, key=lambda o: o.end)
    services = {ordered[0].job_id: ordered[0].end - ordered[0].sent}
    services |= {cur.job_id: cur.end - max(prev.end, cur.sent) for prev, cur in itertools.pairwise(ordered)}
    t = min(o.sent for o in fcfs)
    out = []
    for o in sorted(fcfs, key=lambda o: services[o.job_id]):
        t += services[o.job_id]
        out.append(h.Outcome(o.job_id, o.cls, o.real_tokens, o.gen_tokens, o.sent, t, t, 0, None, o.prompt_tokens))
    return out


def ratios(summary: dict[str, Any], fcfs: dict[str, Any], span: float, fcfs_span: float) -> dict[str, float]:
    out = {
        f"{cls}_latency_p50": summary[cls]["latency_p50_s"] / fcfs[cls]["latency_p50_s"]
        for cls in h.CLASSES
        if cls in summary and cls in fcfs
    }
    out["long_latency_p99"] = summary["long"]["latency_p99_s"] / fcfs["long"]["latency_p99_s"]
    out["makespan"] = span / fcfs_span
    # Each run's latencies as fractions of its own makespan: another process taking CPU during a run
    # stretches all its times alike, and this cancels that (it also hides a real makespan cost).
    for cls in ("short", "long"):
        if cls in summary and cls in fcfs:
            out[f"{cls}_latency_p50_over_makespan"] = out[f"{cls}_latency_p50"] / out["makespan"]
    return out


def cpu_ratio(config: dict[str, Any], fcfs: dict[str, Any]) -> dict[str, float]:
    """The burst's server CPU seconds against FCFS's (runs before this counter have none)."""
    ours, theirs = config["server_counters"].get(CPU), fcfs["server_counters"].get(CPU)
    return {"server_cpu": ours / theirs} if ours and theirs else {}


def run_config(
    name: str, policy: str, flags: tuple[str, ...], jobs: list[h.Job], args: argparse.Namespace, fields: Any
) -> tuple[list[h.Outcome], dict[str, float]]:
    with h.serve(policy, args.threads, n_ctx=args.n_ctx, extra=flags) as server:
        h.warm(server.url)
        before, cpu = h.scrape(server.url), server.cpu_s()
        outcomes = asyncio.run(h.run_load(server.url, jobs, [0.0] * len(jobs), SEED, fields))
        after, cpu = h.scrape(server.url), server.cpu_s() - cpu
    counters = {c: after.get(f"edgeserve_{c}_total", 0.0) - before.get(f"edgeserve_{c}_total", 0.0) for c in COUNTERS}
    counters["server_cpu_seconds"] = cpu
    return outcomes, counters


def run_burst(jobs: list[h.Job], args: argparse.Namespace) -> dict[str, Any]:
    """One burst under each configuration in turn, a fresh server each."""
    burst: dict[str, Any] = {"classes": {c: sum(j.cls == c for j in jobs) for c in h.CLASSES}, "configs": {}}
    results: dict[str, list[h.Outcome]] = {}
    fields: list[dict[str, Any]] | None = None
    for name, policy, flags in CONFIGS:
        by_bench = args.aging == "short-service" and policy != "fcfs"
        aging = ("--aging-s", f"{burst['short_service_aging_s']:.3f}") if by_bench else ()
        extra = (*flags, *aging)
        outcomes, counters = run_config(name, policy, extra, jobs, args, fields)
        results[name] = outcomes
        entry: dict[str, Any] = {
            "flags": list(extra),
            "summary": h.summarize(outcomes),
            "makespan_s": makespan(outcomes),
        }
        entry["server_counters"] = counters
        if fields is not None:
            want = {o.job_id: o.completion_tokens for o in results["fcfs"]}
            entry["answers_off_length"] = [o.job_id for o in outcomes if o.completion_tokens != want[o.job_id]]
        entry["rows"] = h.rows(outcomes)
        burst["configs"][name] = entry
        if name == "fcfs":
            # --aging short-service: as sjf_burst.py sets it (there answers end by max_tokens, which
            # teaches the engine's derived aging nothing). Here they end by stop sequences, so by
            # default the engine derives its own, as a server does out of the box.
            burst["short_service_aging_s"] = AGING_FACTOR * short_service_s(outcomes)
            stops = h.ended_by_stop(outcomes)
            fields = [stops[j.job_id] for j in jobs]
            burst["answers_ended_by_max_tokens"] = sum("stop" not in f for f in fields)
    bound = oracle(results["fcfs"])
    burst["oracle"] = {"summary": h.summarize(bound), "makespan_s": makespan(bound)}
    burst["load_average_1m"] = os.getloadavg()[0]
    return burst


def burst_ratios(burst: dict[str, Any]) -> dict[str, dict[str, float]]:
    fcfs = burst["configs"]["fcfs"]
    return {
        name: ratios(data["summary"], fcfs["summary"], data["makespan_s"], fcfs["makespan_s"])
        | (cpu_ratio(data, fcfs) if name != "oracle" else {})
        for name, data in [*burst["configs"].items(), ("oracle", burst["oracle"])]
        if name != "fcfs"
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def over_bursts(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over bursts of every ratio, and of the server counters per burst."""
    out: dict[str, Any] = {}
    for name in bursts[0]["ratios_vs_fcfs"]:
        keys = sorted({k for b in bursts for k in b["ratios_vs_fcfs"][name]})
        out[name] = {
            k: spread([b["ratios_vs_fcfs"][name][k] for b in bursts if k in b["ratios_vs_fcfs"][name]]) for k in keys
        }
        if name in bursts[0]["configs"]:
            out[name]["server_counters"] = {
                c: spread(
                    [
                        b["configs"][name]["server_counters"][c]
                        for b in bursts
                        if c in b["configs"][name]["server_counters"]
                    ]
                )
                for c in (*COUNTERS, CPU)
                if any(c in b["configs"][name]["server_counters"] for b in bursts)
            }
    return out


def verdicts(medians: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            k: {"target": f"<= {t}", "median": medians[name][k]["median"], "met": medians[name][k]["median"] <= t}
            for k, t in wanted.items()
        }
        for name, wanted in TARGETS.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--scale", type=float, default=1 / 16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=2048, help="prompts here are <= ~420 tokens, plus the 1024 cap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bursts", type=int, default=5, help="bursts of different prompts (seeds seed, seed+1, ...)")
    ap.add_argument("--name", default="srpt_burst")
    ap.add_argument(
        "--aging",
        choices=("engine", "short-service"),
        default="engine",
        help="engine: the server derives aging itself (its default); short-service: --aging-s = "
        "AGING_FACTOR x the FCFS run's short-request service time, as sjf_burst.py",
    )
    ap.add_argument("--from", dest="source", type=Path, help="recompute the ratios of a saved run, run nothing")
    args = ap.parse_args()
    if args.source:
        report = json.loads(args.source.read_text())
        finish(report, args.source.stem)
        return

    report: dict[str, Any] = {
        "benchmark": "srpt_burst",
        "command": "nice -n 10 python " + " ".join(sys.argv),
        "workload": f"{args.n} prompts of ../shared/data/clairvoyant-labeled/oasst1_labeled.csv per burst "
        f"(seeds {args.seed}..{args.seed + args.bursts - 1}, as sjf_burst.py), each answer the greedy, seeded "
        f"text of round(actual_output_tokens * {args.scale:.4f}) tokens; sent all at once",
        "server": f"edgeserve serve --policy P --backend llama --threads {args.threads} --n-ctx {args.n_ctx}, "
        "default model (Gemma 3 270M Q4_K_M), a fresh process per policy and burst, one warm-up request each",
        "answer_ends": "FCFS: max_tokens = the scaled length. The others: a stop sequence taken from the FCFS "
        f"run's text and max_tokens = {h.UNIFORM_MAX_TOKENS} for all (see the module docstring)",
        "aging": "derived by each server (EngineSettings default: AGING_FACTOR x its measured short-request "
        "service, 60 s until it has measured one)"
        if args.aging == "engine"
        else "--aging-s = AGING_FACTOR x the FCFS run's short-request service (burst['short_service_aging_s'])",
        "threads": args.threads,
        "niceness": os.nice(0),
        "cpus": os.cpu_count(),
        "code_at_start": h.code_version(),
        "bursts": [],
    }
    for seed in range(args.seed, args.seed + args.bursts):
        burst = run_burst(h.workload(args.n, args.scale, seed), args)
        burst["seed"] = seed
        burst["ratios_vs_fcfs"] = burst_ratios(burst)
        report["bursts"].append(burst)
        print(seed, {k: {m: round(x, 3) for m, x in v.items()} for k, v in burst["ratios_vs_fcfs"].items()}, flush=True)
        report["code_at_end"] = h.code_version()
        finish(report, args.name)  # after every burst: a run cut short keeps what it measured


def finish(report: dict[str, Any], name: str) -> None:
    """Ratios per burst, their medians and ranges over bursts, the verdicts; save and plot."""
    for burst in report["bursts"]:
        burst["ratios_vs_fcfs"] = burst_ratios(burst)
    report["ratios_vs_fcfs_over_bursts"] = over_bursts(report["bursts"])
    report["targets"] = verdicts(report["ratios_vs_fcfs_over_bursts"])
    path = h.save(name, report)
    plot(report, path.with_suffix(".png"))
    print("median over bursts:", json.dumps(report["targets"], indent=1))


def plot(report: dict[str, Any], path: Path) -> None:
    rows = [{"side": name, **ratio} for burst in report["bursts"] for name, ratio in burst["ratios_vs_fcfs"].items()]
    sides = [("sjf", "SJF"), ("srpt", "SRPT"), ("srpt-no-predictor", "SRPT\nno pred."), ("oracle", "oracle\nSJF")]
    metrics = [
        ("short_latency_p50", 1.0, "short P50 / FCFS"),
        ("long_latency_p50", 1.0, "long P50 / FCFS"),
        ("makespan", 1.0, "makespan / FCFS"),
    ]
    title = f"Bursts at edgeserve serve: {len(report['bursts'])} draws (dots), medians (bars), SRPT targets (red)"
    side_by_side(rows, sides, metrics, title, path, targets=(0.15, 1.10, 1.03))


if __name__ == "__main__":
    main()
