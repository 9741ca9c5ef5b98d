"""The reference truncation chain of the sampler, in NumPy float64, stage by stage.

llama.cpp's order after bias and penalties: top-k -> top-p -> min-p -> temperature -> a draw.
Every stage takes and returns ``(ids, cand)``: token ids in ascending order and their logits as
float64. Ties are broken by token id (the lower id is the likelier), so the kept set is a
function of the logits alone; llama.cpp leaves that order to ``std::partial_sort``, which makes
no promise, and a tie at a cut is rare in real logits.

This is the slow, obvious statement of the chain (a full sort for top-p): the fused kernels
(``sample_cpu``, ``sample_triton``, ``sample_metal``) are tested against it, and ``sample_cpu``
falls back to it whenever its own float32 arithmetic cannot decide a cut exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


def distribution(logits: Array, top_k: int, top_p: float, min_p: float, temperature: float) -> tuple[Array, Array]:
    """(kept token ids in ascending order, their probabilities after temperature, float64)."""
    ids, cand = np.arange(logits.size), logits.astype(np.float64)
    ids, cand = top_k_stage(ids, cand, top_k)
    ids, cand = top_p_stage(ids, cand, top_p)
    ids, cand = min_p_stage(ids, cand, min_p)
    return ids, tempered_probs(cand, temperature)


def top_k_stage(ids: Array, cand: Array, k: int) -> tuple[Array, Array]:
    """The ``k`` largest (ties at the cut: lower ids first); all when ``k`` is 0 or covers them."""
    if not 0 < k < cand.size:
        return ids, cand
    kth = np.partition(cand, cand.size - k)[cand.size - k]
    keep = cand > kth
    ties = np.flatnonzero(cand == kth)[: k - int(np.count_nonzero(keep))]
    keep[ties] = True
    return ids[keep], cand[keep]


def top_p_stage(ids: Array, cand: Array, top_p: float) -> tuple[Array, Array]:
    """The smallest prefix of the candidates, likeliest first, whose mass reaches ``top_p`` (at least one)."""
    if top_p >= 1:
        return ids, cand
    order = np.argsort(-cand, kind="stable")  # ids ascending, so ties go to the lower id
    probs = softmax(cand[order])
    keep = max(int(np.count_nonzero(np.cumsum(probs) - probs < top_p)), 1)
    chosen = np.sort(order[:keep])
    return ids[chosen], cand[chosen]


def min_p_stage(ids: Array, cand: Array, min_p: float) -> tuple[Array, Array]:
    """Drop the tokens less likely than ``min_p`` times the likeliest one."""
    if min_p <= 0:
        return ids, cand
    kept = cand >= cand.max() + math.log(min_p)
    return ids[kept], cand[kept]


def tempered_probs(cand: Array, temperature: float) -> Array:
    with np.errstate(over="ignore", divide="ignore"):  # inf is handled by softmax
        scaled = cand / temperature
    return softmax(scaled)


def draw(ids: Array, probs: Array, u: float) -> int:
    """Inverse-CDF pick with ``u`` in [0, 1) over the candidates in ascending id order."""
    cdf = np.cumsum(probs)
    pick = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), ids.size - 1)
    return int(ids[pick])


def softmax(x: Array) -> Array:
    top = x.max()
    if not np.isfinite(top):
        # A tiny temperature or penalty divisor overflowed the logits: the infinite ones share all
        # the mass (the limit of the softmax), instead of inf - inf = NaN odds.
        hits: Array = (x == top).astype(np.float64)
        return hits / hits.sum()  # type: ignore[no-any-return]
    with np.errstate(under="ignore"):
        e = np.exp(x - top)
    out: Array = e / e.sum()
    return out
