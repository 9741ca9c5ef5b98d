"""Policies at scale in the simulator: 10k+ requests per scenario in seconds.

Service-time profile measured on the real backend in this run (the engine on the default model:
prefill tok/s from a 500-token prompt, decode tok/s from 128 tokens). Jobs: real prompts with their
real, unscaled answer lengths (Clairvoyant labeled oasst1 + dolly, resampled), predicted by the
shipped length predictor. Arrivals: Poisson at rho = 0.5 / 0.74 / 0.9, and the Azure LLM inference
trace 2023 (conversation) inter-arrival gaps replayed at rho = 0.74 (Microsoft Azure Public Dataset,
CC-BY-4.0). Policies: fcfs, sjf, sjf+aging, and SJF with perfect knowledge (an upper bound).

    python bench/sim_policies.py [--n 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from edgeserve.settings import AGING_FACTOR


def measure_profile(threads: int) -> dict[str, float]:
    from edgeserve import Engine, EngineSettings, ModelSettings, SamplingParams

    settings = ModelSettings(model="default", backend="llama", n_ctx=2048, threads=threads)
    with Engine.from_settings(settings, EngineSettings(policy="fcfs")) as engine:
        words = "The history of local inference is a history of small machines doing large work. " * 60
        tokens = engine.tokenize(words)[:500]
        engine.generate(tokens[:64], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        ttfts, rates = [], []
        for rep in range(3):
            prompt = [tokens[0], *tokens[2 + rep : 501]]
            r = engine.generate(prompt, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
            ttfts.append(r.ttft_s or 0.0)
            rates.append(r.decode_tok_s or 0.0)
        decode = statistics.median(rates)
        prefill = 500 / max(statistics.median(ttfts) - 1 / decode, 1e-6)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "overhead_s": 0.0}


def load_jobs() -> list[tuple[str, int]]:
    jobs = []
    for name in ("oasst1", "dolly"):
        with (h.DATA / "clairvoyant-labeled" / f"{name}_labeled.csv").open(newline="") as f:
            jobs += [(r["prompt"], int(r["actual_output_tokens"])) for r in csv.DictReader(f) if r["prompt"].strip()]
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from edgeserve.predictor import LengthPredictor
    from edgeserve.sim import (
        ServiceProfile,
        SimRequest,
        poisson_arrivals,
        rate_for_utilisation,
        replay_arrivals,
        simulate,
        trace_gaps,
    )

    profile = measure_profile(args.threads)
    sp = ServiceProfile(profile["prefill_tok_s"], profile["decode_tok_s"], profile["overhead_s"])
    predictor = LengthPredictor.load()
    pool = load_jobs()
    predicted = [predictor.predict([{"role": "user", "content": p}]).expected_tokens for p, _ in pool]
    prompt_tokens = [max(1, len(p) // 4) + 8 for p, _ in pool]  # chars/4 plus the chat template's tokens
    rng = random.Random(args.seed)
    picks = [rng.randrange(len(pool)) for _ in range(args.n)]
    mean_service = statistics.fmean(sp.service_s(prompt_tokens[i], pool[i][1]) for i in picks)
    short_service = statistics.median(
        sp.service_s(prompt_tokens[i], pool[i][1]) for i in picks if h.length_class(pool[i][1]) == "short"
    )
    aging_s = AGING_FACTOR * short_service
    gaps = trace_gaps(h.DATA / "azure-llm-inference-2023" / "AzureLLMInferenceTrace_conv.csv")
    scenarios = {
        **{
            f"poisson rho={rho}": poisson_arrivals(args.n, rate_for_utilisation(rho, mean_service), seed=args.seed)
            for rho in (0.5, 0.74, 0.9)
        },
        "azure-conv replay rho=0.74": replay_arrivals(gaps, args.n, rate_for_utilisation(0.74, mean_service)),
    }
    policies = {
        "fcfs": ("fcfs", float("inf"), False),
        "sjf": ("sjf", float("inf"), False),
        "sjf+aging": ("sjf", aging_s, False),
        "oracle sjf": ("sjf", float("inf"), True),
    }
    report: dict[str, Any] = {
        "benchmark": "sim_policies",
        "requests_per_scenario": args.n,
        "jobs": "Clairvoyant labeled oasst1 + dolly (../shared/data), real answer lengths, resampled",
        "profile": profile,
        "mean_service_s": mean_service,
        "aging_s": aging_s,
        "scenarios": {},
    }
    for scenario, arrivals in scenarios.items():
        report["scenarios"][scenario] = {}
        for name, (policy, aging, oracle) in policies.items():
            requests = [
                SimRequest(f"r{k}", a, prompt_tokens[i], pool[i][1], float(pool[i][1]) if oracle else predicted[i])
                for k, (i, a) in enumerate(zip(picks, arrivals, strict=True))
            ]
            t = time.perf_counter()
            out = simulate(requests, sp, policy, aging_s=aging)
            elapsed = time.perf_counter() - t
            outcomes = [
                h.Outcome(
                    o.request.request_id,
                    h.length_class(o.request.output_tokens),
                    o.request.output_tokens,
                    o.request.output_tokens,
                    o.request.arrival,
                    o.first_token,
                    o.end,
                    0,
                    None,
                    0,
                )
                for o in out
            ]
            summary = h.summarize(outcomes)
            report["scenarios"][scenario][name] = {"summary": summary, "simulated_in_s": elapsed}
        fcfs = report["scenarios"][scenario]["fcfs"]["summary"]
        for name in policies:
            s = report["scenarios"][scenario][name]["summary"]
            s["short_p50_gain_vs_fcfs"] = 1 - s["short"]["latency_p50_s"] / fcfs["short"]["latency_p50_s"]
            s["long_p50_ratio_vs_fcfs"] = s["long"]["latency_p50_s"] / fcfs["long"]["latency_p50_s"]
            s["long_p99_ratio_vs_fcfs"] = s["long"]["latency_p99_s"] / fcfs["long"]["latency_p99_s"]
            print(
                f"{scenario:28s} {name:10s} short P50 gain {s['short_p50_gain_vs_fcfs']:6.1%}  "
                f"long P50 x{s['long_p50_ratio_vs_fcfs']:.2f}  long P99 x{s['long_p99_ratio_vs_fcfs']:.2f}"
            )
    path = h.save("sim_policies", report)
    plot(report, path.with_suffix(".png"))
    print(f"profile {profile}; aging {aging_s:.1f} s")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(report["scenarios"])
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4 * len(scenarios), 3.8), sharey=True)
    for ax, scenario in zip(axes, scenarios, strict=True):
        data = report["scenarios"][scenario]
        names = list(data)
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [data[name]["summary"][c]["latency_p50_s"] for c in h.CLASSES]
            ax.bar([x + i * width for x in range(3)], values, width, label=name)
        ax.set_xticks([x + 0.3 for x in range(3)], h.CLASSES)
        ax.set_title(scenario, fontsize=9)
        ax.set_yscale("log")
    axes[0].set_ylabel("P50 latency (s, log)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['requests_per_scenario']} simulated requests per scenario, profile measured on llama.cpp")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
