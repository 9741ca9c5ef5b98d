"""Thread count under contention: the default (adaptive) against fixed counts, with and without a
CPU-bound competitor process, decode tok/s on the default model.

Why: llama.cpp's threads meet at a barrier after every operation; beside one CPU-bound process on
2 cores, 2 threads decoded at 0.5-1.2 tok/s where 1 thread kept ~50. The default must not fall into
that: target, adaptive decode >= 0.8x the best fixed count, in both scenarios.

One engine per configuration, all loaded at once and kept for the whole run (the adaptive one
keeps what it learnt between requests, as a server does). Each repetition runs one greedy request
per configuration, the order rotating, so drift on this shared machine hits all alike. A request
decodes up to ``--tokens`` tokens or for ``--cap-s`` seconds (a fixed count that has lost its core
would take minutes for 128 tokens), and its decode rate is tokens after the first over the time
since the first. The competitor is ``python -c 'while True: pass'``, started before its scenario's
first request and killed after its last.

    python bench/threads_contention.py [--reps 5] [--tokens 128] [--cap-s 15] [--fixed 1 2] [--raw]

``--raw`` runs a decode loop over llama-cpp-python with the ThreadTuner applied through
``llama_set_n_threads`` (the controller alone, on real decode steps), twice: as is, and
``adaptive+cut``, where a probe step past the tuner's deadline is cut short with llama.cpp's abort
callback; without ``--raw``, the engine and its backend's wiring. Writes
bench/results/threads_contention[_raw].json and .png: per scenario, the median tok/s of each
configuration and the ratio of each adaptive one to the best fixed count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import save

from edgeserve import Engine, ModelSettings, TokenEvent
from edgeserve.threads import ThreadTuner

OUT = Path(__file__).resolve().parent / "results"
PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle. Once upon a time"


def _rate(start: float, stamps: list[float]) -> dict[str, float]:
    """(tokens after the first) / (seconds since the first token), from each token's arrival."""
    assert len(stamps) > 1
    return {
        "tokens": len(stamps),
        "decode_s": stamps[-1] - stamps[0],
        "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "ttft_s": stamps[0] - start,
    }


class EngineRunner:
    """The real thing: edgeserve's Engine, its backend choosing (or pinning) the thread count."""

    def __init__(self, settings: ModelSettings, stack: ExitStack) -> None:
        self.engine = stack.enter_context(Engine.from_settings(settings))

    def request(self, tokens: int, cap_s: float) -> dict[str, float]:
        start = time.perf_counter()
        stamps: list[float] = []
        for event in self.engine.stream(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True):
            if isinstance(event, TokenEvent):
                stamps.extend([time.perf_counter()] * len(event.token_ids))
                if stamps[-1] - stamps[0] > cap_s:
                    break  # leaving the loop cancels the request
        return _rate(start, stamps)

    def tuner(self) -> ThreadTuner | None:
        backend = self.engine.backend
        found = getattr(backend, "tuner", None) or getattr(backend, "_tuner", None)
        return found if isinstance(found, ThreadTuner) else None


class RawRunner:
    """``--raw``: a decode loop over llama-cpp-python (greedy, one token per step), a ThreadTuner fed
    each step's time and applied with ``llama_set_n_threads`` (the controller on real steps, without
    the engine). With ``cut``, a probe step past the tuner's ``deadline_s`` is cut short through
    llama.cpp's abort callback and run again at the count the tuner answers."""

    def __init__(self, settings: ModelSettings, stack: ExitStack, cut: bool = False) -> None:
        import llama_cpp

        from edgeserve.models import default_model_path

        self._lib = llama_cpp
        self._tuner = None if settings.threads_pinned else ThreadTuner(settings.threads)
        n = settings.threads if self._tuner is None else self._tuner.threads
        path = str(default_model_path(settings.cache_dir))
        self.llm = llama_cpp.Llama(path, n_ctx=settings.n_ctx, n_threads=n, n_threads_batch=n, verbose=False)
        stack.callback(self.llm.close)
        self.prompt = self.llm.tokenize(PROMPT.encode())
        self._cut = cut
        self._deadline_at: float | None = None
        # Called by llama.cpp between graph nodes while set: True ends the step (llama_decode returns 2).
        self._abort = llama_cpp.ggml_abort_callback(
            lambda _: self._deadline_at is not None and time.perf_counter() > self._deadline_at
        )
        self._no_abort = llama_cpp.ggml_abort_callback()
        self.cut_steps = 0

    def request(self, tokens: int, cap_s: float) -> dict[str, float]:
        import numpy as np

        start = time.perf_counter()
        stamps: list[float] = []
        self.llm.reset()
        self.llm.eval(self.prompt)
        n_vocab = self.llm.n_vocab()
        self.last_tokens: list[int] = []
        while len(stamps) < tokens and (not stamps or stamps[-1] - stamps[0] <= cap_s):
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(n_vocab,))
            self.last_tokens.append(int(logits.argmax()))
            self._step(self.last_tokens[-1])
            stamps.append(time.perf_counter())
        return _rate(start, stamps)

    def _step(self, token: int) -> None:
        ctx = self.llm.ctx
        while True:
            deadline = self._tuner.deadline_s if self._tuner is not None and self._cut else None
            if deadline is not None:
                self._lib.llama_set_abort_callback(ctx, self._abort, None)
            started = time.perf_counter()
            self._deadline_at = None if deadline is None else started + deadline
            try:
                self.llm.eval([token])  # starts by dropping any KV a cut step left behind
                aborted = False
            except RuntimeError:  # "llama_decode returned 2": cut at the deadline
                if deadline is None:
                    raise
                aborted = True
                self.cut_steps += 1
            finally:
                if deadline is not None:
                    self._lib.llama_set_abort_callback(ctx, self._no_abort, None)
            if self._tuner is not None:
                n = self._tuner.observe(time.perf_counter() - started, aborted=aborted)
                if n is not None:
                    self._lib.llama_set_n_threads(ctx, n, n)
            if not aborted:
                return

    def tuner(self) -> ThreadTuner | None:
        return self._tuner


def competitor() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def tuner_state(tuner: ThreadTuner | None) -> dict[str, Any] | None:
    if tuner is None:
        return None
    return {"threads": tuner.threads, "probes": tuner.probes, "last_scores": tuner.last_scores}


def run(args: argparse.Namespace) -> dict[str, Any]:
    adaptive = ModelSettings(backend="llama", n_ctx=1024)
    configs: dict[str, ModelSettings] = {
        "adaptive": adaptive,
        **({"adaptive+cut": adaptive} if args.raw else {}),
        **{f"fixed {n}": ModelSettings(backend="llama", n_ctx=1024, threads=n) for n in args.fixed},
    }
    rows: list[dict[str, Any]] = []
    tuner_after: dict[str, Any] = {}
    with ExitStack() as stack:
        runners: dict[str, EngineRunner | RawRunner] = {
            name: RawRunner(s, stack, cut=name.endswith("+cut")) if args.raw else EngineRunner(s, stack)
            for name, s in configs.items()
        }
        for runner in runners.values():  # warm up (and let the adaptive one make its first probe)
            runner.request(16, args.cap_s)
        for scenario in ("idle", "competitor"):
            rival = competitor() if scenario == "competitor" else None
            try:
                time.sleep(0.5 if rival else 0)
                names = list(runners)
                for rep in range(args.reps):
                    shift = rep % len(names)
                    for name in names[shift:] + names[:shift]:
                        row = {"scenario": scenario, "config": name, "rep": rep}
                        row.update(runners[name].request(args.tokens, args.cap_s))
                        rows.append(row)
                        print(f"{scenario:10} {name:9} rep {rep}: {row['tok_s']:6.1f} tok/s", flush=True)
                tuner_after[scenario] = {n: tuner_state(r.tuner()) for n, r in runners.items() if r.tuner()}
                for n, r in runners.items():
                    if isinstance(r, RawRunner) and r.tuner():
                        tuner_after[scenario][n]["cut_steps_so_far"] = r.cut_steps
            finally:
                if rival:
                    rival.kill()
                    rival.wait()
    return {"rows": rows, "tuner_after": tuner_after, "configs": list(configs)}


def summarize(rows: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario in ("idle", "competitor"):
        medians = {
            c: statistics.median(r["tok_s"] for r in rows if r["scenario"] == scenario and r["config"] == c)
            for c in configs
        }
        fixed = {c: v for c, v in medians.items() if c.startswith("fixed")}
        best = max(fixed, key=lambda c: fixed[c])
        out[scenario] = {
            "median_tok_s": {c: round(v, 2) for c, v in medians.items()},
            "best_fixed": best,
        }
        for c in (c for c in configs if c.startswith("adaptive")):
            out[scenario][f"{c}_over_best_fixed"] = round(medians[c] / fixed[best], 3)
            out[scenario][f"{c}_meets_target_0_8"] = medians[c] >= 0.8 * fixed[best]
            # Paired: each repetition's configurations ran back to back, so their ratio carries
            # less of the machine's drift than a ratio of medians over the whole run.
            rate = {(r["config"], r["rep"]): r["tok_s"] for r in rows if r["scenario"] == scenario}
            reps = sorted({rep for _, rep in rate})
            paired = [rate[(c, rep)] / rate[(best, rep)] for rep in reps]
            out[scenario][f"{c}_over_best_fixed_paired_median"] = round(statistics.median(paired), 3)
    return out


def plot(rows: list[dict[str, Any]], configs: list[str], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, scenario in zip(axes, ("idle", "competitor"), strict=True):
        for i, c in enumerate(configs):
            values = [r["tok_s"] for r in rows if r["scenario"] == scenario and r["config"] == c]
            ax.scatter([i] * len(values), values, alpha=0.6)
            ax.hlines(statistics.median(values), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(configs)), configs)
        ax.set_title("no competitor of ours" if scenario == "idle" else "one CPU-bound competitor")
        ax.set_ylabel("decode tok/s")
        ax.set_ylim(bottom=0)
    fig.suptitle(f"Default model, llama.cpp: adaptive thread count vs fixed ({note})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cap-s", type=float, default=15.0)
    parser.add_argument("--fixed", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--raw", action="store_true", help="llama-cpp-python's loop with the tuner, not the engine")
    parser.add_argument("--from", dest="saved", type=Path, default=None, help="recompute a saved run's summary")
    args = parser.parse_args()
    if args.saved:
        report = json.loads(args.saved.read_text())
        report["summary"] = summarize(report["rows"], list(dict.fromkeys(r["config"] for r in report["rows"])))
        args.saved.write_text(json.dumps(report, indent=2))
        print(json.dumps(report["summary"], indent=1))
        return
    load_at_start = os.getloadavg()[0]
    result = run(args)
    report = {
        "benchmark": "threads_contention",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "settings": vars(args),
        "load_average_1m_at_start": load_at_start,
        "summary": summarize(result["rows"], result["configs"]),
        "tuner_after": result["tuner_after"],
        "rows": result["rows"],
    }
    name = "threads_contention" + ("_raw" if args.raw else "")
    path = save(name, report)
    try:
        load = f"load average {load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at end"
        plot(result["rows"], result["configs"], OUT / f"{name}.png", ("raw loop; " if args.raw else "engine; ") + load)
    except ImportError:
        print("matplotlib missing: no PNG (pip install 'edgeserve[bench]')")
    for scenario, s in report["summary"].items():
        print(scenario, s)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
