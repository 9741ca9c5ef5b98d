"""The fused CPU sampler (kernels.sample_cpu) against the reference chain (kernels.sample_ref):
the same kept set on every path, the same draws where the kept set is small, the same
distribution (fixed-seed chi-square) where it is large."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.stats import chisquare

from edgeserve.kernels import sample_cpu, sample_ref

N_VOCAB = 60_000
# (top_k, top_p, min_p, temperature): the benchmark's combinations and a few more.
COMBOS = {
    "top_k-40": (40, 1.0, 0.0, 0.8),
    "top_p-0.95": (0, 0.95, 0.0, 0.8),
    "defaults": (40, 0.95, 0.0, 0.8),
    "min_p-0.05": (0, 1.0, 0.05, 0.8),
    "none": (0, 1.0, 0.0, 1.0),
    "top_p-0.99-min_p": (0, 0.99, 0.01, 1.3),
    "top_k-5000-top_p": (5000, 0.9, 0.0, 0.7),
    "top_k-1": (1, 1.0, 0.0, 1.0),
}


def _rows() -> list[np.ndarray[Any, Any]]:
    """Logits shaped like a language model's (a broad bulk, a few strong candidates), a flat row,
    a row with masked (-inf) tokens, and one with exact ties at the top."""
    rng = np.random.default_rng(7)
    rows = []
    for peak in (4.0, 8.0, 14.0):
        x = rng.normal(0, 3.5, N_VOCAB)
        x[rng.choice(N_VOCAB, 30, replace=False)] += rng.uniform(0, peak, 30) + peak
        rows.append(x)
    rows.append(rng.normal(0, 0.05, N_VOCAB))  # flat: the nucleus is most of the vocabulary
    masked = rng.normal(0, 3.0, N_VOCAB)
    masked[rng.random(N_VOCAB) < 0.9] = -np.inf  # a grammar constraint's mask
    rows.append(masked)
    ties = np.round(rng.normal(0, 2.0, N_VOCAB), 1)  # many logits share each value
    rows.append(ties)
    return [r.astype(np.float32) for r in rows]


ROWS = _rows()


@pytest.mark.parametrize("combo", list(COMBOS.values()), ids=list(COMBOS))
def test_fused_keeps_exactly_the_reference_set_with_its_probabilities(combo: tuple[int, float, float, float]) -> None:
    for row in ROWS:
        ids, probs = sample_cpu.distribution(row, *combo)
        want_ids, want = sample_ref.distribution(row, *combo)
        assert np.array_equal(ids, want_ids)
        if ids.size <= sample_cpu.SMALL:
            assert np.array_equal(probs, want)  # the reference's own float64 arithmetic
        else:
            big = want > 1e-30  # below, float32 weights underflow (absolute error < 1e-38)
            assert np.allclose(probs[big], want[big], rtol=3e-5, atol=0)


SMALL_SETS = [n for n in COMBOS if n not in ("none", "top_k-5000-top_p")]


@pytest.mark.parametrize("combo", [COMBOS[n] for n in SMALL_SETS], ids=SMALL_SETS)
def test_small_kept_sets_draw_the_very_same_tokens(combo: tuple[int, float, float, float]) -> None:
    """The same uniform picks the same token as the reference's inverse CDF (fixed seed)."""
    u = np.random.default_rng(1).random(60)
    for row in ROWS[:3]:
        ids, probs = sample_ref.distribution(row, *combo)
        assert ids.size <= sample_cpu.SMALL
        fused = [sample_cpu.sample(row, *combo, float(v)) for v in u]
        assert fused == [sample_ref.draw(ids, probs, float(v)) for v in u]


@pytest.mark.parametrize("row", [0, 3, 4], ids=["peaked", "flat", "masked"])
def test_large_kept_sets_draw_from_the_reference_distribution(row: int) -> None:
    """Fixed-seed chi-square: 4,000 fused draws over all 60,000 tokens against the reference's
    probabilities, the rare tokens pooled by decile of probability."""
    combo, logits, draws = COMBOS["none"], ROWS[row], 4000
    ids, probs = sample_ref.distribution(logits, *combo)
    rng = np.random.default_rng(5)
    picks = np.array([sample_cpu.sample(logits, *combo, rng.random()) for _ in range(draws)])
    assert np.isin(picks, ids).all() and np.isfinite(logits[picks]).all()
    counts = np.bincount(picks, minlength=logits.size)[ids]
    expected = probs * draws
    assert counts[expected == 0].sum() == 0  # masked tokens are never drawn
    # The rare tokens pooled, in order of probability, into bins of >= 10 expected draws.
    rare = np.flatnonzero((expected > 0) & (expected < 5))
    rare = rare[np.argsort(expected[rare])]
    pool = np.minimum(np.cumsum(expected[rare]) // 10, max(expected[rare].sum() // 10 - 1, 0)).astype(int)
    common = expected >= 5
    observed = np.concatenate([counts[common], np.bincount(pool, weights=counts[rare])])
    want = np.concatenate([expected[common], np.bincount(pool, weights=expected[rare])])
    p_value = chisquare(observed, want * observed.sum() / want.sum()).pvalue
    print(f"chi-square p = {p_value:.3f} over {observed.size} bins")
    assert p_value > 1e-3


def test_a_cut_within_rounding_of_top_p_is_left_to_the_reference() -> None:
    """Four equal leaders: the mass before each is exactly 0, 1/4, 1/2, 3/4 (in exact arithmetic)
    and top_p = 0.5 sits on a boundary; the float32 tail cannot decide it, the reference does."""
    x = np.full(N_VOCAB, -60.0, dtype=np.float32)
    x[[10, 20, 30, 40]] = 0.0
    assert sample_cpu.top_p_ids(x, 0.5) is None
    assert np.array_equal(
        sample_cpu.distribution(x, 0, 0.5, 0.0, 1.0)[0], sample_ref.distribution(x, 0, 0.5, 0.0, 1.0)[0]
    )


def test_top_k_takes_the_lower_ids_among_ties_at_the_cut() -> None:
    x = np.zeros(N_VOCAB, dtype=np.float32)
    x[[5, 9]] = 2.0
    assert sample_cpu.top_k_ids(x, 4).tolist() == [0, 1, 5, 9]
    x[::97] = 1.0  # more ties than the sample sees above its threshold
    assert np.array_equal(
        sample_cpu.top_k_ids(x, 300), sample_ref.top_k_stage(np.arange(x.size), x.astype(float), 300)[0]
    )


def test_non_finite_logits_go_to_the_reference() -> None:
    x = ROWS[0].copy()
    x[[3, 8]] = np.inf  # an extreme penalty divisor: the infinite logits share the mass
    assert sample_cpu.truncate(x, 40, 0.95, 0.0) is False
    assert sample_cpu.sample(x, 40, 0.95, 0.0, 0.8, 0.3) == 3 and sample_cpu.sample(x, 40, 0.95, 0.0, 0.8, 0.7) == 8
