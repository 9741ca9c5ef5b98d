"""Park/resume cost per backend: milliseconds and bytes per 1k tokens of context (issue 12, benchmark 4).

Through the Backend protocol on the engine's loop thread (``Engine.call``), as the engine does it:
a sequence is opened and prefilled with ``--contexts`` prompt tokens (real text: oasst1 prompts one
after another), ``--generated`` tokens are decoded, then ``--reps`` times: ``park`` (timed), another
request opens, prefills and decodes on the backend (so nothing of the parked sequence is left to
reuse), ``restore`` (timed), one decode step. Every backend installed here runs: llama.cpp always;
MLX and ONNX Runtime GenAI when their extras import (the default model is converted on first use).

What each backend's park holds differs, and the figures show it: llama.cpp copies the sequence's
KV state out (``llama_state_seq_get_data``); MLX saves its prompt cache (safetensors bytes); ONNX
Runtime GenAI cannot load a KV cache, so its blob is the tokens and batch sizes and a restore
evaluates them again (a prefill, and one step per generated token).

    nice -n 10 python bench/park_resume.py [--backends llama,mlx,onnx] [--contexts 256,1024,2048] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from edgeserve import Engine, SamplingParams
from edgeserve.backend import Backend, Step, get_spec
from edgeserve.settings import EngineSettings, ModelSettings

GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
HOW = {
    "llama": "KV state copied out and back (llama_state_seq_get_data / set_data)",
    "mlx": "prompt cache saved and loaded (mlx-lm save_prompt_cache, safetensors bytes)",
    "onnx": "tokens and batch sizes only; restore evaluates them again (prefill + one step per generated token)",
}


def context_tokens(engine: Engine, n: int) -> list[int]:
    """``n`` tokens of real text: oasst1 prompts one after another, BOS first."""
    text, tokens = "", [0]
    for row in h.workload_rows():
        text += row["prompt"].strip() + "\n\n"
        if len(text) > 6 * n:  # well over n tokens: tokenize once to be sure
            tokens = engine.tokenize(text)
            if len(tokens) >= n:
                break
    return tokens[:n]


def measure(backend: Backend, tokens: list[int], other: list[int], generated: int, reps: int) -> dict[str, Any]:
    """Open, prefill, decode ``generated`` tokens, then ``reps`` park/restore round trips."""
    seq, sampler = 1, backend.sampler(GREEDY)
    backend.prefill(seq, tokens[backend.open(seq, tokens, reuse=False) : -1])
    pending = tokens[-1]
    for _ in range(generated):
        (pending,) = backend.decode([Step(seq, pending, sampler)])
    park_s, restore_s, sizes, covered = [], [], [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        blob = backend.park(seq)
        park_s.append(time.perf_counter() - t0)
        sizes.append(len(blob))
        backend.prefill(2, other[backend.open(2, other, reuse=False) : -1])
        backend.decode([Step(2, other[-1], backend.sampler(GREEDY))])
        backend.release(2)
        t0 = time.perf_counter()
        covered = len(backend.restore(seq, blob))
        restore_s.append(time.perf_counter() - t0)
        (pending,) = backend.decode([Step(seq, pending, sampler)])
    backend.release(seq)
    sampler.close()
    return {"context_tokens": covered, "park_s": park_s, "restore_s": restore_s, "bytes": sizes}


def per_backend(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    settings = ModelSettings(model="default", backend=name, n_ctx=args.n_ctx, threads=args.threads)
    with Engine.from_settings(settings, EngineSettings(max_queue=4)) as engine:
        loaded = time.perf_counter() - t0
        other = engine.tokenize("Something else entirely, to overwrite the cache.")
        out: dict[str, Any] = {"how": HOW.get(name, ""), "load_s": loaded, "contexts": {}}
        for n in args.contexts:
            tokens = context_tokens(engine, n)
            raw = engine.call(lambda b, t=tokens: measure(b, t, other, args.generated, args.reps))
            k = raw["context_tokens"] / 1000
            park_ms = statistics.median(raw["park_s"]) * 1e3
            restore_ms = statistics.median(raw["restore_s"]) * 1e3
            size = statistics.median(raw["bytes"])
            out["contexts"][str(n)] = {
                **raw,
                "park_ms_median": park_ms,
                "restore_ms_median": restore_ms,
                "park_ms_per_1k_tokens": park_ms / k,
                "restore_ms_per_1k_tokens": restore_ms / k,
                "bytes_per_1k_tokens": size / k,
            }
            print(
                f"{name} {raw['context_tokens']} tokens: park {park_ms:.1f} ms, restore {restore_ms:.1f} ms, "
                f"{size / 1e6:.2f} MB",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="llama,mlx,onnx")
    ap.add_argument("--contexts", default="256,1024,2048", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--generated", type=int, default=16, help="tokens decoded before the first park")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = ap.parse_args()
    report: dict[str, Any] = {
        "benchmark": "park_resume",
        "command": "nice -n 10 python " + " ".join(sys.argv),
        "model": "default (Gemma 3 270M; llama.cpp: Q4_K_M GGUF; MLX and ONNX: the cached conversions)",
        "method": f"prompt of N real tokens, {args.generated} decoded, then {args.reps} x (park, another "
        "request on the backend, restore, one decode step); medians; per 1k tokens = value / (tokens the "
        "state covers / 1000)",
        "threads": args.threads,
        "niceness": os.nice(0),
        "backends": {},
        "skipped": {},
    }
    for name in args.backends.split(","):
        spec = get_spec(name)
        if not spec.installed():
            report["skipped"][name] = f"not installed (pip install 'edgeserve[{spec.extra}]')"
            continue
        report["backends"][name] = per_backend(name, args)
    path = h.save("park_resume", report)
    plot(report, path.with_suffix(".png"))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("park_ms_median", "park (ms)"), ("restore_ms_median", "restore (ms)"), ("bytes", "parked MB"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, data in report["backends"].items():
            xs = [c["context_tokens"] for c in data["contexts"].values()]
            ys = [statistics.median(c[key]) / 1e6 if key == "bytes" else c[key] for c in data["contexts"].values()]
            ax.plot(xs, ys, "o-", label=name)
        ax.set_xlabel("tokens of context")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("Park and restore one sequence, through the Backend protocol (default model, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
