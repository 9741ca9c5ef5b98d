"""Ordering metrics for a length predictor. Only ordering matters to shortest-job-first.

Ties in the score count as half right (so a constant predictor scores 0.5, not 0). The anchor
counts a tie as wrong; with a continuous score ties are rare either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

SHORT_MAX = 200  # short: fewer than 200 output tokens (the same boundaries as model.py's classes)
LONG_MIN = 800  # long: 800 or more
CLASSES: tuple[str, str, str] = ("short", "medium", "long")

FloatArray = npt.NDArray[np.float64]


def length_class(tokens: float) -> int:
    """0 short, 1 medium, 2 long."""
    return 0 if tokens < SHORT_MAX else (1 if tokens < LONG_MIN else 2)


def classes_of(tokens: npt.ArrayLike) -> npt.NDArray[np.int64]:
    t = np.asarray(tokens, dtype=np.float64)
    return np.where(t < SHORT_MAX, 0, np.where(t < LONG_MIN, 1, 2)).astype(np.int64)


def pair_accuracy(score_low: FloatArray, score_high: FloatArray) -> float:
    """Share of (low, high) pairs where the low one scores below the high one (ties: half).

    Computed by ranks (Mann-Whitney U), so it is exact and O(n log n) for any pair count.
    """
    n_low, n_high = len(score_low), len(score_high)
    if not n_low or not n_high:
        return float("nan")
    ranks = _midranks(np.concatenate([score_low, score_high]))
    u_high = ranks[n_low:].sum() - n_high * (n_high + 1) / 2.0
    return float(u_high / (n_low * n_high))


def short_long_accuracy(scores: npt.ArrayLike, tokens: npt.ArrayLike) -> float:
    """The anchor's "ranking accuracy": short (<200) vs long (>=800) pairs ordered correctly."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64)
    return pair_accuracy(s[t < SHORT_MAX], s[t >= LONG_MIN])


def ratio_pair_accuracy(scores: npt.ArrayLike, tokens: npt.ArrayLike, ratio: float = 2.0) -> float:
    """Accuracy over every pair whose true lengths differ by at least ``ratio``×.

    Sorted by true length, each item is compared with all items at least ``ratio`` times longer;
    a Fenwick tree over score ranks counts the correctly ordered ones in O(n log n).
    """
    s = np.asarray(scores, dtype=np.float64)
    # An empty answer counts as one token, so two empty answers are not "2x apart".
    t = np.maximum(np.asarray(tokens, dtype=np.float64), 1.0)
    order = np.argsort(t, kind="stable")
    t_sorted, s_sorted = t[order], s[order]
    score_rank = _dense_rank(s_sorted)
    tree = _Fenwick(int(score_rank.max()) + 1 if len(s) else 1)
    good = 0.0
    total = 0
    j = 0
    # Walk the longer side i upward; insert every item at most t_i / ratio long before counting.
    for i in range(len(t_sorted)):
        while j < i and t_sorted[j] * ratio <= t_sorted[i]:
            tree.add(int(score_rank[j]))
            j += 1
        if j == 0:
            continue
        below = tree.prefix(int(score_rank[i]) - 1)
        equal = tree.prefix(int(score_rank[i])) - below
        good += below + 0.5 * equal
        total += j
    return good / total if total else float("nan")


def kendall_tau(scores: npt.ArrayLike, tokens: npt.ArrayLike) -> float:
    """Kendall's tau-b between score and true length (exact; O(n^2) in row blocks, fine to ~50k)."""
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(tokens, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float("nan")
    s = ties_x = ties_y = 0.0
    for start in range(0, n, 512):
        dx = np.sign(x[start : start + 512, None] - x[None, :])
        dy = np.sign(y[start : start + 512, None] - y[None, :])
        s += float((dx * dy).sum())
        ties_x += float((dx == 0).sum())
        ties_y += float((dy == 0).sum())
    # Each unordered pair was seen twice and each item once against itself.
    pairs = n * (n - 1) / 2.0
    s /= 2.0
    ties_x = (ties_x - n) / 2.0
    ties_y = (ties_y - n) / 2.0
    denominator = np.sqrt((pairs - ties_x) * (pairs - ties_y))
    return float(s / denominator) if denominator else float("nan")


def class_accuracy(predicted: Sequence[int] | npt.ArrayLike, tokens: npt.ArrayLike) -> float:
    p = np.asarray(predicted, dtype=np.int64)
    return float((p == classes_of(tokens)).mean()) if len(p) else float("nan")


def summary(scores: npt.ArrayLike, tokens: npt.ArrayLike, predicted_classes: npt.ArrayLike) -> dict[str, float | int]:
    """Every figure the evaluation reports, for one model on one data set."""
    t = np.asarray(tokens, dtype=np.float64)
    return {
        "n": len(t),
        # short_long_accuracy is undefined (nan) when either count is 0: say why, not "nan".
        "short_answers": int((t < SHORT_MAX).sum()),
        "long_answers": int((t >= LONG_MIN).sum()),
        "short_long_accuracy": short_long_accuracy(scores, t),
        "pairs_2x_accuracy": ratio_pair_accuracy(scores, t, 2.0),
        "kendall_tau": kendall_tau(scores, t),
        "class_accuracy": class_accuracy(predicted_classes, t),
    }


def _midranks(x: FloatArray) -> FloatArray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Tied values share the mean of the ranks they span.
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(xs)]])
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return ranks


def _dense_rank(x: FloatArray) -> npt.NDArray[np.int64]:
    _, inverse = np.unique(x, return_inverse=True)
    return inverse.astype(np.int64) + 1


class _Fenwick:
    def __init__(self, size: int) -> None:
        self.tree = [0] * (size + 1)

    def add(self, i: int) -> None:
        while i < len(self.tree):
            self.tree[i] += 1
            i += i & -i

    def prefix(self, i: int) -> int:
        total = 0
        while i > 0:
            total += self.tree[i]
            i -= i & -i
        return total
