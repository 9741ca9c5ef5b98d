"""What if: the real engine's srpt on a virtual clock, to see why a target is met or missed.

Not a benchmark of speed: the Engine (its loop, ``Scheduler``, ``Running.remaining_tokens``) runs
unchanged on ``edgeserve.scripted.ScriptedBackend`` whose every call advances a virtual clock by
what that call costs on the real device (the service profile fitted on the real bursts, and the
llama.cpp park/restore cost measured by ``park_resume.py``) instead of sleeping. Each request's
answer ends by itself (EOS) after its scripted length, never by max_tokens, so the scheduler learns
nothing from the cap. Bursts draw the prompts of ``srpt_burst.py`` (same seeds), predictions from
the shipped predictor on the real prompt text.

Scenarios vary one thing at a time against the benchmark as run (answers scaled by 1/16, predictions
in real tokens): lengths not scaled, predictions scaled with the answers, the hysteresis factor, the
quantum. The loop's own decisions run for real; only time is simulated, and the machine's noise
and HTTP are left out, so compare each scenario with the "as benchmarked" row, not with the real run.

    python bench/srpt_whatif.py [--bursts 10] [--n 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from edgeserve import Engine, FinalEvent, SamplingParams, TokenEvent
from edgeserve.backend import SeqId, Step
from edgeserve.scripted import BOS, EOS, N_SPECIAL, ScriptedBackend
from edgeserve.settings import AGING_FACTOR, EngineSettings

#: The service profile: medians of the fits to srpt_burst.py's five FCFS runs (llama.cpp, one thread,
#: a shared machine: prefill 176-343 tok/s, decode 16-39 tok/s, overhead 0-0.22 s).
PREFILL_TOK_S, DECODE_TOK_S, OVERHEAD_S = 293.0, 25.0, 0.05
#: llama.cpp park + restore, seconds per token of context (park_resume.py, order of magnitude).
SWITCH_S_PER_TOKEN = 2e-6
GREEDY = SamplingParams(temperature=0, max_tokens=None)  # no cap: the scheduler must not learn the length


@dataclass
class Clock:
    t: float = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class TimedBackend(ScriptedBackend):
    """The scripted backend, each call advancing ``clock`` by its modelled cost; answer lengths are
    read from the prompt (its second token is the job's index)."""

    clock: Clock = field(default_factory=Clock)
    lengths: Sequence[int] = ()
    prefill_tok_s: float = PREFILL_TOK_S
    decode_tok_s: float = DECODE_TOK_S
    overhead_s: float = OVERHEAD_S
    _target: dict[SeqId, int] = field(default_factory=dict)

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        self._target[seq] = self.lengths[prompt[1] - N_SPECIAL + 256 * (prompt[2] - N_SPECIAL)]
        self.clock.t += self.overhead_s  # the per-request cost the profile fitted (HTTP, tokenizing)
        return super().open(seq, prompt, reuse=False)

    def prefill(self, seq: SeqId, tokens: Sequence[int]) -> None:
        self.clock.t += len(tokens) / self.prefill_tok_s
        super().prefill(seq, tokens)

    def decode(self, steps: Sequence[Step]) -> list[int]:
        self.clock.t += len(steps) / self.decode_tok_s
        return super().decode(steps)

    def park(self, seq: SeqId) -> bytes:
        self.clock.t += SWITCH_S_PER_TOKEN / 2 * len(self._get(seq))
        return super().park(seq)

    def restore(self, seq: SeqId, blob: bytes) -> list[int]:
        tokens = super().restore(seq, blob)
        self.clock.t += SWITCH_S_PER_TOKEN / 2 * len(tokens)
        return tokens

    def _logits(self, seq: SeqId, tokens: list[int]) -> Any:
        logits = super()._logits(seq, tokens)
        logits[EOS] = 100.0 if self._generated[seq] >= self._target[seq] else -30.0
        return logits


def prompt_tokens(index: int, n: int) -> list[int]:
    """``n`` tokens whose second and third say the job's index (``TimedBackend.open`` reads them)."""
    return [BOS, N_SPECIAL + index % 256, N_SPECIAL + index // 256, *[N_SPECIAL + 97] * max(0, n - 3)]


def run(
    jobs: list[h.Job], lengths: list[int], prompts: list[int], predicted: list[float | None], config: dict[str, Any]
) -> dict[str, Any]:
    """One burst (all at t=0) under ``config``: policy, quantum, hysteresis. Returns the per-class
    latency P50s, the makespan and the preemptions."""
    clock = Clock()
    backend = TimedBackend(n_ctx=16384, clock=clock, lengths=lengths)
    settings = EngineSettings(
        policy=config["policy"],
        preempt_quantum_s=config.get("quantum", 0.1),
        preempt_hysteresis=config.get("hysteresis", 2.0),
        aging_s=config.get("aging_s", 1e9),
    )
    done = threading.Event()
    ends: dict[int, float] = {}
    preemptions = [0]

    def sink(i: int) -> Any:
        def on(event: Any) -> None:
            if isinstance(event, FinalEvent):
                ends[i] = clock.t
                preemptions[0] += event.result.preemptions
                if len(ends) == len(jobs):
                    done.set()
            elif not isinstance(event, TokenEvent):
                ends[i] = float("nan")
                done.set()

        return on

    with Engine(backend, settings, clock=clock) as engine:

        def submit_all(_: Any) -> None:  # on the loop thread, before it runs anything: all at t=0
            for i, _job in enumerate(jobs):
                engine.submit(prompt_tokens(i, prompts[i]), GREEDY, predicted_tokens=predicted[i], on_event=sink(i))

        engine.call(submit_all)
        done.wait()
    outcomes = [
        h.Outcome(j.job_id, j.cls, j.real_tokens, lengths[i], 0.0, ends[i], ends[i], 0, None, prompts[i])
        for i, j in enumerate(jobs)
    ]
    summary = h.summarize(outcomes)
    out = {f"{c}_p50": summary[c]["latency_p50_s"] for c in h.CLASSES if c in summary}
    out.update(makespan=max(ends.values()), preemptions=preemptions[0])
    return out


#: ``aging``: True sets aging as srpt_burst.py does (AGING_FACTOR x a short request's service time).
BENCH = {"scale": 1 / 16, "pred_scale": 1.0}
SCENARIOS: dict[str, dict[str, Any]] = {
    "as benchmarked (answers x1/16, predictions in real tokens, aging 128x short service)": {**BENCH, "aging": True},
    "as benchmarked, no aging": BENCH,
    "no aging, predictions scaled with the answers (x1/16)": {**BENCH, "pred_scale": 1 / 16},
    "no aging, hysteresis 1.2": {**BENCH, "hysteresis": 1.2},
    "no aging, quantum 0.5 s": {**BENCH, "quantum": 0.5},
    "no aging, real answer lengths (not scaled)": {"scale": 1.0, "pred_scale": 1.0},
    "no aging, real answer lengths, hysteresis 1.2": {"scale": 1.0, "pred_scale": 1.0, "hysteresis": 1.2},
}
POLICIES = (("fcfs", "fcfs", True), ("sjf", "sjf", True), ("srpt", "srpt", True), ("srpt-no-predictor", "srpt", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--bursts", type=int, default=10)
    ap.add_argument("--scenarios", default="", help="comma-separated indexes into SCENARIOS (default: all)")
    ap.add_argument("--name", default="srpt_whatif", help="results file name (bench/results/NAME.json)")
    args = ap.parse_args()
    from edgeserve.predictor import LengthPredictor

    predictor = LengthPredictor.load()
    names = list(SCENARIOS)
    picked = [names[int(i)] for i in args.scenarios.split(",")] if args.scenarios else names
    report: dict[str, Any] = {
        "benchmark": "srpt_whatif",
        "command": "python " + " ".join(sys.argv),
        "profile": {"prefill_tok_s": PREFILL_TOK_S, "decode_tok_s": DECODE_TOK_S, "overhead_s": OVERHEAD_S},
        "switch_s_per_token": SWITCH_S_PER_TOKEN,
        "code": h.code_version(),
        "scenarios": {},
    }
    for name in picked:
        sc = SCENARIOS[name]
        ratios: dict[str, list[dict[str, float]]] = {p: [] for p, _, _ in POLICIES[1:]}
        for seed in range(args.bursts):
            jobs = h.workload(args.n, sc["scale"], seed)
            lengths = [max(1, round(j.real_tokens * sc["scale"])) for j in jobs]
            prompts = [len(predictor_tokens(j.prompt)) for j in jobs]
            preds = [predictor.predict([{"role": "user", "content": j.prompt}]).expected_tokens for j in jobs]
            results = {}
            shorts = [
                OVERHEAD_S + p / PREFILL_TOK_S + g / DECODE_TOK_S
                for j, p, g in zip(jobs, prompts, lengths, strict=True)
                if j.cls == "short"
            ]
            aging = {"aging_s": AGING_FACTOR * statistics.median(shorts)} if sc.get("aging") and shorts else {}
            for label, policy, predicts in POLICIES:
                predicted = [p * sc["pred_scale"] for p in preds] if predicts else [None] * len(jobs)
                results[label] = run(jobs, lengths, prompts, predicted, {"policy": policy, **sc, **aging})
            base = results["fcfs"]
            for label in ratios:
                r = {k: results[label][k] / base[k] for k in base if k != "preemptions"}
                r["preemptions"] = results[label]["preemptions"]
                ratios[label].append(r)
        report["scenarios"][name] = {
            label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in ratios.items()
        }
        print(name, {p: {k: round(v, 3) for k, v in m.items()} for p, m in report["scenarios"][name].items()})
    h.save(args.name, report)


def predictor_tokens(prompt: str) -> list[int]:
    """Rough Gemma token count of the chat-rendered prompt (4 characters a token, plus the template)."""
    return [0] * (len(prompt) // 4 + 12)


if __name__ == "__main__":
    main()
