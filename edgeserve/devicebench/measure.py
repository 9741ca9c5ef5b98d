"""One backend measured through the engine's Backend protocol, on the engine's loop thread.

Each run opens a sequence of ``context`` tokens with nothing reused, prefills all but the last
token, evaluates the last one and picks the first new token (that is the TTFT), decodes a fixed
number of tokens greedily (EOS is not checked: every run decodes the same count), parks the
sequence (its KV state to host bytes) and restores it. Reported: the median over repetitions.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeserve.backend import Backend, Step
from edgeserve.types import SamplingParams

if TYPE_CHECKING:
    from edgeserve.engine import Engine

#: A sequence id the engine never hands out while ``Engine.call`` holds the loop.
BENCH_SEQ = 1 << 30
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
#: The default chain (top-k 40, top-p 0.95, temperature 0.8): what sampling adds to a greedy step.
SAMPLED = SamplingParams(ignore_eos=True, seed=0)
#: A park payload smaller than this per token cannot hold keys and values (one KV head of 16 dims
#: in 2 layers at 16 bits is already 128 bytes): the backend parks tokens and replays them.
MIN_KV_BYTES_PER_TOKEN = 64
TEXT = (
    "The river rises in the hills to the north of the town and runs south for about forty miles before it "
    "reaches the sea. For most of the year it is slow and shallow, and children wade across it in summer to "
    "reach the meadows on the far bank. In the spring, when the snow on the hills melts, the water comes up "
    "quickly and the old stone bridge has more than once been closed. The town grew up around a mill that "
    "stood beside the bridge, and the mill ground wheat for the farms of the valley until the railway came. "
)


@dataclass(frozen=True)
class Run:
    """One run at one context; times in seconds."""

    context: int
    prefill_s: float
    ttft_s: float
    decode_s: float
    decode_tokens: int
    park_s: float
    restore_s: float
    park_bytes: int
    #: Bytes of the park blob that are the backend's payload (the envelope's header aside).
    payload_bytes: int
    #: Tokens the parked state covers.
    state_tokens: int


def prompt_tokens(engine: Engine, n: int) -> list[int]:
    """``n`` tokens of plain English (a paragraph repeated): attention costs what it costs whatever
    the text, and ``open(reuse=False)`` keeps any cache from helping."""
    tokens = engine.tokenize(TEXT)
    while len(tokens) < n:
        tokens += engine.tokenize(TEXT, add_bos=False)
    return tokens[:n]


def one_run(engine: Engine, tokens: Sequence[int], decode_tokens: int, params: SamplingParams = GREEDY) -> Run:
    def run(b: Backend) -> Run:
        seq, sampler = BENCH_SEQ, b.sampler(params)
        try:
            start = time.perf_counter()
            b.open(seq, tokens, reuse=False)
            b.prefill(seq, tokens[:-1])
            prefilled = time.perf_counter()
            (pending,) = b.decode([Step(seq, tokens[-1], sampler)])
            first = time.perf_counter()
            for _ in range(decode_tokens):
                (pending,) = b.decode([Step(seq, pending, sampler)])
            decoded = time.perf_counter()
            blob = b.park(seq)
            parked = time.perf_counter()
            b.restore(seq, blob)
            restored = time.perf_counter()
            b.decode([Step(seq, pending, sampler)])  # the restored sequence goes on
        finally:
            b.release(seq)
            sampler.close()
        payload, n_state = split_blob(blob)
        return Run(
            context=len(tokens),
            prefill_s=prefilled - start,
            ttft_s=first - start,
            decode_s=decoded - first,
            decode_tokens=decode_tokens,
            park_s=parked - decoded,
            restore_s=restored - parked,
            park_bytes=len(blob),
            payload_bytes=payload,
            state_tokens=n_state,
        )

    return engine.call(run)


def split_blob(blob: bytes) -> tuple[int, int]:
    """(payload bytes, tokens covered) of a park blob: ``MAGIC\\n`` + one JSON header line (the
    fingerprint and ``tokens``) + the backend's payload, as every backend writes it."""
    magic_end = blob.index(b"\n") + 1
    header_end = blob.index(b"\n", magic_end) + 1
    header = json.loads(blob[magic_end:header_end])
    return len(blob) - header_end, len(header.get("tokens", []))


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """Medians over one context's runs, in the units of the report."""

    def med(fn: Callable[[Run], float]) -> float:
        return float(statistics.median(fn(r) for r in runs))

    last = runs[-1]
    per_token = last.payload_bytes / max(last.state_tokens, 1)
    is_kv = per_token >= MIN_KV_BYTES_PER_TOKEN
    return {
        "context": last.context,
        "reps": len(runs),
        "prefill_tok_s": med(lambda r: (r.context - 1) / r.prefill_s),
        "ttft_ms": med(lambda r: r.ttft_s * 1e3),
        "decode_tok_s": med(lambda r: r.decode_tokens / r.decode_s),
        "decode_tok_s_best": max(r.decode_tokens / r.decode_s for r in runs),
        "park_ms": med(lambda r: r.park_s * 1e3),
        "restore_ms": med(lambda r: r.restore_s * 1e3),
        "park_bytes": last.park_bytes,
        "state_tokens": last.state_tokens,
        "kv_bytes": last.payload_bytes if is_kv else None,
        "kv_bytes_per_token": per_token if is_kv else None,
    }


class PeakRss:
    """The process's resident set, sampled on a thread (psutil has no portable peak): the highest
    reading between ``start`` and ``stop``."""

    def __init__(self, interval_s: float = 0.02) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="edgeserve-bench-rss", daemon=True)
        self.before = self.peak = int(self._process.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, int(self._process.memory_info().rss))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, int(self._process.memory_info().rss))
