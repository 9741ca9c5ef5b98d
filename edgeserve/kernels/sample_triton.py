"""Fused sampling in Triton (the CUDA path): top-k -> top-p -> min-p -> temperature -> a draw,
one program per row of logits, with no sort.

Every cut is a threshold found by a 16-way search over a few passes of the row (FlashInfer's
idea of a pivot instead of a sort, made deterministic):

- a float32 logit maps to an int32 key with the same order; top-k's cut is the largest key with
  at least ``k`` keys at or above it (8-9 passes of 16 pivots each over 2**32 keys), and the ties
  at it are taken by lower id with a second search over the index;
- top-p's cut is the smallest key above which the kept mass is below ``top_p`` of the top-k
  mass, ties again by id (as many as keep the mass before them below ``top_p``);
- min-p is one comparison; the draw is an inverse CDF over the kept weights in id order.

The result is the reference chain's (``sample_ref``) up to float32: masses are summed in float32
here, float64 there, so a cut whose mass lies within float32 rounding of ``top_p`` may differ.
Bias and penalties are applied to the logits before (they touch at most a few dozen ids).

Needs ``torch`` and ``triton``; ``TRITON_INTERPRET=1`` runs it on CPU tensors (the tests do).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

_FANOUT = 16
_BLOCK = 1024
_ROUNDS_KEY = 10  # 16-way rounds to narrow 2**32 + 1 keys to one (9 suffice)
_INT_MIN = tl.constexpr(-2147483649)  # below every key: "no cut" (a plain global does not compile on a GPU)


# Kernel parameters are annotated ``tl.tensor``: Triton's compiler (not its interpreter) looks every
# annotation up as a global and refuses ``typing.Any``, so ``Any`` here failed every GPU compile.
@triton.jit
def _key(x: tl.tensor) -> tl.tensor:
    """int32 with the order of the float32 ``x`` (``+ 0.0`` folds -0.0 into +0.0)."""
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)


@triton.jit
def _value(key: tl.tensor) -> tl.tensor:
    k = key.to(tl.int32)
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _in_top_k(key: tl.tensor, idx: tl.tensor, kth: tl.tensor, kcut: tl.tensor) -> tl.tensor:
    return (key > kth) | ((key == kth) & (idx < kcut))


@triton.jit
def _measure(
    base: tl.tensor,
    V: tl.tensor,
    piv: tl.tensor,
    m: tl.tensor,
    kth: tl.tensor,
    kcut: tl.tensor,
    tau: tl.tensor,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
) -> tl.tensor:
    """One pass over the row, one number per pivot ``piv`` ([FANOUT]):
    0: #key >= piv; 1: #(key == kth, id < piv); 2: top-k mass with key > piv;
    3: #(top-k, key == tau, id < piv)."""
    acc = tl.zeros(piv.shape, dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < V
        x = tl.load(base + idx, mask=valid, other=float("-inf"))
        key = _key(x)
        if MODE == 0:
            hit = valid[None, :] & (key[None, :] >= piv[:, None])
            acc += tl.sum(hit.to(tl.float32), axis=1)
        elif MODE == 1:
            hit = valid[None, :] & (key == kth)[None, :] & (idx[None, :] < piv[:, None])
            acc += tl.sum(hit.to(tl.float32), axis=1)
        elif MODE == 2:
            w = tl.where(valid & _in_top_k(key, idx, kth, kcut), tl.exp(x - m), 0.0)
            acc += tl.sum(tl.where(key[None, :] > piv[:, None], w[None, :], 0.0), axis=1)
        else:
            tie = valid & _in_top_k(key, idx, kth, kcut) & (key == tau)
            acc += tl.sum((tie[None, :] & (idx[None, :] < piv[:, None])).to(tl.float32), axis=1)
    return acc


@triton.jit
def _narrow(lo: tl.tensor, hi: tl.tensor, ok: tl.tensor, piv: tl.tensor) -> tuple[tl.tensor, tl.tensor]:
    """Keep the invariant pred(lo) true, pred(hi + 1) false, given pred at the pivots (monotone)."""
    new_lo = tl.max(tl.where(ok, piv, lo), axis=0)
    new_hi = tl.min(tl.where(ok, hi, piv - 1), axis=0)
    return tl.maximum(lo, new_lo), tl.minimum(hi, new_hi)


@triton.jit
def _pivots(lo: tl.tensor, hi: tl.tensor, FANOUT: tl.constexpr) -> tl.tensor:
    i = tl.arange(0, FANOUT).to(tl.int64)
    return lo + ((hi - lo + 1) * i) // FANOUT


@triton.jit
def _sample_kernel(
    logits_ptr: tl.tensor, u_ptr: tl.tensor, top_k_ptr: tl.tensor, top_p_ptr: tl.tensor, min_p_ptr: tl.tensor,
    temp_ptr: tl.tensor, out_ptr: tl.tensor, kept_ptr: tl.tensor, V: tl.tensor, WRITE_KEPT: tl.constexpr,
    FANOUT: tl.constexpr, ROUNDS: tl.constexpr, ROUNDS_IDX: tl.constexpr, BLOCK: tl.constexpr,
) -> None:  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    m = tl.full((), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(tl.load(base + idx, mask=idx < V, other=float("-inf")), axis=0))
    top = _key(m)
    none = top * 0 + _INT_MIN
    k = tl.load(top_k_ptr + row).to(tl.int64)
    kth, kcut = none, top * 0 + V
    if (k > 0) & (k < V):
        lo, hi = none + 1, top  # the kth key: largest t with #key >= t >= k
        for _ in range(ROUNDS):
            piv = _pivots(lo, hi, FANOUT)
            lo, hi = _narrow(lo, hi, _measure(base, V, piv, m, kth, kcut, kth, 0, BLOCK) >= k.to(tl.float32), piv)
        kth = lo
        need = k.to(tl.float32) - _measure(base, V, kth + 1 + tl.zeros([FANOUT], tl.int64), m, kth, kcut, kth, 0, BLOCK)
        lo, hi = top * 0, top * 0 + V  # ties: smallest cut with #(tie, id < cut) >= need
        for _ in range(ROUNDS_IDX):
            piv = _pivots(lo, hi, FANOUT)
            lo, hi = _narrow(lo, hi, _measure(base, V, piv, m, kth, kcut, kth, 1, BLOCK) < need, piv)
        kcut = lo + 1
    p = tl.load(top_p_ptr + row)
    tau, pcut = none, top * 0 + V
    if p < 1.0:
        total = tl.max(_measure(base, V, none + tl.zeros([FANOUT], tl.int64), m, kth, kcut, kth, 2, BLOCK), axis=0)
        target = p * total
        lo, hi = none, top  # largest t with top-k mass above t >= target; the cut is the next key
        for _ in range(ROUNDS):
            piv = _pivots(lo, hi, FANOUT)
            lo, hi = _narrow(lo, hi, _measure(base, V, piv, m, kth, kcut, kth, 2, BLOCK) >= target, piv)
        tau = lo + 1
        above = tl.max(_measure(base, V, tau + tl.zeros([FANOUT], tl.int64), m, kth, kcut, kth, 2, BLOCK), axis=0)
        ties = tl.ceil(tl.div_rn(target - above, tl.exp(_value(tau) - m)))  # ties whose mass before stays < target
        need = tl.maximum(ties, 1.0)
        lo, hi = top * 0, top * 0 + V
        for _ in range(ROUNDS_IDX):
            piv = _pivots(lo, hi, FANOUT)
            lo, hi = _narrow(lo, hi, _measure(base, V, piv, m, kth, kcut, tau, 3, BLOCK) < need, piv)
        pcut = lo + 1
    min_p = tl.load(min_p_ptr + row)
    # The clamp is float32's smallest normal (2**-126): Triton types a smaller literal float64 on a GPU.
    floor = tl.where(min_p > 0, _key(m + tl.log(tl.maximum(min_p, 1.1754943508222875e-38))), none)
    inv_t = tl.div_rn(1.0, tl.load(temp_ptr + row))  # IEEE, as the interpreter
    target = tl.load(u_ptr + row) * _kept_mass(base, V, m, inv_t, kth, kcut, tau, pcut, floor, BLOCK)
    running = tl.zeros((), tl.float32)
    found = top * 0 + V
    last = top * 0 - 1
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < V
        x = tl.load(base + idx, mask=valid, other=float("-inf"))
        key = _key(x)
        kept = valid & _in_top_k(key, idx, kth, kcut) & ((key > tau) | ((key == tau) & (idx < pcut))) & (key >= floor)
        if WRITE_KEPT:
            tl.store(kept_ptr + row * V + idx, kept.to(tl.int8), mask=valid)
        w = tl.where(kept, tl.exp((x - m) * inv_t), 0.0)
        cdf = tl.cumsum(w, axis=0) + running
        found = tl.minimum(found, tl.min(tl.where(kept & (cdf > target), idx, V), axis=0).to(tl.int64))
        last = tl.maximum(last, tl.max(tl.where(kept, idx, -1), axis=0).to(tl.int64))
        running += tl.sum(w, axis=0)
    tl.store(out_ptr + row, tl.where(found < V, found, last).to(tl.int32))


@triton.jit
def _kept_mass(
    base: tl.tensor,
    V: tl.tensor,
    m: tl.tensor,
    inv_t: tl.tensor,
    kth: tl.tensor,
    kcut: tl.tensor,
    tau: tl.tensor,
    pcut: tl.tensor,
    floor: tl.tensor,
    BLOCK: tl.constexpr,
) -> tl.tensor:
    z = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < V
        x = tl.load(base + idx, mask=valid, other=float("-inf"))
        key = _key(x)
        kept = valid & _in_top_k(key, idx, kth, kcut) & ((key > tau) | ((key == tau) & (idx < pcut))) & (key >= floor)
        z += tl.sum(tl.where(kept, tl.exp((x - m) * inv_t), 0.0), axis=0)
    return z


def sample(logits: Any, u: Any, top_k: Any, top_p: Any, min_p: Any, temperature: Any, *, kept: Any = None) -> Any:
    """Token ids (int32 ``[rows]``) drawn from float32 ``logits [rows, V]`` with uniforms ``u [rows]``;
    ``top_k``/``top_p``/``min_p``/``temperature`` are per-row tensors (temperature > 0: greedy rows
    take an argmax instead). ``kept``, an int8 ``[rows, V]`` tensor, receives the kept set when given."""
    import torch

    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int32, device=logits.device)
    idx_rounds = max(1, -(-(vocab + 1).bit_length() // 4) + 1)
    _sample_kernel[(rows,)](
        logits.contiguous(), u, top_k, top_p, min_p, temperature, out, kept if kept is not None else out, vocab,
        WRITE_KEPT=kept is not None, FANOUT=_FANOUT, ROUNDS=_ROUNDS_KEY, ROUNDS_IDX=idx_rounds, BLOCK=_BLOCK,
    )  # fmt: skip
    return out
