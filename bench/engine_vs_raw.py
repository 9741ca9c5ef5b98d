"""Engine overhead: edgeserve's Engine vs raw llama-cpp-python, same model, prompt and settings, one run.

Each repetition runs both sides on the same 500-token prompt and generates 128 tokens (greedy,
EOS ignored), alternating which side goes first so drift on a shared machine hits both alike. Every
repetition's prompt starts differently, so neither side can reuse a cached prefix. Reported:
medians per side and the ratios engine/raw (targets: decode tok/s >= 0.98, TTFT <= 1.02).

    python bench/engine_vs_raw.py [--reps 7] [--prompt-tokens 500] [--gen-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _plots import side_by_side

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "clairvoyant-labeled" / "oasst1_labeled.csv"
OUT = ROOT / "bench" / "results"


def prompt_text() -> str:
    """Real prompts (OpenAssistant, from the Clairvoyant labeled set) concatenated; a fixed paragraph
    when the shared data is not beside the checkout."""
    if DATA.exists():
        import csv

        with DATA.open(newline="") as f:
            return "\n\n".join(row["prompt"] for _, row in zip(range(60), csv.DictReader(f), strict=False))
    return " ".join(["Local inference keeps data on the device and answers without a network."] * 80)


def raw_run(llm: Any, tokens: list[int], n_gen: int) -> tuple[float, float]:
    """TTFT (s) and decode tok/s through llama-cpp-python's own generation loop."""
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    for _ in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        n += 1
        last = time.perf_counter()
        if n == 1:
            first = last
        if n == n_gen:
            break
    return first - start, (n - 1) / (last - first)


def engine_run(engine: Any, tokens: list[int], n_gen: int) -> tuple[float, float]:
    from edgeserve import SamplingParams

    result = engine.generate(tokens, SamplingParams(max_tokens=n_gen, temperature=0, ignore_eos=True))
    assert result.completion_tokens == n_gen, result
    return result.ttft_s, result.decode_tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=500)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import llama_cpp

    from edgeserve import Engine, ModelSettings
    from edgeserve.models import resolve

    load_before = os.getloadavg()[0]
    settings = ModelSettings(model="default", backend="llama", n_ctx=2048)
    if args.threads:
        settings = settings.model_copy(update={"threads": args.threads})
    path = resolve(settings.model, cache_dir=settings.cache_dir).path
    raw = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=settings.n_ctx,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_batch,
        n_threads=settings.threads,
        n_threads_batch=settings.threads,
        verbose=False,
    )
    engine = Engine.from_settings(settings)
    base = engine.tokenize(prompt_text())
    n_prompt = args.prompt_tokens
    if len(base) < n_prompt + args.reps + 1:
        raise SystemExit(f"prompt text too short: {len(base)} tokens")

    # Warm both (page in the weights, allocate buffers) before measuring.
    raw_run(raw, base[: n_prompt // 2], 8)
    engine_run(engine, base[1 : n_prompt // 2], 8)

    rows = []
    for rep in range(args.reps):
        # BOS, then a window starting at a different place each time: no shared prefix across reps.
        tokens = [base[0], *base[2 + rep : 1 + rep + n_prompt]]
        sides = [("raw", lambda t=tokens: raw_run(raw, t, args.gen_tokens))]
        sides.append(("engine", lambda t=tokens: engine_run(engine, t, args.gen_tokens)))
        if rep % 2:
            sides.reverse()
        for name, fn in sides:
            ttft, rate = fn()
            rows.append({"rep": rep, "side": name, "ttft_s": ttft, "decode_tok_s": rate})
            print(f"rep {rep} {name:>6}: TTFT {ttft * 1000:7.1f} ms  decode {rate:6.1f} tok/s", flush=True)
    engine.close()
    raw.close()

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["side"] == side)

    summary = {
        side: {"ttft_ms_p50": med(side, "ttft_s") * 1000, "decode_tok_s_p50": med(side, "decode_tok_s")}
        for side in ("raw", "engine")
    }
    ratios = {
        "decode_tok_s_engine_over_raw": summary["engine"]["decode_tok_s_p50"] / summary["raw"]["decode_tok_s_p50"],
        "ttft_engine_over_raw": summary["engine"]["ttft_ms_p50"] / summary["raw"]["ttft_ms_p50"],
    }
    report = {
        "benchmark": "engine_vs_raw",
        "model": str(path.name),
        "prompt_tokens": n_prompt,
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "threads": settings.threads,
        "prompt_source": str(DATA.relative_to(ROOT.parent)) if DATA.exists() else "built-in paragraph",
        "machine": {"system": platform.system(), "machine": platform.machine(), "cpu": platform.processor()},
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "summary": summary,
        "ratios": ratios,
        "targets": {"decode_tok_s_engine_over_raw": ">= 0.98", "ttft_engine_over_raw": "<= 1.02"},
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "engine_vs_raw.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "engine_vs_raw.png")
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=2))


def plot(report: dict[str, Any], path: Path) -> None:
    r = report["ratios"]
    side_by_side(
        report["rows"],
        [("raw", "raw llama-cpp-python"), ("engine", "edgeserve engine")],
        [("ttft_s", 1000, "TTFT (ms)"), ("decode_tok_s", 1, "decode (tok/s)")],
        f"{report['prompt_tokens']}-token prompt, {report['gen_tokens']} tokens, {report['threads']} threads: "
        f"decode ratio {r['decode_tok_s_engine_over_raw']:.3f}, TTFT ratio {r['ttft_engine_over_raw']:.3f}",
        path,
    )


if __name__ == "__main__":
    main()
