"""Fused sampling in Triton (the CUDA path): top-k -> top-p -> min-p -> temperature -> a draw,
with no sort, each row split over many programs.

Every cut is a threshold found by a 128-way search (FlashInfer's idea of a pivot instead of a
sort, made deterministic):

- a float32 logit maps to an int32 key with the same order; top-k's cut is the largest key with
  at least ``k`` keys at or above it (5 rounds of 128 pivots over 2**32 keys), and the ties at it
  are taken by lower id with a second search over the index (3 rounds);
- top-p's cut is the smallest key above which the kept mass is below ``top_p`` of the top-k
  mass, ties again by id (as many as keep the mass before them below ``top_p``);
- min-p is one comparison; the draw is an inverse CDF over the kept weights in id order.

A row is cut into chunks of ``_CHUNK`` logits, one program each (grid ``rows x chunks``): a
round of a search is one ``_measure_kernel`` launch (each program counts its chunk at the 128
pivots) and one ``_narrow_kernel`` launch (one program per row adds the chunks' partials in a
fixed order, narrows the range and keeps it in a small state tensor). Nothing goes back to the
host, and the sums do not depend on timing (no float atomics), so a draw is reproducible.

Measured on an H200 (``bench/kernels_gpu.json``, 262,144 logits): all 504 checks exact; min-p or
no cut 0.19-0.20 ms at batch 1-8, 2.5-5.9x faster than torch's sort chain; top-k or top-p
0.69-5.2 ms, 3-10x faster than the first one-program-per-row version but still 0.23-0.74x the
sort chain's speed (greedy at batch 1: 1.1x). Each search round costs every logit a compare
against 128 pivots (compute-bound, ~80 us per round at batch 1, growing with the batch). So a
dispatcher should take this kernel only for rows without top-k/top-p, and the sort chain (or
``torch.argmax`` for greedy) otherwise; none in the runtime calls it yet. The next step is
counting with ``tl.histogram`` over each logit's pivot bucket (O(1) per logit, not O(128)).

The result is the reference chain's (``sample_ref``) up to float32: masses are summed in float32
here, float64 there, so a cut whose mass lies within float32 rounding of ``top_p`` may differ.
Bias and penalties are applied to the logits before (they touch at most a few dozen ids).

Needs ``torch`` and ``triton``; ``TRITON_INTERPRET=1`` runs it on CPU tensors (the tests do).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

_FANOUT = 128
_BLOCK = 128  # logits per step inside a program
_MBLOCK = 32  # logits per step of a search: a [FANOUT, 32] tile (128 wide spilled registers)
_CHUNK = 2048  # logits per program: 128 programs for a 262,144 vocabulary
_NB_STEP = 16  # chunk partials summed per step by the narrowing program
_INT_MIN = tl.constexpr(-2147483649)  # below every key: "no cut" (a plain global does not compile on a GPU)
# Search modes: 0 the top-k key, 1 the top-k ties by id, 2 the top-p key, 3 the top-p ties by id.
_KEY_K, _IDX_K, _KEY_P, _IDX_P = 0, 1, 2, 3


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
def _row_max(pmax_ptr: tl.tensor, row: tl.tensor, NB: tl.tensor, NBP: tl.constexpr) -> tl.tensor:
    j = tl.arange(0, NBP)
    return tl.max(tl.load(pmax_ptr + row * NB + j, mask=j < NB, other=float("-inf")), axis=0)


@triton.jit
def _active(top_k_ptr: tl.tensor, top_p_ptr: tl.tensor, row: tl.tensor, V: tl.tensor, MODE: tl.constexpr) -> tl.tensor:
    if MODE < 2:
        k = tl.load(top_k_ptr + row)
        on = (k > 0) & (k < V)
    else:
        on = tl.load(top_p_ptr + row) < 1.0
    return on


@triton.jit
def _start(m: tl.tensor, V: tl.tensor, MODE: tl.constexpr) -> tuple[tl.tensor, tl.tensor]:
    """A search's first range [lo, hi]: its predicate holds at lo and fails at hi + 1."""
    top = _key(m)
    if MODE == 0:
        lo, hi = top * 0 + _INT_MIN + 1, top
    elif MODE == 2:  # hi = top - 1: the mass above the top key is 0, so the cut is at most top
        lo, hi = top * 0 + _INT_MIN, top - 1
    else:
        lo, hi = top * 0, top * 0 + V
    return lo, hi


@triton.jit
def _max_kernel(logits_ptr: tl.tensor, pmax_ptr: tl.tensor, st_ptr: tl.tensor, V: tl.tensor, NB: tl.tensor,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr) -> None:  # fmt: skip
    """Each chunk's max; chunk 0 also resets the row's state to "no cut"."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    base = logits_ptr + row * V
    m = tl.full((), float("-inf"), tl.float32)
    for s in range(0, CHUNK, BLOCK):
        idx = b * CHUNK + s + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(tl.load(base + idx, mask=idx < V, other=float("-inf")), axis=0))
    tl.store(pmax_ptr + row * NB + b, m)
    if b == 0:
        j = tl.arange(0, 8)
        none = tl.full((8,), _INT_MIN, tl.int64)
        init = tl.where((j == 3) | (j == 5), none * 0 + V, none)  # kcut = pcut = V: no ties cut
        tl.store(st_ptr + row * 8 + j, init)


@triton.jit
def _measure(
    base: tl.tensor, V: tl.tensor, b: tl.tensor, lo: tl.tensor, hi: tl.tensor, m: tl.tensor, kth: tl.tensor,
    kcut: tl.tensor, tau: tl.tensor, MODE: tl.constexpr, FANOUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:  # fmt: skip
    """Chunk ``b``'s number per pivot and one more for a round of search MODE:
    0: #key >= piv; 1: #(key == kth, id < piv), extra #(key > kth); 2: top-k mass with key > piv,
    extra all the top-k mass; 3: #(top-k, key == tau, id < piv), extra top-k mass with key > tau."""
    piv = lo + ((hi - lo + 1) * tl.arange(0, FANOUT).to(tl.int64)) // FANOUT
    acc = tl.zeros([FANOUT], dtype=tl.float32)
    extra = tl.zeros((), dtype=tl.float32)
    for s in range(0, CHUNK, BLOCK):
        idx = b * CHUNK + s + tl.arange(0, BLOCK)
        valid = idx < V
        x = tl.load(base + idx, mask=valid, other=float("-inf"))
        key = _key(x)
        if MODE == 0:
            hit = valid[None, :] & (key[None, :] >= piv[:, None])
            acc += tl.sum(hit.to(tl.float32), axis=1)
        elif MODE == 1:
            hit = valid[None, :] & (key == kth)[None, :] & (idx[None, :] < piv[:, None])
            acc += tl.sum(hit.to(tl.float32), axis=1)
            extra += tl.sum((valid & (key > kth)).to(tl.float32), axis=0)
        elif MODE == 2:
            w = tl.where(valid & _in_top_k(key, idx, kth, kcut), tl.exp(x - m), 0.0)
            acc += tl.sum(tl.where(key[None, :] > piv[:, None], w[None, :], 0.0), axis=1)
            extra += tl.sum(w, axis=0)
        else:
            member = valid & _in_top_k(key, idx, kth, kcut)
            tie = member & (key == tau)
            acc += tl.sum((tie[None, :] & (idx[None, :] < piv[:, None])).to(tl.float32), axis=1)
            extra += tl.sum(tl.where(member & (key > tau), tl.exp(x - m), 0.0), axis=0)
    return acc, extra


@triton.jit
def _advance(
    st_in: tl.tensor, sf_ptr: tl.tensor, top_k_ptr: tl.tensor, top_p_ptr: tl.tensor, part_ptr: tl.tensor,
    aux_ptr: tl.tensor, row: tl.tensor, m: tl.tensor, V: tl.tensor, NB: tl.tensor, leader: tl.tensor,
    PREV: tl.constexpr, PREV_LAST: tl.constexpr, FANOUT: tl.constexpr, NB_STEP: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor]:  # fmt: skip
    """The row's state after narrowing the round of search PREV measured last (none when PREV < 0).
    The chunks' partials are added in a fixed order, so every program of the row gets the same state
    and pred(lo) true, pred(hi + 1) false still hold (pred is monotone); a search's last round sets
    its result: kth = lo, kcut = lo + 1, tau = lo + 1 or pcut = lo + 1."""
    s = st_in + row * 8
    lo, hi = tl.load(s + 0), tl.load(s + 1)
    kth, kcut, tau, pcut = tl.load(s + 2), tl.load(s + 3), tl.load(s + 4), tl.load(s + 5)
    if PREV >= 0:  # noqa: SIM102 (a compile-time branch around a run-time one: Triton cannot "and" them)
        if _active(top_k_ptr, top_p_ptr, row, V, PREV):
            piv = lo + ((hi - lo + 1) * tl.arange(0, FANOUT).to(tl.int64)) // FANOUT
            acc = tl.zeros([FANOUT], dtype=tl.float32)
            extra = tl.zeros((), dtype=tl.float32)
            for b0 in range(0, NB, NB_STEP):
                j = b0 + tl.arange(0, NB_STEP)
                tile = tl.load(part_ptr + (row * NB + j[:, None]) * FANOUT + tl.arange(0, FANOUT)[None, :],
                               mask=(j < NB)[:, None], other=0.0)  # fmt: skip
                acc += tl.sum(tile, axis=0)
                extra += tl.sum(tl.load(aux_ptr + row * NB + j, mask=j < NB, other=0.0), axis=0)
            if PREV == 0:
                ok = acc >= tl.load(top_k_ptr + row).to(tl.float32)
            elif PREV == 1:  # ties taken: as many as top-k still needs after the keys above kth
                ok = acc < tl.load(top_k_ptr + row).to(tl.float32) - extra
            elif PREV == 2:
                target = tl.load(top_p_ptr + row) * extra
                if leader:
                    tl.store(sf_ptr + row, target)
                ok = acc >= target
            else:  # ties whose mass before stays below target (at least one)
                ties = tl.ceil(tl.div_rn(tl.load(sf_ptr + row) - extra, tl.exp(_value(tau) - m)))
                ok = acc < tl.maximum(ties, 1.0)
            new_lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), axis=0))
            hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv - 1), axis=0))
            lo = new_lo
            if PREV_LAST:
                if PREV == 0:
                    kth = lo
                elif PREV == 1:
                    kcut = lo + 1
                elif PREV == 2:
                    tau = lo + 1
                else:
                    pcut = lo + 1
    return lo, hi, kth, kcut, tau, pcut


@triton.jit
def _store_state(st_out: tl.tensor, row: tl.tensor, lo: tl.tensor, hi: tl.tensor, kth: tl.tensor, kcut: tl.tensor,
                 tau: tl.tensor, pcut: tl.tensor) -> None:  # fmt: skip
    s = st_out + row * 8
    tl.store(s + 0, lo)
    tl.store(s + 1, hi)
    tl.store(s + 2, kth)
    tl.store(s + 3, kcut)
    tl.store(s + 4, tau)
    tl.store(s + 5, pcut)


@triton.jit
def _step_kernel(
    logits_ptr: tl.tensor, pmax_ptr: tl.tensor, st_in: tl.tensor, st_out: tl.tensor, sf_ptr: tl.tensor,
    top_k_ptr: tl.tensor, top_p_ptr: tl.tensor, part_in: tl.tensor, aux_in: tl.tensor, part_out: tl.tensor,
    aux_out: tl.tensor, V: tl.tensor, NB: tl.tensor, PREV: tl.constexpr, PREV_LAST: tl.constexpr,
    MODE: tl.constexpr, FIRST: tl.constexpr, FANOUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    NBP: tl.constexpr, NB_STEP: tl.constexpr,
) -> None:  # fmt: skip
    """One launch per search round: narrow the previous round (every program of the row alike, from
    the chunks' partials), then measure this chunk at this round's pivots. Chunk 0 keeps the state
    (``st_in`` -> ``st_out``, two buffers, since the other programs still read ``st_in``)."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    m = _row_max(pmax_ptr, row, NB, NBP)
    lo, hi, kth, kcut, tau, pcut = _advance(
        st_in, sf_ptr, top_k_ptr, top_p_ptr, part_in, aux_in, row, m, V, NB, b == 0, PREV, PREV_LAST, FANOUT, NB_STEP
    )
    if FIRST:
        lo, hi = _start(m, V, MODE)
    if _active(top_k_ptr, top_p_ptr, row, V, MODE):
        acc, extra = _measure(logits_ptr + row * V, V, b, lo, hi, m, kth, kcut, tau, MODE, FANOUT, CHUNK, BLOCK)
        tl.store(part_out + (row * NB + b) * FANOUT + tl.arange(0, FANOUT), acc)
        tl.store(aux_out + row * NB + b, extra)
    if b == 0:
        _store_state(st_out, row, lo, hi, kth, kcut, tau, pcut)


@triton.jit
def _kept(x: tl.tensor, idx: tl.tensor, valid: tl.tensor, kth: tl.tensor, kcut: tl.tensor, tau: tl.tensor,
          pcut: tl.tensor, floor: tl.tensor) -> tl.tensor:  # fmt: skip
    key = _key(x)
    return valid & _in_top_k(key, idx, kth, kcut) & ((key > tau) | ((key == tau) & (idx < pcut))) & (key >= floor)


@triton.jit
def _floor(m: tl.tensor, min_p_ptr: tl.tensor, row: tl.tensor) -> tl.tensor:
    min_p = tl.load(min_p_ptr + row)
    # The clamp is float32's smallest normal (2**-126): Triton types a smaller literal float64 on a GPU.
    return tl.where(min_p > 0, _key(m + tl.log(tl.maximum(min_p, 1.1754943508222875e-38))), _key(m) * 0 + _INT_MIN)


@triton.jit
def _mass_kernel(
    logits_ptr: tl.tensor, pmax_ptr: tl.tensor, st_in: tl.tensor, st_out: tl.tensor, sf_ptr: tl.tensor,
    top_k_ptr: tl.tensor, top_p_ptr: tl.tensor, part_in: tl.tensor, aux_in: tl.tensor, min_p_ptr: tl.tensor,
    temp_ptr: tl.tensor, z_ptr: tl.tensor, last_ptr: tl.tensor, kept_ptr: tl.tensor, V: tl.tensor, NB: tl.tensor,
    PREV: tl.constexpr, WRITE_KEPT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr,
    FANOUT: tl.constexpr, NB_STEP: tl.constexpr,
) -> None:  # fmt: skip
    """Narrow the last search round, then each chunk's kept mass after temperature and its last kept
    id; writes the kept set if asked."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    base = logits_ptr + row * V
    m = _row_max(pmax_ptr, row, NB, NBP)
    lo, hi, kth, kcut, tau, pcut = _advance(
        st_in, sf_ptr, top_k_ptr, top_p_ptr, part_in, aux_in, row, m, V, NB, b == 0, PREV, True, FANOUT, NB_STEP
    )
    if b == 0:
        _store_state(st_out, row, lo, hi, kth, kcut, tau, pcut)
    floor = _floor(m, min_p_ptr, row)
    inv_t = tl.div_rn(1.0, tl.load(temp_ptr + row))  # IEEE, as the interpreter
    z = tl.zeros((), tl.float32)
    last = tl.full((), -1, tl.int32)
    for s in range(0, CHUNK, BLOCK):
        idx = b * CHUNK + s + tl.arange(0, BLOCK)
        valid = idx < V
        x = tl.load(base + idx, mask=valid, other=float("-inf"))
        kept = _kept(x, idx, valid, kth, kcut, tau, pcut, floor)
        if WRITE_KEPT:
            tl.store(kept_ptr + row * V + idx, kept.to(tl.int8), mask=valid)
        z += tl.sum(tl.where(kept, tl.exp((x - m) * inv_t), 0.0), axis=0)
        last = tl.maximum(last, tl.max(tl.where(kept, idx, -1), axis=0))
    tl.store(z_ptr + row * NB + b, z)
    tl.store(last_ptr + row * NB + b, last)


@triton.jit
def _draw_kernel(
    logits_ptr: tl.tensor, pmax_ptr: tl.tensor, st_ptr: tl.tensor, u_ptr: tl.tensor, min_p_ptr: tl.tensor,
    temp_ptr: tl.tensor, z_ptr: tl.tensor, found_ptr: tl.tensor, V: tl.tensor, NB: tl.tensor,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr,
) -> None:  # fmt: skip
    """The first kept id of this chunk whose running kept mass (id order) passes u * total, or V."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    base = logits_ptr + row * V
    j = tl.arange(0, NBP)
    z = tl.load(z_ptr + row * NB + j, mask=j < NB, other=0.0)
    target = tl.load(u_ptr + row) * tl.sum(z, axis=0)
    running = tl.sum(tl.where(j < b, z, 0.0), axis=0)
    found = V
    if running <= target:  # a chunk whose mass before already passed u * total holds no answer
        m = _row_max(pmax_ptr, row, NB, NBP)
        floor = _floor(m, min_p_ptr, row)
        inv_t = tl.div_rn(1.0, tl.load(temp_ptr + row))
        s8 = st_ptr + row * 8
        kth, kcut, tau, pcut = tl.load(s8 + 2), tl.load(s8 + 3), tl.load(s8 + 4), tl.load(s8 + 5)
        for s in range(0, CHUNK, BLOCK):
            idx = b * CHUNK + s + tl.arange(0, BLOCK)
            valid = idx < V
            x = tl.load(base + idx, mask=valid, other=float("-inf"))
            kept = _kept(x, idx, valid, kth, kcut, tau, pcut, floor)
            w = tl.where(kept, tl.exp((x - m) * inv_t), 0.0)
            cdf = tl.cumsum(w, axis=0) + running
            found = tl.minimum(found, tl.min(tl.where(kept & (cdf > target), idx, V), axis=0))
            running += tl.sum(w, axis=0)
    tl.store(found_ptr + row * NB + b, found)


@triton.jit
def _pick_kernel(found_ptr: tl.tensor, last_ptr: tl.tensor, out_ptr: tl.tensor, V: tl.tensor, NB: tl.tensor,
                 NBP: tl.constexpr) -> None:  # fmt: skip
    """The first chunk's answer; the last kept id when float32 rounding left u * total unpassed."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NBP)
    found = tl.min(tl.load(found_ptr + row * NB + j, mask=j < NB, other=V), axis=0)
    last = tl.max(tl.load(last_ptr + row * NB + j, mask=j < NB, other=-1), axis=0)
    tl.store(out_ptr + row, tl.where(found < V, found, last).to(tl.int32))


def _rounds(width: int) -> int:
    """Rounds of FANOUT pivots that narrow ``width`` candidates to one."""
    rounds = 1
    while width > _FANOUT:
        width, rounds = -(-width // _FANOUT), rounds + 1
    return rounds


def _schedule(vocab: int, top_k_on: bool, top_p_on: bool) -> list[tuple[int, bool, bool]]:
    """(search mode, first round, last round) for every round, in order."""
    searches = ([(_KEY_K, 2**32), (_IDX_K, vocab + 1)] if top_k_on else []) + (
        [(_KEY_P, 2**32), (_IDX_P, vocab + 1)] if top_p_on else []
    )
    out = []
    for mode, width in searches:
        n = _rounds(width)
        out += [(mode, r == 0, r == n - 1) for r in range(n)]
    return out


def sample(
    logits: Any, u: Any, top_k: Any, top_p: Any, min_p: Any, temperature: Any, *, kept: Any = None, chunk: int = _CHUNK
) -> Any:
    """Token ids (int32 ``[rows]``) drawn from float32 ``logits [rows, V]`` with uniforms ``u [rows]``;
    ``top_k``/``top_p``/``min_p``/``temperature`` are per-row tensors (temperature > 0: greedy rows
    take an argmax instead). ``kept``, an int8 ``[rows, V]`` tensor, receives the kept set when given.
    ``chunk`` (a multiple of 128) is the logits per program; the tests shrink it to get many chunks."""
    import torch

    rows, vocab = logits.shape
    logits, dev = logits.contiguous(), logits.device
    nb = triton.cdiv(vocab, chunk)
    nbp = max(16, triton.next_power_of_2(nb))
    # One host read decides which searches run at all (a batch without top-p launches none of its).
    top_k_on, top_p_on = torch.stack([((top_k > 0) & (top_k < vocab)).any(), (top_p < 1.0).any()]).tolist()
    f32 = torch.float32
    pmax, sf = torch.empty((rows, nb), dtype=f32, device=dev), torch.empty(rows, dtype=f32, device=dev)
    st = torch.empty((2, rows, 8), dtype=torch.int64, device=dev)  # [lo, hi, kth, kcut, tau, pcut, -, -]
    part = torch.empty((2, rows, nb, _FANOUT), dtype=f32, device=dev)
    aux, z = torch.empty((2, rows, nb), dtype=f32, device=dev), torch.empty((rows, nb), dtype=f32, device=dev)
    last, found = (torch.empty((rows, nb), dtype=torch.int32, device=dev) for _ in range(2))
    _max_kernel[(rows, nb)](logits, pmax, st[0], vocab, nb, CHUNK=chunk, BLOCK=_BLOCK)
    cur, prev, prev_final = 0, -1, False
    sizes = {"CHUNK": chunk, "NBP": nbp, "FANOUT": _FANOUT, "NB_STEP": _NB_STEP}
    for mode, first, final in _schedule(vocab, top_k_on, top_p_on):
        _step_kernel[(rows, nb)](
            logits, pmax, st[cur], st[1 - cur], sf, top_k, top_p, part[cur], aux[cur], part[1 - cur], aux[1 - cur],
            vocab, nb, PREV=prev, PREV_LAST=prev_final, MODE=mode,
            FIRST=first, BLOCK=_MBLOCK, **sizes,
        )  # fmt: skip
        cur, prev, prev_final = 1 - cur, mode, final
    out = torch.empty(rows, dtype=torch.int32, device=dev)
    _mass_kernel[(rows, nb)](
        logits, pmax, st[cur], st[1 - cur], sf, top_k, top_p, part[cur], aux[cur], min_p, temperature, z, last,
        kept if kept is not None else out, vocab, nb, PREV=prev, WRITE_KEPT=kept is not None, BLOCK=_BLOCK, **sizes,
    )  # fmt: skip
    _draw_kernel[(rows, nb)](
        logits, pmax, st[1 - cur], u, min_p, temperature, z, found, vocab, nb, CHUNK=chunk, BLOCK=_BLOCK, NBP=nbp
    )
    _pick_kernel[(rows,)](found, last, out, vocab, nb, NBP=nbp)
    return out
