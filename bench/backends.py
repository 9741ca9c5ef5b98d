"""TTFT and decode speed per backend on this machine, in one run: same model (the embedded Gemma 3
270M), same prompts, same settings, through the Engine.

Each repetition runs every installed backend on the same prompt (a window of a fixed paragraph
starting at a different place each time, so no backend reuses a cached prefix) and generates a
fixed number of tokens (greedy, EOS ignored); the order of backends rotates per repetition so drift
on a shared machine hits all alike. Reported: medians per backend. Model loading (and the one-time
GGUF conversion a backend may need) happens before any timing.

Apple Silicon (where MLX runs on Metal) cannot be measured here: those figures are left as null in
the JSON, to be filled by running this script on such a machine.

    python bench/backends.py [--reps 3] [--prompt-tokens 128] [--gen-tokens 32] [--threads N]

A backend joins by adding its name to ``BACKENDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
BACKENDS = ["llama", "mlx", "onnx"]

PARAGRAPH = (
    "The river rises in the hills to the north of the town and runs south for about forty miles before it "
    "reaches the sea. For most of the year it is slow and shallow, and children wade across it in summer to "
    "reach the meadows on the far bank. In the spring, when the snow on the hills melts, the water comes up "
    "quickly and the old stone bridge has more than once been closed. The town grew up around a mill that "
    "stood beside the bridge, and the mill ground wheat for the farms of the valley until the railway came. "
)


def run_once(engine: Any, tokens: list[int], n_gen: int) -> tuple[float, float]:
    from edgeserve import SamplingParams

    result = engine.generate(tokens, SamplingParams(max_tokens=n_gen, temperature=0, ignore_eos=True))
    assert result.completion_tokens == n_gen, result
    return result.ttft_s, result.decode_tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from edgeserve import Engine, ModelSettings
    from edgeserve.backend import get_spec
    from edgeserve.hardware import probe

    engines: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in BACKENDS:
        if not get_spec(name).installed():
            skipped[name] = f"not installed (pip install 'edgeserve[{get_spec(name).extra}]')"
            continue
        settings = ModelSettings(model="default", backend=name, n_ctx=2048)
        if args.threads:
            settings = settings.model_copy(update={"threads": args.threads})
        engines[name] = Engine.from_settings(settings)
        print(f"loaded {name} ({engines[name].capabilities.device})", flush=True)
    threads = args.threads or ModelSettings().threads

    first = next(iter(engines.values()))
    base = first.tokenize(PARAGRAPH * (2 + args.prompt_tokens // 80))
    n_prompt = args.prompt_tokens
    if len(base) < n_prompt + args.reps + 2:
        raise SystemExit(f"prompt text too short: {len(base)} tokens")
    for engine in engines.values():  # warm up: page in the weights, allocate buffers
        run_once(engine, base[: n_prompt // 4], 4)

    load_before = os.getloadavg()[0]
    rows = []
    names = list(engines)
    for rep in range(args.reps):
        tokens = [base[0], *base[2 + rep : 1 + rep + n_prompt]]  # BOS, then a window no rep shares
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            ttft, rate = run_once(engines[name], tokens, args.gen_tokens)
            rows.append({"rep": rep, "backend": name, "ttft_s": ttft, "decode_tok_s": rate})
            print(f"rep {rep} {name:>6}: TTFT {ttft * 1000:8.1f} ms  decode {rate:6.1f} tok/s", flush=True)
    devices = {name: e.capabilities.device for name, e in engines.items()}
    for engine in engines.values():
        engine.close()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["backend"] == name)

    summary = {
        name: {
            "device": devices[name],
            "ttft_ms_p50": med(name, "ttft_s") * 1000,
            "decode_tok_s_p50": med(name, "decode_tok_s"),
        }
        for name in names
    }
    hw = probe()
    report = {
        "benchmark": "backends",
        "model": "default (Gemma 3 270M Q4_K_M; MLX runs its float32 conversion, ONNX Runtime its int8 one)",
        "prompt_tokens": n_prompt,
        "gen_tokens": args.gen_tokens,
        "reps": args.reps,
        "threads": threads,
        "machine": {
            "system": platform.system(),
            "machine": platform.machine(),
            "cpu": platform.processor(),
            "physical_cores": hw.physical_cores,
            "apple_silicon": hw.apple_silicon,
            # Other work on a shared machine slows every backend; these say how busy it was.
            "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        },
        "summary": summary,
        "skipped": skipped,
        "apple_silicon": {
            "note": "not measured: no Apple Silicon machine here. Run `python bench/backends.py` on one "
            "(MLX on Metal) and fill these in.",
            "summary": {name: {"ttft_ms_p50": None, "decode_tok_s_p50": None} for name in BACKENDS},
        }
        if not hw.apple_silicon
        else {"note": "this run is on Apple Silicon: see summary"},
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backends.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, OUT / "backends.png")
    print(json.dumps({"summary": summary, "skipped": skipped}, indent=2))
    print(f"wrote {OUT / 'backends.json'} and {OUT / 'backends.png'}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, label, scale in (
        (axes[0], "ttft_s", "TTFT (ms, lower is better)", 1000.0),
        (axes[1], "decode_tok_s", "decode (tok/s, higher is better)", 1.0),
    ):
        for i, name in enumerate(names):
            vals = [r[key] * scale for r in report["rows"] if r["backend"] == name]
            ax.bar(i, statistics.median(vals), color=f"C{i}", alpha=0.7)
            ax.scatter([i] * len(vals), vals, color="black", s=10)
        ax.set_xticks(range(len(names)), [f"{n}\n({report['summary'][n]['device']})" for n in names])
        ax.set_ylabel(label)
    m = report["machine"]
    fig.suptitle(
        f"{m['system']} {m['machine']}, {report['threads']} threads: {report['prompt_tokens']}-token prompt, "
        f"{report['gen_tokens']} tokens, median of {report['reps']}"
        + ("" if m["apple_silicon"] else " (Apple Silicon: not measured)"),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
