"""MLX decode throughput by batch width: one batched forward per step against a loop of solo steps.

For each width N, N sequences each hold the same 64-token prompt; a round decodes one token for
every sequence, either as N decode calls of one sequence (the backend's unbatched path, what it did
before batching) or as one decode call of N (one forward over mlx-lm's merged caches). Reports the
median round in wall and CPU seconds (``time.process_time``), aggregate and per-sequence tok/s, and
what the first batched round costs (it merges the caches). Greedy, the default model, the MLX
device this machine has (its CPU here).

    python bench/mlx_batch.py [--rounds 6] [--widths 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from edgeserve.backend import Backend, Step
from edgeserve.engine import Engine
from edgeserve.settings import ModelSettings
from edgeserve.types import SamplingParams

GREEDY = SamplingParams(temperature=0)
PROMPT = "Once upon a time there was a cat who lived by the river and watched the boats go by. " * 4


def measure(backend: Backend, n: int, rounds: int) -> dict[str, Any]:
    prompt = backend.tokenize(PROMPT, add_bos=True)[:65]
    samplers = [backend.sampler(GREEDY) for _ in range(n)]
    for seq in range(n):
        backend.prefill(seq, prompt[backend.open(seq, prompt, reuse=False) : -1])
    pending = [prompt[-1]] * n

    def round_(batched: bool) -> tuple[float, float]:
        nonlocal pending
        w0, c0 = time.perf_counter(), time.process_time()
        steps = [Step(s, t, sp) for s, t, sp in zip(range(n), pending, samplers, strict=True)]
        pending = backend.decode(steps) if batched else [backend.decode([st])[0] for st in steps]
        return time.perf_counter() - w0, time.process_time() - c0

    out: dict[str, Any] = {}
    round_(False)  # warm-up
    for mode in ("looped", "batched"):
        first = round_(mode == "batched")  # the batched one merges the caches
        timed = [round_(mode == "batched") for _ in range(rounds)]
        wall = statistics.median(t[0] for t in timed)
        cpu = statistics.median(t[1] for t in timed)
        out[mode] = {
            "round_wall_ms": round(wall * 1000, 1),
            "round_cpu_ms": round(cpu * 1000, 1),
            "first_round_wall_ms": round(first[0] * 1000, 1),
            "aggregate_tok_s_wall": round(n / wall, 2),
            "aggregate_tok_s_cpu": round(n / cpu, 2),
            "per_sequence_tok_s_wall": round(1 / wall, 2),
        }
    for seq, sampler in enumerate(samplers):
        backend.release(seq)
        sampler.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("mlx_batch.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {
        "benchmark": "MLX decode rounds by batch width: N solo decode calls vs one batched call",
        "command": f"python bench/mlx_batch.py --rounds {args.rounds} --widths {' '.join(map(str, args.widths))}",
        "load_average_at_start": os.getloadavg(),
        "widths": {},
    }
    with Engine.from_settings(ModelSettings(backend="mlx", n_ctx=1024, threads=1)) as engine:
        result["device"] = engine.capabilities.device
        for n in args.widths:
            result["widths"][str(n)] = r = engine.call(lambda b, n=n: measure(b, n, args.rounds))
            speedup = r["looped"]["round_wall_ms"] / r["batched"]["round_wall_ms"]
            r["batched_vs_looped_wall"] = round(speedup, 2)
            r["batched_vs_looped_cpu"] = round(r["looped"]["round_cpu_ms"] / r["batched"]["round_cpu_ms"], 2)
            print(n, json.dumps(r))
    one = result["widths"].get("1")
    if one:
        result["aggregate_vs_one_sequence_wall"] = {
            k: round(v["batched"]["aggregate_tok_s_wall"] / one["batched"]["aggregate_tok_s_wall"], 2)
            for k, v in result["widths"].items()
        }
    result["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
