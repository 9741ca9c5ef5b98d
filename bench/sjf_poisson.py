"""Poisson arrivals at utilisation rho = 0.5, 0.74, 0.9 through the proxy: FCFS vs SJF(+aging), real
serial backend, same jobs and arrival times per rho, plus the simulator's prediction of each run.

The service-time profile (overhead + prompt/prefill + tokens/decode) is fitted on a calibration burst
served FCFS in the same run; the arrival rate for rho is rho / mean predicted service time of the jobs.
Target (issue 5): short-request P50 latency gain at rho = 0.74 >= 30% over FCFS.

    python bench/sjf_poisson.py [--n 60] [--scale 0.0625] [--threads 2]
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

from edgeserve.settings import AGING_FACTOR

RHOS = (0.5, 0.74, 0.9)


def simulate_run(
    jobs: list[h.Job],
    prompt_tokens: dict[str, int],
    arrivals: list[float],
    profile: dict[str, float],
    policy: str,
    aging_s: float,
) -> dict[str, Any]:
    from edgeserve.predictor import LengthPredictor
    from edgeserve.sim import ServiceProfile, SimRequest, simulate

    predictor = LengthPredictor.load()
    requests = [
        SimRequest(
            j.job_id,
            a,
            prompt_tokens[j.job_id],
            j.gen_tokens,
            predictor.predict([{"role": "user", "content": j.prompt}]).expected_tokens,
        )
        for j, a in zip(jobs, arrivals, strict=True)
    ]
    sp = ServiceProfile(profile["prefill_tok_s"], profile["decode_tok_s"], profile["overhead_s"])
    classes = {j.job_id: j.cls for j in jobs}
    out = simulate(requests, sp, policy, aging_s=aging_s)
    return h.summarize(
        [
            h.Outcome(
                o.request.request_id,
                classes[o.request.request_id],
                0,
                o.request.output_tokens,
                o.request.arrival,
                o.first_token,
                o.end,
                0,
                None,
                o.request.prompt_tokens,
            )
            for o in out
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--scale", type=float, default=1 / 16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from edgeserve.sim import poisson_arrivals, rate_for_utilisation

    jobs = h.workload(args.n, args.scale, args.seed)
    calibration = h.workload(16, args.scale, args.seed + 100)
    report: dict[str, Any] = {
        "benchmark": "sjf_poisson",
        "workload": f"{args.n} prompts of ../shared/data/clairvoyant-labeled/oasst1_labeled.csv (seed {args.seed}), "
        f"each generating round(actual_output_tokens * {args.scale:.4f}) tokens; Poisson arrivals",
        "classes": {c: sum(j.cls == c for j in jobs) for c in h.CLASSES},
        "threads": args.threads,
        "runs": {},
    }
    with h.upstream(args.threads) as up:
        asyncio.run(h.run_load(up, calibration[:2], [0.0, 0.0]))  # warm-up
        with h.proxy(up, "fcfs", 1e9) as px:
            calib = asyncio.run(h.run_load(px, calibration, [0.0] * len(calibration)))
        profile = h.fit_profile(calib)
        short = [o for o in calib if o.cls == "short"]
        aging_s = AGING_FACTOR * statistics.median(
            profile["overhead_s"] + o.prompt_tokens / profile["prefill_tok_s"] + o.gen_tokens / profile["decode_tok_s"]
            for o in (short or calib)
        )
        # Prompt sizes as the server counts them (chat template included), from one cheap pass.
        sizing = asyncio.run(
            h.run_load(up, [h.Job(j.job_id, j.prompt, j.real_tokens, 1) for j in jobs], [0.0] * len(jobs))
        )
        prompt_tokens = {o.job_id: o.prompt_tokens for o in sizing}
        mean_service = statistics.fmean(
            profile["overhead_s"]
            + prompt_tokens[j.job_id] / profile["prefill_tok_s"]
            + j.gen_tokens / profile["decode_tok_s"]
            for j in jobs
        )
        report.update(profile=profile, aging_s=aging_s, mean_service_s=mean_service)
        for rho in RHOS:
            arrivals = poisson_arrivals(len(jobs), rate_for_utilisation(rho, mean_service), seed=args.seed)
            run: dict[str, Any] = {"rate_per_s": rate_for_utilisation(rho, mean_service)}
            for name, policy, aging in (("fcfs", "fcfs", 1e9), ("sjf+aging", "sjf", aging_s)):
                with h.proxy(up, policy, aging) as px:
                    outcomes = asyncio.run(h.run_load(px, jobs, arrivals))
                run[name] = {
                    "summary": h.summarize(outcomes),
                    "simulated": simulate_run(jobs, prompt_tokens, arrivals, profile, policy, aging),
                    "rows": h.rows(outcomes),
                }
                print(rho, name, {c: round(v["latency_p50_s"], 2) for c, v in run[name]["summary"].items()})
            f, s = run["fcfs"]["summary"], run["sjf+aging"]["summary"]
            run["short_p50_gain"] = 1 - s["short"]["latency_p50_s"] / f["short"]["latency_p50_s"]
            run["long_p50_ratio"] = s["long"]["latency_p50_s"] / f["long"]["latency_p50_s"]
            report["runs"][str(rho)] = run
            print(f"rho {rho}: short P50 gain {run['short_p50_gain']:.1%}, long P50 ratio {run['long_p50_ratio']:.2f}")
    report["target"] = "short_p50_gain at rho 0.74 >= 0.30"
    path = h.save("sjf_poisson", report)
    plot(report, path.with_suffix(".png"))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=False)
    rhos = list(report["runs"])
    for ax, cls in zip(axes, h.CLASSES, strict=True):
        for name, style in (("fcfs", "o-"), ("sjf+aging", "s-")):
            real = [report["runs"][r][name]["summary"].get(cls, {}).get("latency_p50_s") for r in rhos]
            sim = [report["runs"][r][name]["simulated"].get(cls, {}).get("latency_p50_s") for r in rhos]
            ax.plot([float(r) for r in rhos], real, style, label=f"{name} (real)")
            ax.plot([float(r) for r in rhos], sim, style[0] + "--", alpha=0.4, label=f"{name} (simulated)")
        ax.set_title(f"{cls} requests")
        ax.set_xlabel("utilisation rho")
        ax.set_ylabel("P50 latency (s)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Poisson arrivals through the proxy on a serial llama.cpp server")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
