"""How far shortest-first orders and widths could go in the batch burst on this CPU (issue 18): a model.

``batch_burst.py`` measures edgeserve against ``llama-server -np 4``. This script asks what the best
of a family of shortest-first policies, given knowledge no predictor has, could reach against the
same reference on the same machine. It measures what the model
needs here first: the wall time of one decode step of ``w`` sequences (``batch_step_cost``'s way,
256-token contexts) and the prefill rate in chunks of the size the engine uses beside decodes and
alone. Then it replays the same bursts (``batch_burst.burst_jobs``: the same prompts, answer lengths
and seeds) through a model of continuous batching: each turn prefills up to a chunk of prompt
tokens (a quarter of ``--prefill-chunk`` while any request decodes, as the engine does), then
decodes one token of every request past its prompt, at the measured step time of that width
(linear between measured widths).

Policies, each a queue order and a width:

- ``np4``: arrival order, four wide (llama-server ``-np 4``'s), the reference of every ratio;
- shortest first with knowledge no predictor has: the short requests (their true class, the
  shortest answer first), all of them batched together, then the long ones ``w`` at a time for
  ``w`` = 1..16, in three orders: ``arrival``; ``prompt`` (the shortest prompt first); and
  ``oracle`` (the least true work first: what a perfect predictor would give SRPT).

Per seed and as the median over seeds: short P50, long P50 and makespan against the modelled
``np4``, and the best long P50 among the policies that meet the other two targets (short <= 0.5x,
makespan <= 1.0x). The model runs ``np4`` through the engine's chunking; the real llama-server
evaluates a whole prompt with the decodes in one batch, and its measured makespans for the same
seeds (``bench/batch_burst_threads2_epyc_srpt.json``) were 5-10% shorter than this model's, so the
model flatters the shortest-first policies.

    python bench/batch_burst_bound.py [--seeds 0 1 2 3 4] [--threads 2] [--name batch_burst_bound]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import batch_burst as bb
from batch_step_cost import step_cpu_ms

from edgeserve.backend import Backend
from edgeserve.engine import Engine
from edgeserve.settings import EngineSettings, ModelSettings

#: The chat template's tokens around one user turn (as ``sjf_burst_bound.py``).
TEMPLATE_TOKENS = 9
WIDTHS = (1, 2, 4, 8, 12, 16)
ORDERS = ("arrival", "prompt", "oracle")


@dataclass(frozen=True)
class Item:
    cls: str
    prompt_tokens: int
    gen_tokens: int


@dataclass(frozen=True)
class Machine:
    """What the model needs, as measured here: wall seconds per decode step by width, and
    prompt tokens per second in the engine's two chunk sizes."""

    step_s: dict[int, float]
    prefill_tok_s: dict[int, float]

    def step(self, width: int) -> float:
        widths = sorted(self.step_s)
        if width >= widths[-1]:
            return self.step_s[widths[-1]] * width / widths[-1]
        hi = bisect.bisect_left(widths, width)
        if widths[hi] == width or hi == 0:
            return self.step_s[widths[hi]]
        lo = widths[hi - 1]
        frac = (width - lo) / (widths[hi] - lo)
        return self.step_s[lo] + frac * (self.step_s[widths[hi]] - self.step_s[lo])


def measure_prefill(engine: Engine, chunks: Sequence[int], tokens: int = 512) -> dict[int, float]:
    """Prompt tokens per second, ``tokens`` of prompt evaluated ``chunk`` at a time (median of 3)."""

    def run(backend: Backend) -> dict[int, float]:
        prompt = backend.tokenize("The history of the printing press begins in China. " * 60, add_bos=True)
        prompt = prompt[: tokens + 1]
        out = {}
        for chunk in chunks:
            rates = []
            for seq in range(3):
                start = backend.open(seq, prompt, reuse=False)
                t0 = time.perf_counter()
                for i in range(start, tokens, chunk):
                    backend.prefill(seq, prompt[i : min(i + chunk, tokens)])
                rates.append((tokens - start) / (time.perf_counter() - t0))
                backend.release(seq)
            out[chunk] = statistics.median(rates)
        return out

    return engine.call(run)


def simulate(
    items: Sequence[Item],
    order: Sequence[int],
    width: Callable[[list[int], list[int]], int],
    machine: Machine,
    chunk: int,
) -> dict[str, float]:
    """Finish times of a burst (all sent at 0) under ``order`` and ``width(batch, queue)``:
    short and long P50 and the makespan, in seconds."""
    queue, batch = list(order), []
    left_prompt = {i: items[i].prompt_tokens for i in order}
    left_answer = {i: items[i].gen_tokens for i in order}
    t, end = 0.0, {}
    slow, fast = machine.prefill_tok_s[chunk // 4], machine.prefill_tok_s[chunk]
    while queue or batch:
        w = width(batch, queue)
        while len(batch) < w and queue:
            batch.append(queue.pop(0))
        decoding = [i for i in batch if left_prompt[i] == 0]
        budget = chunk // 4 if decoding else chunk
        for i in batch:
            if budget == 0:
                break
            if left_prompt[i]:
                n = min(budget, left_prompt[i])
                left_prompt[i] -= n
                budget -= n
                t += n / (slow if decoding else fast)
        if decoding:
            t += machine.step(len(decoding))
            for i in decoding:
                left_answer[i] -= 1
        for i in [i for i in batch if left_prompt[i] == 0 and left_answer[i] == 0]:
            end[i] = t
            batch.remove(i)
    return {
        "short_latency_p50": statistics.median(end[i] for i in order if items[i].cls == "short"),
        "long_latency_p50": statistics.median(end[i] for i in order if items[i].cls == "long"),
        "makespan": max(end.values()),
    }


def policies(items: Sequence[Item], machine: Machine, chunk: int) -> dict[str, dict[str, float]]:
    """Every policy's figures on one burst, and each against ``np4``'s."""
    arrival = list(range(len(items)))
    shorts = sorted((i for i in arrival if items[i].cls == "short"), key=lambda i: items[i].gen_tokens)
    longs = [i for i in arrival if items[i].cls == "long"]
    work = {i: items[i].prompt_tokens / machine.prefill_tok_s[chunk // 4] + items[i].gen_tokens for i in longs}
    long_orders = {
        "arrival": longs,
        "prompt": sorted(longs, key=lambda i: items[i].prompt_tokens),
        "oracle": sorted(longs, key=lambda i: work[i]),
    }
    out = {"np4": simulate(items, arrival, lambda batch, queue: 4, machine, chunk)}
    for name, order in long_orders.items():
        for w in range(1, 17):

            def width(batch: list[int], queue: list[int], w: int = w) -> int:
                # Every short request present gets a place (edgeserve's floor).
                return max(w, sum(1 for i in (*batch, *queue) if items[i].cls == "short"))

            out[f"{name} w{w}"] = simulate(items, [*shorts, *order], width, machine, chunk)
    ref = out["np4"]
    return {name: {**f, **{f"{k}_ratio": f[k] / ref[k] for k in bb.TARGETS}} for name, f in out.items()}


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: ``kind`` of the text, above zero (argparse's own error otherwise)."""

    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=_positive(int), default=2)
    ap.add_argument("--scale", type=_positive(float), default=1 / 16)
    ap.add_argument("--steps", type=_positive(int), default=15, help="decode steps timed per width")
    ap.add_argument("--name", default="batch_burst_bound")
    args = ap.parse_args()
    chunk = EngineSettings().prefill_chunk
    settings = ModelSettings(threads=args.threads, parallel=max(WIDTHS))
    with Engine.from_settings(settings) as engine:
        load_start = os.getloadavg()
        steps = step_cpu_ms(engine, list(WIDTHS), args.steps)
        prefill = measure_prefill(engine, [chunk // 4, chunk])
        items_by_seed = {
            seed: [
                Item(
                    h.length_class(job.real_tokens),
                    len(engine.tokenize(job.prompt)) + TEMPLATE_TOKENS,
                    job.gen_tokens,
                )
                for job in bb.burst_jobs(seed, args.scale)
            ]
            for seed in args.seeds
        }
    machine = Machine({w: wall / 1000 for w, (_, wall) in steps.items()}, prefill)
    per_seed = {seed: policies(items, machine, chunk) for seed, items in items_by_seed.items()}
    names = list(next(iter(per_seed.values())))
    medians = {
        name: {f"{k}_ratio": statistics.median(per_seed[s][name][f"{k}_ratio"] for s in per_seed) for k in bb.TARGETS}
        for name in names
    }
    meeting = {
        name: m
        for name, m in medians.items()
        if name != "np4" and m["short_latency_p50_ratio"] <= 0.5 and m["makespan_ratio"] <= 1.0
    }
    best = min(meeting, key=lambda name: meeting[name]["long_latency_p50_ratio"], default=None)
    report: dict[str, Any] = {
        "benchmark": "batch_burst_bound",
        "command": f"nice -n {os.nice(0)} python " + " ".join(sys.argv),
        "model": "continuous batching: a turn prefills up to prefill_chunk prompt tokens (a quarter of it while "
        "any request decodes) at the measured rate, then decodes every request past its prompt at the measured "
        "step time of that width (docstring)",
        "measured": {
            "threads": args.threads,
            "decode_step_wall_ms": {str(w): round(s * 1000, 2) for w, s in machine.step_s.items()},
            "prefill_tok_s_by_chunk": {str(c): round(r, 1) for c, r in prefill.items()},
            "load_average_at_start": load_start,
        },
        "workload": f"batch_burst.burst_jobs(seed, {args.scale:.4f}) for seeds {args.seeds}",
        "code": h.code_version(),
        "median_ratios_vs_np4": medians,
        "best_long_p50_meeting_short_and_makespan": None if best is None else {"policy": best, **meeting[best]},
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "load_average_at_end": os.getloadavg(),
    }
    path = h.OUT / f"{args.name}.json"
    h.OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(medians, path.with_suffix(".png"))
    for name in ("np4", *(f"{o} w{w}" for o in ORDERS for w in (2, 4, 6, 8, 12, 16))):
        print(name, {k: round(v, 3) for k, v in medians[name].items()})
    print("best meeting short and makespan:", report["best_long_p50_meeting_short_and_makespan"])
    print(path)


def plot(medians: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    widths = list(range(1, 17))
    for order in ORDERS:
        ax.plot(
            widths, [medians[f"{order} w{w}"]["long_latency_p50_ratio"] for w in widths], label=f"long P50, {order}"
        )
    ax.plot(widths, [medians[f"oracle w{w}"]["makespan_ratio"] for w in widths], "k--", label="makespan, oracle")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("width of the long requests' batch (every short request present also gets a place)")
    ax.set_ylabel("median over bursts, x llama-server -np 4 (model)")
    ax.set_title("Shortest first on this CPU (model): long P50 by the long requests' width")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
