"""What ranking accuracy the burst targets need: simulated bursts under predictors of known quality.

``sjf_burst.py`` runs one real burst and checks the simulator against it (within about 2%). This
script uses that simulator, the service-time profile that run measured (``bench/sjf_burst.json``)
and the same workload generator (oasst1 prompts, real lengths x ``--scale``) to run many bursts
under: the shipped predictor; an oracle (the true lengths); and the oracle blurred by log-normal
noise of growing width, whose short-vs-long ranking accuracy is measured on the whole set. Each
point is the median over ``--bursts`` random bursts of the SJF / FCFS ratio of P50 latency per
class. Targets (issue 5): short <= 0.25x, long <= 1.20x.

    python bench/sjf_burst_bound.py [--n 48] [--bursts 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from edgeserve.predictor import LengthPredictor
from edgeserve.predictor import metrics as m
from edgeserve.predictor.tokens import make_counter
from edgeserve.settings import AGING_FACTOR
from edgeserve.sim import ServiceProfile, SimRequest, simulate

NOISE = (0.0, 0.5, 0.8, 1.1, 1.4, 1.8, 2.4)
#: The chat template's tokens around one user turn (Gemma: <start_of_turn>user ... model).
TEMPLATE_TOKENS = 9


def burst_ratios(
    jobs: Sequence[h.Job], scores: dict[str, float], prompt_tokens: dict[str, int], profile: ServiceProfile
) -> dict[str, dict[str, float]]:
    requests = [SimRequest(j.job_id, 0.0, prompt_tokens[j.prompt], j.gen_tokens, scores[j.prompt]) for j in jobs]
    shorts = [j for j in jobs if j.cls == "short"]
    short_service = statistics.median(profile.service_s(prompt_tokens[j.prompt], j.gen_tokens) for j in shorts)
    p50 = {}
    for name, policy, aging_s in (
        ("fcfs", "fcfs", float("inf")),
        ("sjf", "sjf", float("inf")),
        ("sjf+aging", "sjf", AGING_FACTOR * short_service),
    ):
        outcomes = simulate(requests, profile, policy, aging_s=aging_s)
        cls = {j.job_id: j.cls for j in jobs}
        p50[name] = {
            c: statistics.median(o.latency_s for o in outcomes if cls[o.request.request_id] == c)
            for c in ("short", "long")
        }
    return {name: {c: p50[name][c] / p50["fcfs"][c] for c in ("short", "long")} for name in ("sjf", "sjf+aging")}


def summarize(per_burst: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("sjf", "sjf+aging"):
        out[name] = {
            f"{c}_p50_ratio_{q}": round(float(np.percentile([b[name][c] for b in per_burst], pct)), 3)
            for c in ("short", "long")
            for q, pct in (("median", 50), ("p25", 25), ("p75", 75))
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--scale", type=float, default=1 / 16)
    ap.add_argument("--bursts", type=int, default=40)
    args = ap.parse_args()

    measured = json.loads((Path(__file__).with_name("sjf_burst.json")).read_text())["profile"]
    profile = ServiceProfile(measured["prefill_tok_s"], measured["decode_tok_s"], measured["overhead_s"])
    everything = h.workload(len(h.workload_rows("oasst1")), args.scale, 0)
    count = make_counter("gemma3")
    prompt_tokens = {j.prompt: count(j.prompt) + TEMPLATE_TOKENS for j in everything}
    true_tokens = np.array([j.real_tokens for j in everything], dtype=np.float64)

    predictor = LengthPredictor.load()
    shipped = predictor.scores(predictor.featurize_many([[{"role": "user", "content": j.prompt}] for j in everything]))
    predictors: list[tuple[str, np.ndarray]] = [("shipped predictor", shipped)]
    rng = np.random.default_rng(0)
    for sigma in NOISE:
        predictors.append((f"oracle, noise {sigma}", np.log(true_tokens) + rng.normal(0.0, sigma, len(true_tokens))))

    bursts = [h.workload(args.n, args.scale, seed) for seed in range(args.bursts)]
    report: dict[str, Any] = {
        "benchmark": "sjf_burst_bound",
        "workload": f"{args.bursts} bursts of {args.n} oasst1 prompts (seeds 0..{args.bursts - 1}), "
        f"each generating round(actual_output_tokens * {args.scale:.4f}) tokens",
        "profile": measured,
        "profile_from": "bench/sjf_burst.json (fitted on its real FCFS run)",
        "aging": f"tau = {AGING_FACTOR} x the median short request's service time",
        "targets": {"short_p50_ratio": "<= 0.25", "long_p50_ratio": "<= 1.20"},
        "predictors": [],
    }
    for name, scores in predictors:
        by_prompt = {j.prompt: float(s) for j, s in zip(everything, scores, strict=True)}
        per_burst = [burst_ratios(jobs, by_prompt, prompt_tokens, profile) for jobs in bursts]
        row = {
            "predictor": name,
            "short_long_accuracy": round(m.short_long_accuracy(scores, true_tokens), 4),
            **summarize(per_burst),
        }
        report["predictors"].append(row)
        print(row["predictor"], row["short_long_accuracy"], row["sjf"], flush=True)

    path = h.save(f"sjf_burst_bound_n{args.n}" if args.n != 48 else "sjf_burst_bound", report)
    plot(report, path.with_suffix(".png"))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    oracle = [r for r in report["predictors"] if r["predictor"].startswith("oracle")]
    shipped = next(r for r in report["predictors"] if r["predictor"] == "shipped predictor")
    for ax, cls, target in ((axes[0], "short", 0.25), (axes[1], "long", 1.20)):
        for policy, marker in (("sjf", "o-"), ("sjf+aging", "s--")):
            ax.plot(
                [r["short_long_accuracy"] for r in oracle],
                [r[policy][f"{cls}_p50_ratio_median"] for r in oracle],
                marker,
                label=f"{policy}, blurred oracle",
            )
            ax.plot(shipped["short_long_accuracy"], shipped[policy][f"{cls}_p50_ratio_median"], "k*", markersize=12)
        ax.axhline(target, color="red", linestyle=":", label=f"target {target}")
        ax.set_xlabel("short-vs-long ranking accuracy of the predictor")
        ax.set_ylabel(f"{cls} P50 latency, SJF / FCFS")
        ax.legend(fontsize=7)
    fig.suptitle("Simulated bursts: what ordering quality the targets need (star: the shipped predictor)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
