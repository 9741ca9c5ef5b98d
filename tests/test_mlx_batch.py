"""MLX's batched decode step: several sequences in one forward over mlx-lm's merged batch caches.

Driven through the Backend protocol on the default model. Every decode step costs about a quarter
second per row on a CPU (MLX's CPU matmul grows with the rows), so generations are short and the
solo runs every test compares with are made once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from edgeserve import Engine, SamplingParams
from edgeserve.backend import Backend, SeqId, Step
from edgeserve.errors import BackendError
from edgeserve.settings import ModelSettings

pytest.importorskip("mlx.core", reason="the mlx extra is not installed: pip install 'edgeserve[mlx]'")
pytest.importorskip("mlx_lm")

N = 16
GREEDY = SamplingParams(max_tokens=N, temperature=0)
SEEDED = SamplingParams(max_tokens=N, temperature=1.0, top_k=0, top_p=1.0, seed=11, ignore_eos=True)
#: (prompt, sampling): a seeded row checks that each row draws with its own sampler.
RUNS = [
    ("The three primary colours are", GREEDY),
    ("My favourite animal is", GREEDY),
    ("Hi", SEEDED),
]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine.from_settings(ModelSettings(model="default", backend="mlx", n_ctx=1024, threads=1)) as eng:
        yield eng


@pytest.fixture(scope="module")
def solo(engine: Engine) -> list[list[int]]:
    """Each run's ``N`` tokens decoded alone (the unbatched path)."""

    def run(b: Backend, prompt: str, params: SamplingParams) -> list[int]:
        sampler = b.sampler(params)
        pending = _open(engine, b, 1, prompt)
        out = []
        for _ in range(N):
            (pending,) = b.decode([Step(1, pending, sampler)])
            out.append(pending)
        b.release(1)
        return out

    return [engine.call(lambda b, p=p, sp=sp: run(b, p, sp)) for p, sp in RUNS]


def _open(engine: Engine, b: Backend, seq: SeqId, prompt: str) -> int:
    """Open and prefill ``seq`` for ``prompt``, but its last token: the first decode step's."""
    tokens = engine.tokenize(prompt)
    b.prefill(seq, tokens[b.open(seq, tokens, reuse=False) : -1])
    return tokens[-1]


def _agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), 1)


def test_capabilities_offer_a_batch(engine: Engine) -> None:
    caps = engine.capabilities
    assert caps.max_batch == caps.max_sequences >= 4


def test_a_batch_of_four_gives_each_sequence_its_solo_tokens(
    engine: Engine, solo: list[list[int]], record_property: Any
) -> None:
    runs = [RUNS[0], RUNS[1], RUNS[0], RUNS[2]]  # the first prompt twice: no leak between rows
    expected = [solo[0], solo[1], solo[0], solo[2]]
    seqs = [11, 12, 13, 14]

    def batch(b: Backend) -> tuple[list[list[int]], int, int]:
        samplers = [b.sampler(sp) for _, sp in runs]
        pending = [_open(engine, b, s, p) for s, (p, _) in zip(seqs, runs, strict=True)]
        out: list[list[int]] = [[] for _ in seqs]
        for step in range(N):
            order = seqs if step % 2 == 0 else seqs[::-1]  # the rows follow the ids, not the call's order
            steps = [Step(s, pending[seqs.index(s)], samplers[seqs.index(s)]) for s in order]
            picked = dict(zip(order, b.decode(steps), strict=True))
            pending = [picked[s] for s in seqs]
            for i, token in enumerate(pending):
                out[i].append(token)
        for seq in seqs:  # out of a batch of 4, 3, then 2: filtered, then split
            b.release(seq)
        # The last released sequence's cache, taken out of the batch, is the next prompt's prefix.
        tokens = engine.tokenize(runs[3][0]) + out[3]
        kept = b.open(21, tokens)
        (after,) = b.decode([Step(21, tokens[-1], b.sampler(GREEDY))])
        b.release(21)
        return out, kept, after

    together, kept, after = engine.call(batch)
    assert [len(x) for x in together] == [N] * 4
    assert together[0] == together[2]
    assert [x[0] for x in together] == [x[0] for x in expected]  # the first token: no float drift yet
    agreement = [_agreement(x, y) for x, y in zip(expected, together, strict=True)]
    record_property("batched_vs_solo_greedy_agreement", agreement[:3])
    record_property("batched_vs_solo_seeded_agreement", agreement[3])
    print(f"\nmlx: batched vs solo token agreement (greedy, greedy, greedy, seeded) {agreement}")
    # It covers the prompt and every generated token but the last (sampled, never evaluated).
    assert kept == len(engine.tokenize(RUNS[2][0])) + N - 1
    assert 0 <= after < engine.capabilities.n_vocab


def test_a_member_parked_out_of_a_batch_resumes_where_it_stopped(engine: Engine, solo: list[list[int]]) -> None:
    seqs = [31, 32, 33]

    def run(b: Backend) -> list[list[int]]:
        samplers = [b.sampler(sp) for _, sp in RUNS]
        pending = [_open(engine, b, s, p) for s, (p, _) in zip(seqs, RUNS, strict=True)]
        out: list[list[int]] = [[] for _ in seqs]

        def step(members: list[int]) -> None:
            picked = b.decode([Step(seqs[i], pending[i], samplers[i]) for i in members])
            for i, token in zip(members, picked, strict=True):
                pending[i] = token
                out[i].append(token)

        for _ in range(2):
            step([0, 1, 2])
        blob = b.park(seqs[1])  # out of a merged batch of 3: the other two stay merged
        prompt = engine.tokenize(RUNS[1][0])
        step([0, 2])
        assert b.restore(seqs[1], blob) == prompt + out[1][:-1]
        for _ in range(2):  # it rejoins: the batch is split and merged again
            step([0, 1, 2])
        for seq in seqs:
            b.release(seq)
        return out

    out = engine.call(run)
    assert [len(x) for x in out] == [5, 4, 5]
    for got, alone in zip(out, solo, strict=True):
        assert got[0] == alone[0]
        assert _agreement(got, alone[: len(got)]) >= 0.5, (got, alone)


def test_a_decode_call_naming_a_sequence_twice_is_refused(engine: Engine) -> None:
    def run(b: Backend) -> None:
        pending = _open(engine, b, 41, "Hi")
        sampler = b.sampler(GREEDY)
        try:
            with pytest.raises(BackendError, match="twice"):
                b.decode([Step(41, pending, sampler), Step(41, pending, sampler)])
        finally:
            b.release(41)

    engine.call(run)
