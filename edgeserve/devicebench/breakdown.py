"""Where a llama.cpp decode step's time goes, measured on llama.cpp itself (not the engine).

At a fixed context, a step is timed three ways, interleaved so that a busy machine slows each
alike, and the evaluated position is removed after each step so the context does not grow:

- ``step``: one token evaluated with its logits (what decode does);
- ``no_logits``: the same token with no output requested; llama.cpp then skips the output
  projection (the lm_head: for Gemma 3 a 262,144 x 640 matrix, most of the model's bytes), so
  ``step - no_logits`` is the lm_head's time;
- ``sample``: picking the greedy token from the logits with llama.cpp's sampler (as the llama
  backend does): it builds a candidate array over the whole vocabulary each step.

Each part's bytes over its time is the bandwidth it reached, next to the measured ceiling.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeserve.devicebench.measure import TEXT
from edgeserve.devicebench.roofline import Bandwidth

STEPS = 24


def llama_breakdown(
    path: Path, context: int, thread_counts: Sequence[int], bandwidth: Bandwidth, weights: dict[str, Any]
) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp import _internals

    internals: Any = _internals  # llama-cpp-python's internals carry partial annotations

    top = max(thread_counts)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context + 16, n_threads=top, n_threads_batch=top, verbose=False)
    try:
        tokens = llm.tokenize(TEXT.encode() * (1 + context // 60))[:context]
        llm.eval(tokens)
        ctx, batch, greedy = llm._ctx, internals.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1), internals.LlamaSampler()
        greedy.add_greedy()

        def step(want_logits: bool) -> None:
            batch.set_batch([tokens[-1]], n_past=context, logits_all=False)
            batch.batch.logits[0] = want_logits
            ctx.decode(batch)
            ctx.kv_cache_seq_rm(-1, context, -1)  # the context stays `context` tokens long

        rows = {}
        for n in thread_counts:
            llama_cpp.llama_set_n_threads(ctx.ctx, n, n)
            step(True)  # warm: new thread count
            full, bare, sample = [], [], []
            for _ in range(STEPS):
                full.append(_timed(lambda: step(True)))
                sample.append(_timed(lambda: greedy.sample(ctx, -1)))
                bare.append(_timed(lambda: step(False)))
            rows[str(n)] = _parts(full, bare, sample, bandwidth.ceiling(n), weights)
        greedy.close()
    finally:
        llm.close()
    return {
        "context": context,
        "method": "llama.cpp decode of one token with and without its logits (the lm_head skipped), "
        f"and the greedy sampler; medians of {STEPS} interleaved steps",
        "by_threads": rows,
    }


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _parts(
    full: list[float], bare: list[float], sample: list[float], ceiling_gbs: float, weights: dict[str, Any]
) -> dict[str, Any]:
    step_ms = statistics.median(full) * 1e3
    body_ms = statistics.median(bare) * 1e3
    head_ms = max(step_ms - body_ms, 0.0)
    head_bytes = int(weights.get("output_layer_bytes") or 0)
    body_bytes = int(weights["bytes_read_per_token"]) - head_bytes

    def gbs(n_bytes: int, ms: float) -> float | None:
        return n_bytes / (ms / 1e3) / 1e9 if ms > 0 and n_bytes > 0 else None

    return {
        "step_ms": step_ms,
        "lm_head_ms": head_ms,
        "rest_ms": body_ms,
        "sample_greedy_ms": statistics.median(sample) * 1e3,
        "lm_head_share": head_ms / step_ms if step_ms else None,
        "lm_head_bytes": head_bytes,
        "rest_bytes": body_bytes,
        "lm_head_gbs": gbs(head_bytes, head_ms),
        "rest_gbs": gbs(body_bytes, body_ms),
        "ceiling_gbs": ceiling_gbs,
    }
