"""Fused CPU sampler: the reference chain (``sample_ref``) without sorting the vocabulary.

Each cut is found on a small candidate set chosen by a cheap threshold pass over the float32
logits, never by an argsort or argpartition of all of them:

- **top-k**: a strided sample of the logits gives a threshold with at least ``k`` logits above it
  (the sample's own elements guarantee that once its rank reaches ``k``); the reference's top-k
  then runs on those few hundred candidates. The kth largest of a superset that holds every logit
  above it is the kth largest of all, so the kept set is the reference's, exactly.
- **top-p**: the nucleus lies in a *head* of the logits within ``HEAD_SPANS`` nats of the maximum
  (ten nats hold 97.6-99.99% of the mass on Gemma 3's real next-token logits, sixteen > 99.9%). The head is sorted
  and its probabilities computed in float64 as the reference does; the *tail*'s mass only enters
  the normalizer, summed once from float32 exponentials. That sum is off by at most ``TAIL_REL_ERR``
  of itself (float32 ``x - max`` and ``exp`` rounding for ``|x - max| <= 104``; below that a
  weight is < 1e-45). A cut whose cumulative mass lies within that error (plus ``ABS_ERR`` for
  float64 rounding on either side) of ``top_p`` is not decided here: the reference decides it.
  So the kept set is always the reference's.
- **min-p**: one comparison against the float32 threshold equivalent to the reference's float64 one.

The draw: a kept set of at most ``SMALL`` tokens gets the reference's own float64 probabilities
and inverse-CDF pick, so the same ``u`` picks the same token. A larger one (no truncation, a
large ``k``, a flat nucleus) is drawn from float32 weights, block by block: the kept set is the
same, each probability is within 3e-5 of the reference's (relative: float32 ``(x - max) / T`` and
``exp`` rounding for ``|x - max| / T <= 104``, and the block sums), and the same ``u`` picks the
same token except within that distance of a boundary.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from edgeserve.kernels import sample_ref as ref

Array = np.ndarray[Any, Any]

#: Kept sets up to this size go through the reference's float64 tail (bitwise the same draw).
SMALL = 4096
#: Nats below the maximum that bound the top-p head, tried in turn; past the last, the reference.
#: On Gemma 3's real logits 10 nats hold >= 0.99 of the mass in 78% of rows, 12 in all of them,
#: 16 hold >= 0.999 in all (heads of median 290, 809, 5,867 tokens).
HEAD_SPANS = (10.0, 12.0, 14.0, 16.0, 20.0)
#: The largest head sorted here (a larger one means a flat distribution: the reference sorts it).
HEAD_MAX = 1 << 16
#: Relative error bound of the tail mass summed from float32 exponentials (see the docstring).
TAIL_REL_ERR = 2e-5
#: Float64 rounding allowance on a cumulative probability, ours and the reference's together.
ABS_ERR = 1e-10
#: Below this temperature a large kept set is drawn by the reference (float32 d / T loses digits).
MIN_FAST_TEMPERATURE = 0.05
_SAMPLE_POINTS = 4096
_BLOCK = 512


def sample(logits: Array, top_k: int, top_p: float, min_p: float, temperature: float, u: float) -> int:
    """Draw one token id from float32 ``logits`` ([n_vocab], bias and penalties already applied)
    with the uniform ``u`` in [0, 1): the reference chain's distribution (module docstring)."""
    kept = truncate(logits, top_k, top_p, min_p)
    if isinstance(kept, np.ndarray) and kept.size <= SMALL:
        return ref.draw(kept, ref.tempered_probs(logits[kept].astype(np.float64), temperature), u)
    if kept is not False and temperature >= MIN_FAST_TEMPERATURE:
        values = logits if kept is None else logits[kept]
        pick = _pick(_weights(values, temperature), u)
        return pick if kept is None else int(kept[pick])
    return ref.draw(*ref.distribution(logits, top_k, top_p, min_p, temperature), u)


def distribution(logits: Array, top_k: int, top_p: float, min_p: float, temperature: float) -> tuple[Array, Array]:
    """(ids ascending, probabilities) that ``sample`` draws from: for the tests and the benchmark."""
    kept = truncate(logits, top_k, top_p, min_p)
    if isinstance(kept, np.ndarray) and kept.size <= SMALL:
        return kept, ref.tempered_probs(logits[kept].astype(np.float64), temperature)
    if kept is not False and temperature >= MIN_FAST_TEMPERATURE:
        ids = np.arange(logits.size) if kept is None else kept
        w = _weights(logits[ids], temperature).astype(np.float64)
        return ids, w / w.sum()
    return ref.distribution(logits, top_k, top_p, min_p, temperature)


def truncate(logits: Array, top_k: int, top_p: float, min_p: float) -> Array | Literal[False] | None:
    """The kept ids (ascending), ``None`` for all of them, or ``False`` where the reference must
    decide (non-finite logits, a flat nucleus, a cut within rounding of ``top_p``)."""
    x = np.asarray(logits, dtype=np.float32)
    top = x.max()
    if not np.isfinite(top):
        return False
    ids: Array | None = None
    if 0 < top_k < x.size:
        ids = top_k_ids(x, top_k)
    if top_p < 1:
        if ids is not None and ids.size <= SMALL:
            ids = ref.top_p_stage(ids, x[ids].astype(np.float64), top_p)[0]
        else:
            local = top_p_ids(x, top_p, top) if ids is None else top_p_ids(x[ids], top_p)
            if local is None:
                return False
            ids = local if ids is None else ids[local]
    if min_p > 0:
        if ids is not None and ids.size <= SMALL:
            ids = ref.min_p_stage(ids, x[ids].astype(np.float64), min_p)[0]
        else:
            floor = _float32_at_least(float(top) + math.log(min_p))
            ids = np.flatnonzero(x >= floor) if ids is None else ids[x[ids] >= floor]
    if ids is None and x.size <= SMALL:
        ids = np.arange(x.size)
    return ids


def top_k_ids(x: Array, k: int) -> Array:
    """Ids (ascending) of the ``k`` largest float32 logits, ties to the lower id: the reference's set."""
    stride = max(1, x.size // _SAMPLE_POINTS)
    sample = x[::stride]
    rank = min(sample.size, -(-k // stride) + 4)  # about 4 strides' worth of spare candidates
    while True:
        floor = np.partition(sample, sample.size - rank)[sample.size - rank]
        cand = np.flatnonzero(x >= floor)
        if cand.size >= k:
            break
        if rank == sample.size:  # k exceeds the sample: every logit is a candidate
            cand = np.arange(x.size)
            break
        rank = min(sample.size, rank * 8)
    return ref.top_k_stage(cand, x[cand].astype(np.float64), k)[0]


def top_p_ids(x: Array, top_p: float, top: np.float32 | None = None) -> Array | None:
    """Local ids (ascending) of the reference's nucleus of float32 ``x`` (whose maximum is ``top``
    when given), or None where it cannot be decided exactly here (see the module docstring)."""
    top = x.max() if top is None else top
    weights = np.subtract(x, top)
    np.exp(weights, out=weights)  # float32: only the tail's sum is taken from these
    for span in HEAD_SPANS:
        head = np.flatnonzero(x >= top - np.float32(span))
        if head.size > HEAD_MAX:
            return None
        head_logits = x[head].astype(np.float64)
        order = np.argsort(-head_logits, kind="stable")
        with np.errstate(under="ignore"):
            head_mass = np.exp(head_logits[order] - float(top))
        weights[head] = 0
        tail = float(weights.sum())
        z = float(head_mass.sum()) + tail
        probs = head_mass / z
        before = np.cumsum(probs) - probs
        keep = max(int(np.count_nonzero(before < top_p)), 1)
        if keep == head.size:  # the nucleus may reach past this head
            continue
        margin = TAIL_REL_ERR * tail / z + ABS_ERR
        if abs(before[keep - 1] - top_p) < margin or abs(before[keep] - top_p) < margin:
            return None
        return np.sort(head[order[:keep]])
    return None


def _float32_at_least(threshold: float) -> np.float32:
    """The smallest float32 ``f`` with ``f >= threshold``: ``x32 >= f`` iff ``float64(x32) >= threshold``."""
    f = np.float32(threshold)
    if float(f) < threshold:
        f = np.nextafter(f, np.float32(np.inf))
    return f


def _weights(values: Array, temperature: float) -> Array:
    """Unnormalized float32 ``exp((x - max) / T)``."""
    w: Array = np.subtract(values, values.max(), dtype=np.float32)
    if temperature != 1:
        w *= np.float32(1 / temperature)
    with np.errstate(under="ignore"):
        np.exp(w, out=w)
    return w


def _pick(w: Array, u: float) -> int:
    """Inverse-CDF pick over weights ``w`` (index order): a block by the blocks' sums, then a token
    inside it by its float64 cumulative sum scaled to that block's sum, so that each token's share
    is off by no more than its block's float32 (pairwise) sum, ~1e-6 relative."""
    n = w.size
    full = n - n % _BLOCK
    sums = w[:full].reshape(-1, _BLOCK).sum(axis=1).astype(np.float64)
    if full < n:
        sums = np.append(sums, w[full:].sum(dtype=np.float64))
    cum = np.cumsum(sums)
    target = u * float(cum[-1])
    b = int(np.searchsorted(cum, target, side="right"))
    if b >= cum.size:  # u * total rounded up to the total: the last block with any mass
        b = int(np.flatnonzero(sums > 0)[-1])
    seg = w[b * _BLOCK : (b + 1) * _BLOCK]
    local = np.cumsum(seg, dtype=np.float64)
    local *= sums[b] / local[-1]
    local += float(cum[b - 1]) if b else 0.0
    j = int(np.searchsorted(local, target, side="right"))
    if j >= seg.size:
        j = int(np.flatnonzero(seg > 0)[-1])
    return b * _BLOCK + j
