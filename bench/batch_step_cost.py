"""What a batched llama.cpp decode step costs in CPU time against a single one (issue 18).

A step of N sequences is timed with ``time.process_time`` (CPU seconds, so a busy machine's
waiting does not count) and wall time, at ``--threads`` (1), every sequence holding the same 256-token context, for a KV
stream per sequence (the default) and for one unified cache (``--kv-unified``). A ratio near N
means batching saves nothing; llama-server's four slots ran on 0.73x the CPU of one slot in
``bench/batch_burst_width.json``.

    python bench/batch_step_cost.py [--steps 15] [--widths 1 4 8] [--threads 1] [--n-ctx 1024] [--flash-attn auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from edgeserve.backend import Backend, Step
from edgeserve.engine import Engine
from edgeserve.settings import ModelSettings
from edgeserve.types import SamplingParams

GREEDY = SamplingParams(temperature=0)


def step_cpu_ms(engine: Engine, widths: list[int], steps: int) -> dict[int, tuple[float, float]]:
    """Median (CPU ms, wall ms) of a decode step per batch width."""

    def run(backend: Backend) -> dict[int, tuple[float, float]]:
        prompt = backend.tokenize("Once upon a time there was a cat. " * 30, add_bos=True)[:257]
        out = {}
        for n in widths:
            samplers = [backend.sampler(GREEDY) for _ in range(n)]
            for seq in range(n):
                backend.prefill(seq, prompt[backend.open(seq, prompt, reuse=False) : -1])
            pending = [prompt[-1]] * n
            cpu, wall = [], []
            for _ in range(steps):
                t0, w0 = time.process_time(), time.perf_counter()
                pending = backend.decode([Step(s, t, sp) for s, t, sp in zip(range(n), pending, samplers, strict=True)])
                cpu.append(time.process_time() - t0)
                wall.append(time.perf_counter() - w0)
            for seq, sampler in enumerate(samplers):
                backend.release(seq)
                sampler.close()
            out[n] = (statistics.median(cpu) * 1000, statistics.median(wall) * 1000)
        return out

    return engine.call(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=1024, help="per sequence")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto", help="auto: edgeserve's default")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("batch_step_cost.json"))
    args = ap.parse_args()
    result: dict[str, object] = {
        "benchmark": f"CPU and wall ms per llama.cpp decode step by batch width, {args.threads} thread(s)",
        "command": f"python bench/batch_step_cost.py --steps {args.steps} --widths {' '.join(map(str, args.widths))} "
        f"--threads {args.threads} --n-ctx {args.n_ctx} --flash-attn {args.flash_attn}",
        "load_average_at_start": os.getloadavg(),
    }
    flash = {"auto": None, "on": True, "off": False}[args.flash_attn]
    for unified in (False, True):
        settings = ModelSettings(
            threads=args.threads, parallel=max(args.widths), n_ctx=args.n_ctx, kv_unified=unified, flash_attn=flash
        )
        with Engine.from_settings(settings) as engine:
            ms = step_cpu_ms(engine, args.widths, args.steps)
        key = "unified" if unified else "stream_per_sequence"
        first = ms[args.widths[0]]
        result[key] = {
            "step_cpu_ms": {str(n): round(cpu, 2) for n, (cpu, _) in ms.items()},
            "step_wall_ms": {str(n): round(wall, 2) for n, (_, wall) in ms.items()},
            "cpu_vs_single_step": {str(n): round(cpu / first[0], 2) for n, (cpu, _) in ms.items()},
        }
        print(key, result[key])
    result["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
