"""Continuous batching (issue 18): edgeserve serve against llama.cpp's own llama-server, one run.

Servers, all on the default model (Gemma 3 270M Q4_K_M), every one at ``--threads`` (2), all started
once and kept for the whole run (each burst runs on one server at a time; the others sit idle):

- ``llama-server -np 1``: llama.cpp's server, one slot, first come first served;
- ``llama-server -np 4``: four slots, continuous batching, first come first served; ``-c`` is four
  times the one-slot context, so each slot has the same context;
- ``edgeserve``: ``edgeserve serve`` at its defaults (policy, ``--parallel``, ``--n-ctx``);
- ``edgeserve --parallel 1``: the same, one sequence at a time (the engine before batching);
- optional variants beside the default in the same run: ``--edge-parallel N`` (fixed widths) and
  ``--edge-variant "FLAGS"`` (any ``serve`` flags, e.g. ``"--prefill-chunk 1024"``).

llama-server is built from the llama.cpp that llama-cpp-python's sdist vendors, the same revision
edgeserve runs (``bench/build_llama_server.sh``).

Workload: a burst is 12 short and 12 long prompts of the Clairvoyant labeled oasst1 set (unseen by
the length predictor, which trained on ShareGPT; classes by the real answer length, short < 200
tokens, long >= 800), in a seeded random order, sent at once over streaming HTTP on loopback. Each
answer is its real length times ``--scale`` (1/16, to fit this CPU). Draws are bursts of different
prompts (seeds ``--seed``...).

How answers end. Both llama-servers get ``max_tokens`` = the scaled length and ``ignore_eos``
(greedy, seeded): they schedule first come first served, so the length tells them nothing.
edgeserve's scheduler bounds a request's predicted length by ``max_tokens``, which would make it an
oracle, so edgeserve gets one cap for all (``--cap``) and the client closes the stream once it has
the answer's length in chunks (a user pressing stop; edgeserve streams one chunk per token here). A
stop sequence taken from a reference text (``srpt_burst.py``'s way) would not do: llama-server's and
edgeserve's greedy texts differ on some prompts even one at a time, and a batched answer may leave
its solo text, after which the stop never comes. The cut also charges edgeserve for noticing the
closed stream, a cost llama-server is spared. Batch invariance is measured, not assumed: each
server's texts are compared with its one-at-a-time counterpart's (``-np 4`` with ``-np 1``,
``edgeserve`` with ``--parallel 1``).

Per burst and server: short and long latency P50 (finish, from the send), TTFT P50, makespan, p99
and max gap between streamed chunks (all requests pooled), the server's CPU seconds, the load average.
Ratios per draw against ``llama-server -np 4`` and ``-np 1``, then median (and range) over draws.
Targets (issue 18), edgeserve against llama-server -np 4: short P50 <= 0.5x, long P50 <= 1.0x,
makespan <= 1.0x.

Then Poisson arrivals at rho 0.74 and 0.9 on the same servers: the first draw's jobs; the service
profile is fitted on the first draw's ``-np 1`` burst (served back to back), the rate is rho / mean
service time (as ``sjf_poisson.py``), one arrival sequence per rho, the same for every server.

    nice -n 5 .venv/bin/python bench/batch_burst.py [--draws 5] [--threads 2] [--rhos 0.74 0.9]
        [--edge-parallel 16] [--edge-variant "--prefill-chunk 1024"]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from _plots import side_by_side

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "bench" / "build_llama_server.sh"
REF, NP4 = "llama-server -np 1", "llama-server -np 4"
EDGE, EDGE1 = "edgeserve", "edgeserve --parallel 1"
TARGETS = {"short_latency_p50": 0.5, "long_latency_p50": 1.0, "makespan": 1.0}
#: What every request carries: a seed (edgeserve then reuses no cached prefix) and no prompt cache
#: in llama-server either, so every server evaluates every prompt in full.
COMMON = {"seed": 0, "cache_prompt": False}


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "llama" or "edgeserve"
    #: Slots (llama-server -np) or edgeserve --parallel; None: edgeserve's default.
    parallel: int | None
    #: More ``edgeserve serve`` flags (a variant beside the default).
    flags: tuple[str, ...] = ()


CONFIGS = (Config(REF, "llama", 1), Config(NP4, "llama", 4), Config(EDGE, "edgeserve", None))
CONFIG_EDGE1 = Config(EDGE1, "edgeserve", 1)


def has_parallel_flag() -> bool:
    """Whether this edgeserve has batching (``serve --parallel``)."""
    out = subprocess.run([sys.executable, "-m", "edgeserve", "serve", "--help"], capture_output=True, text=True)
    return "--parallel" in out.stdout


def llama_server_binary() -> str:
    """Builds llama-server once (minutes), then returns the cached binary's path at once."""
    out = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def burst_jobs(seed: int, scale: float, per_class: int = 12) -> list[h.Job]:
    """``per_class`` short and ``per_class`` long prompts, seeded, in a seeded random order."""
    rng = random.Random(seed)
    rows = h.workload_rows()
    picked: list[dict[str, str]] = []
    for cls in ("short", "long"):
        picked += rng.sample([r for r in rows if h.length_class(int(r["actual_output_tokens"])) == cls], per_class)
    rng.shuffle(picked)
    return [
        h.Job(
            f"s{seed}j{i}",
            r["prompt"],
            int(r["actual_output_tokens"]),
            max(1, round(int(r["actual_output_tokens"]) * scale)),
        )
        for i, r in enumerate(picked)
    ]


@contextlib.contextmanager
def start(config: Config, args: argparse.Namespace, binary: str) -> Iterator[h.Served]:
    if config.kind == "llama":
        n = config.parallel or 1
        with h.llama_server(binary, args.threads, n, args.ctx_per_slot, args.llama_fa) as served:
            yield served
        return
    extra = ["--parallel", str(config.parallel)] if config.parallel is not None else []
    extra += config.flags
    with h.serve(None, args.threads, n_ctx=None, extra=extra) as served:
        yield served


def command_of(config: Config, args: argparse.Namespace) -> str:
    if config.kind == "llama":
        n = config.parallel or 1
        return (
            f"llama-server -m DEFAULT.gguf -t {args.threads} -tb {args.threads} -np {n} -c {args.ctx_per_slot * n} "
            f"-fa {args.llama_fa} --no-jinja --chat-template gemma"
        )
    flag = f" --parallel {config.parallel}" if config.parallel is not None else ""
    flag += "".join(f" {shlex.quote(f)}" for f in config.flags)
    return f"edgeserve serve --backend llama --threads {args.threads} --max-queue 1024{flag}"


def makespan(outcomes: Sequence[h.Outcome]) -> float:
    return max(o.end for o in outcomes) - min(o.sent for o in outcomes)


def gaps(outcomes: Sequence[h.Outcome]) -> list[float]:
    """Every gap between two streamed chunks of one answer, all answers pooled."""
    return [b - a for o in outcomes for a, b in zip(o.token_times, o.token_times[1:], strict=False)]


def measure(
    served: h.Served, jobs: Sequence[h.Job], arrivals: Sequence[float], ends: Ends, scrape: bool = False
) -> tuple[list[h.Outcome], dict[str, Any]]:
    """One load at one server: outcomes, and the run's figures (summary, makespan, gaps, CPU, load;
    ``scrape``: the change of the server's Prometheus counters, edgeserve's only)."""
    load_before, cpu = os.getloadavg()[0], served.cpu_s()
    before = h.scrape(served.url) if scrape else {}
    outcomes = asyncio.run(h.run_load(served.url, jobs, arrivals, COMMON, ends.fields, ends.cuts))
    cpu = served.cpu_s() - cpu
    after = h.scrape(served.url) if scrape else {}
    pooled = gaps(outcomes)
    figures: dict[str, Any] = {
        "summary": h.summarize(outcomes),
        "makespan_s": makespan(outcomes),
        "gap_p50_s": h.pct(pooled, 50),
        "gap_p99_s": h.pct(pooled, 99),
        "gap_max_s": max(pooled, default=None),
        "server_cpu_s": cpu,
        "tokens": sum(o.completion_tokens or o.tokens_seen for o in outcomes),
        "load_average_1m": [load_before, os.getloadavg()[0]],
    }
    if scrape:
        figures["server_metrics_delta"] = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)}
        figures["server_gauges_after"] = {k: v for k, v in after.items() if not k.endswith("_total")}
    return outcomes, figures


def agreement(outcomes: Sequence[h.Outcome], solo: Sequence[h.Outcome]) -> dict[str, list[str]]:
    """Answers whose greedy, seeded text differs from the same server's one-at-a-time run, and
    answers that streamed fewer tokens than asked (an early end would flatter a server)."""
    ref = {o.job_id: o.text for o in solo}
    return {
        "answers_other_text_than_solo": [o.job_id for o in outcomes if o.text != ref[o.job_id]],
        "answers_short_of_length": [
            o.job_id for o in outcomes if max(o.completion_tokens, o.tokens_seen) < o.gen_tokens
        ],
    }


@dataclass(frozen=True)
class Ends:
    """What ends each answer: request fields, and where the client cuts the stream (None: never)."""

    fields: list[dict[str, Any]]
    cuts: list[int | None]


def request_ends(config: Config, jobs: Sequence[h.Job], cap: int) -> Ends:
    """See the module docstring: the length for llama-server (it reads none); for edgeserve (its
    scheduler reads max_tokens) one cap for all and the client's cut at the answer's length."""
    if config.kind == "llama":
        return Ends([{"max_tokens": j.gen_tokens} for j in jobs], [None] * len(jobs))
    return Ends([{"max_tokens": cap} for _ in jobs], [j.gen_tokens for j in jobs])


def solo_of(name: str, names: Sequence[str]) -> str:
    """The one-at-a-time run a server's texts are compared with."""
    if name.startswith("llama"):
        return REF
    return EDGE1 if EDGE1 in names else REF


def run_draw(
    servers: dict[str, h.Served], configs: Sequence[Config], jobs: list[h.Job], args: argparse.Namespace, index: int
) -> tuple[dict[str, Any], list[h.Outcome]]:
    """One burst at every server, in an order rotated per draw (a slow stretch of the shared
    machine then falls on a different server each draw)."""
    draw: dict[str, Any] = {"classes": {c: sum(j.cls == c for j in jobs) for c in h.CLASSES}, "configs": {}}
    order = [*configs[index % len(configs) :], *configs[: index % len(configs)]]
    results: dict[str, list[h.Outcome]] = {}
    for config in order:
        ends = request_ends(config, jobs, args.cap)
        outcomes, figures = measure(servers[config.name], jobs, [0.0] * len(jobs), ends, config.kind == "edgeserve")
        results[config.name] = outcomes
        figures["rows"] = h.rows(outcomes)
        draw["configs"][config.name] = figures
    for name, figures in draw["configs"].items():
        figures.update(agreement(results[name], results[solo_of(name, list(results))]))
        print(f"  {name}: {brief(figures)}", flush=True)
    draw["order"] = [c.name for c in order]
    return draw, results[REF]


def brief(figures: dict[str, Any]) -> str:
    s = figures["summary"]
    short, long_ = s.get("short", {}).get("latency_p50_s"), s.get("long", {}).get("latency_p50_s")
    return (
        f"short P50 {short:.2f} s, long P50 {long_:.2f} s, makespan {figures['makespan_s']:.2f} s, "
        f"gap p99 {figures['gap_p99_s']:.3f} s, cpu {figures['server_cpu_s']:.1f} s, "
        f"text other than solo {len(figures['answers_other_text_than_solo'])}, "
        f"short of length {len(figures['answers_short_of_length'])}"
    )


def metrics(figures: dict[str, Any]) -> dict[str, float]:
    s = figures["summary"]
    out = {
        "short_latency_p50": s["short"]["latency_p50_s"],
        "long_latency_p50": s["long"]["latency_p50_s"],
        "short_ttft_p50": s["short"]["ttft_p50_s"],
        "long_ttft_p50": s["long"]["ttft_p50_s"],
        "all_latency_mean": s["all"]["latency_mean_s"],
        "makespan": figures["makespan_s"],
        "server_cpu": figures["server_cpu_s"],
    }
    if figures["gap_p99_s"]:
        out["gap_p99"] = figures["gap_p99_s"]
    return out


def ratios(configs: dict[str, Any], against: str) -> dict[str, dict[str, float]]:
    base = metrics(configs[against])
    return {
        name: {k: v / base[k] for k, v in metrics(figures).items() if base.get(k)}
        for name, figures in configs.items()
        if name != against
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def over_draws(draws: list[dict[str, Any]], key: str) -> dict[str, dict[str, dict[str, float]]]:
    names = draws[0][key].keys()
    return {
        name: {m: spread([d[key][name][m] for d in draws if m in d[key][name]]) for m in draws[0][key][name]}
        for name in names
    }


def absolute(draws: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each server's own figures (seconds), median over draws."""
    names = draws[0]["configs"].keys()
    return {
        name: {
            m: statistics.median(metrics(d["configs"][name])[m] for d in draws if m in metrics(d["configs"][name]))
            for m in metrics(draws[0]["configs"][name])
        }
        for name in names
    }


def verdicts(medians: dict[str, Any]) -> dict[str, Any]:
    edge = medians.get(EDGE, {})
    return {
        k: {"target": f"<= {t}", "median": edge[k]["median"], "met": edge[k]["median"] <= t}
        for k, t in TARGETS.items()
        if k in edge
    }


def poisson(
    servers: dict[str, h.Served],
    configs: Sequence[Config],
    jobs: list[h.Job],
    reference: list[h.Outcome],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Poisson arrivals at each rho, the same arrival times at every server."""
    from edgeserve.sim import poisson_arrivals, rate_for_utilisation

    profile = h.fit_profile(reference)
    prompt_tokens = {o.job_id: o.prompt_tokens for o in reference}
    mean_service = statistics.fmean(
        profile["overhead_s"]
        + prompt_tokens[j.job_id] / profile["prefill_tok_s"]
        + j.gen_tokens / profile["decode_tok_s"]
        for j in jobs
    )
    out: dict[str, Any] = {"profile": profile, "mean_service_s": mean_service, "runs": {}}
    for rho in args.rhos:
        rate = rate_for_utilisation(rho, mean_service)
        arrivals = poisson_arrivals(len(jobs), rate, seed=args.seed)
        run: dict[str, Any] = {"rate_per_s": rate, "arrivals_s": arrivals, "configs": {}}
        results: dict[str, list[h.Outcome]] = {}
        for config in configs:
            ends = request_ends(config, jobs, args.cap)
            outcomes, figures = measure(servers[config.name], jobs, arrivals, ends, config.kind == "edgeserve")
            results[config.name] = outcomes
            figures["rows"] = h.rows(outcomes)
            run["configs"][config.name] = figures
        for name, figures in run["configs"].items():
            figures.update(agreement(results[name], results[solo_of(name, list(results))]))
            print(f"  rho {rho} {name}: {brief(figures)}", flush=True)
        run["ratios_vs_np4"] = ratios(run["configs"], NP4)
        run["ratios_vs_np1"] = ratios(run["configs"], REF)
        out["runs"][str(rho)] = run
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5, help="bursts of different prompts (seeds seed, seed+1, ...)")
    ap.add_argument("--per-class", type=int, default=12, help="short and long prompts per burst")
    ap.add_argument("--scale", type=float, default=1 / 16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-per-slot", type=int, default=2048, help="llama-server: -c = this x -np")
    ap.add_argument("--llama-fa", default="auto", help="llama-server -fa (auto: its own default, on for a CPU)")
    ap.add_argument("--cap", type=int, default=h.UNIFORM_MAX_TOKENS, help="edgeserve's max_tokens, one for all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rhos", type=float, nargs="*", default=[0.74, 0.9], help="Poisson runs (none: skip)")
    ap.add_argument("--name", default="batch_burst")
    ap.add_argument("--edge-parallel", type=int, nargs="*", default=[], help="also edgeserve --parallel N")
    ap.add_argument(
        "--edge-variant",
        nargs="*",
        type=shlex.split,  # unbalanced quotes: argparse's own error, not a traceback
        default=[],
        metavar="FLAGS",
        help='also edgeserve with these serve flags, one string each (e.g. "--prefill-chunk 1024")',
    )
    ap.add_argument("--budget-s", type=float, help="start no draw or Poisson run after this many seconds")
    ap.add_argument("--from", dest="source", type=Path, help="re-plot a saved run, run nothing")
    args = ap.parse_args()
    if args.source:
        plot(json.loads(args.source.read_text()), h.OUT / f"{args.source.stem}.png")
        return

    batching = has_parallel_flag()
    configs = (*CONFIGS, CONFIG_EDGE1) if batching else CONFIGS
    # Fixed widths beside the default, e.g. to tell the batched step from the automatic width choice.
    configs += tuple(Config(f"{EDGE} --parallel {n}", "edgeserve", n) for n in args.edge_parallel if batching)
    configs += tuple(Config(f"{EDGE} {shlex.join(v)}", "edgeserve", None, tuple(v)) for v in args.edge_variant)
    binary = llama_server_binary()
    report: dict[str, Any] = {
        "benchmark": "batch_burst",
        "command": f"nice -n {os.nice(0)} python " + " ".join(sys.argv),
        "workload": f"{args.per_class} short + {args.per_class} long prompts of "
        "../shared/data/clairvoyant-labeled/oasst1_labeled.csv per burst (seeds "
        f"{args.seed}..{args.seed + args.draws - 1}), each answer the greedy, seeded text of "
        f"round(actual_output_tokens * {args.scale:.4f}) tokens; all sent at once, streamed",
        "servers": {c.name: command_of(c, args) for c in configs},
        "answer_ends": "llama-server: max_tokens = the scaled length, ignore_eos. edgeserve: ignore_eos, "
        f"max_tokens = {args.cap} for all, and the client closes the stream at the scaled length (docstring)",
        "edgeserve_has_parallel": batching,
        "llama_server_binary": binary,
        "threads": args.threads,
        "niceness": os.nice(0),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "code_at_start": h.code_version(),
        "draws": [],
    }
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        servers = {c.name: stack.enter_context(start(c, args, binary)) for c in configs}
        for served in servers.values():
            h.warm(served.url)
        first: tuple[list[h.Job], list[h.Outcome]] | None = None
        for i, seed in enumerate(range(args.seed, args.seed + args.draws)):
            if args.budget_s and time.monotonic() - started > args.budget_s:
                report["cut_short"] = f"draws from seed {seed} on skipped: past --budget-s {args.budget_s}"
                break
            print(f"draw {seed}", flush=True)
            jobs = burst_jobs(seed, args.scale, args.per_class)
            draw, reference = run_draw(servers, configs, jobs, args, i)
            draw["seed"] = seed
            draw["ratios_vs_np4"] = ratios(draw["configs"], NP4)
            draw["ratios_vs_np1"] = ratios(draw["configs"], REF)
            report["draws"].append(draw)
            first = first or (jobs, reference)
            finish(report, args.name)  # after every draw: a run cut short keeps what it measured
        if args.rhos and first and not (args.budget_s and time.monotonic() - started > args.budget_s):
            report["poisson"] = poisson(servers, configs, first[0], first[1], args)
    report["wall_s"] = time.monotonic() - started
    report["code_at_end"] = h.code_version()
    report["load_average_at_end"] = os.getloadavg()
    finish(report, args.name)


def finish(report: dict[str, Any], name: str) -> None:
    """Medians over draws, verdicts; save and plot."""
    draws = report["draws"]
    report["ratios_vs_np4_over_draws"] = over_draws(draws, "ratios_vs_np4")
    report["ratios_vs_np1_over_draws"] = over_draws(draws, "ratios_vs_np1")
    report["absolute_medians_s"] = absolute(draws)
    report["targets_vs_np4"] = verdicts(report["ratios_vs_np4_over_draws"])
    path = h.save(name, report)
    plot(report, path.with_suffix(".png"))
    print("median ratios vs llama-server -np 4:", json.dumps(table(report), indent=1), flush=True)


def table(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    keys = ("short_latency_p50", "long_latency_p50", "makespan", "gap_p99")
    return {
        name: {k: round(v[k]["median"], 3) for k in keys if k in v}
        for name, v in report["ratios_vs_np4_over_draws"].items()
    }


def plot(report: dict[str, Any], path: Path) -> None:
    rows = [{"side": name, **r} for d in report["draws"] for name, r in d["ratios_vs_np4"].items()]
    names = list(report["draws"][0]["ratios_vs_np4"])
    sides = [(n, n.replace(" -np 1", "\n-np 1").replace(" --parallel", "\n--parallel")) for n in names]
    metrics_ = [
        ("short_latency_p50", 1.0, "short P50 / llama-server -np 4"),
        ("long_latency_p50", 1.0, "long P50 / -np 4"),
        ("makespan", 1.0, "makespan / -np 4"),
        ("gap_p99", 1.0, "p99 token gap / -np 4"),
    ]
    title = (
        f"Bursts of 24, every server at {report['threads']} threads on a shared 2-core CPU: "
        f"{len(report['draws'])} draws (dots), medians (bars), "
        "issue-18 targets for edgeserve (red)"
    )
    side_by_side(rows, sides, metrics_, title, path, targets=(TARGETS["short_latency_p50"], 1.0, 1.0))


if __name__ == "__main__":
    main()
