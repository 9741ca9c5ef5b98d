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
host, and the sums do not depend on timing (no float atomics), so a draw is reproducible. The
first version ran one program per row (1 of 132 SMs at batch 1) and took 8-16 ms per row.

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
_NONE = -2147483649
# The state row: [lo, hi, kth, kcut, tau, pcut, -, -] (int64) and [target, -, -, -] (float32).
_LO, _HI, _KTH, _KCUT, _TAU, _PCUT = 0, 1, 2, 3, 4, 5
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
def _measure_kernel(
    logits_ptr: tl.tensor, pmax_ptr: tl.tensor, st_ptr: tl.tensor, top_k_ptr: tl.tensor, top_p_ptr: tl.tensor,
    part_ptr: tl.tensor, aux_ptr: tl.tensor, V: tl.tensor, NB: tl.tensor, MODE: tl.constexpr, FIRST: tl.constexpr,
    FANOUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr,
) -> None:  # fmt: skip
    """One chunk's number per pivot (``part``) and one more (``aux``) for a round of search MODE:
    0: #key >= piv; 1: #(key == kth, id < piv), aux #(key > kth); 2: top-k mass with key > piv,
    aux all the top-k mass; 3: #(top-k, key == tau, id < piv), aux top-k mass with key > tau."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    if _active(top_k_ptr, top_p_ptr, row, V, MODE):
        base = logits_ptr + row * V
        m = _row_max(pmax_ptr, row, NB, NBP)
        if FIRST:
            lo, hi = _start(m, V, MODE)
        else:
            lo, hi = tl.load(st_ptr + row * 8 + 0), tl.load(st_ptr + row * 8 + 1)
        piv = lo + ((hi - lo + 1) * tl.arange(0, FANOUT).to(tl.int64)) // FANOUT
        kth, kcut = tl.load(st_ptr + row * 8 + 2), tl.load(st_ptr + row * 8 + 3)
        tau = tl.load(st_ptr + row * 8 + 4)
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
        tl.store(part_ptr + (row * NB + b) * FANOUT + tl.arange(0, FANOUT), acc)
        tl.store(aux_ptr + row * NB + b, extra)


@triton.jit
def _narrow_kernel(
    pmax_ptr: tl.tensor, st_ptr: tl.tensor, sf_ptr: tl.tensor, top_k_ptr: tl.tensor, top_p_ptr: tl.tensor,
    part_ptr: tl.tensor, aux_ptr: tl.tensor, V: tl.tensor, NB: tl.tensor, MODE: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, FANOUT: tl.constexpr, NB_STEP: tl.constexpr, NBP: tl.constexpr,
) -> None:  # fmt: skip
    """Add the chunks' partials in a fixed order and keep the invariant pred(lo) true, pred(hi + 1)
    false (pred is monotone); the last round stores the search's result in the row's state."""
    row = tl.program_id(0).to(tl.int64)
    if _active(top_k_ptr, top_p_ptr, row, V, MODE):
        m = _row_max(pmax_ptr, row, NB, NBP)
        if FIRST:
            lo, hi = _start(m, V, MODE)
        else:
            lo, hi = tl.load(st_ptr + row * 8 + 0), tl.load(st_ptr + row * 8 + 1)
        piv = lo + ((hi - lo + 1) * tl.arange(0, FANOUT).to(tl.int64)) // FANOUT
        acc = tl.zeros([FANOUT], dtype=tl.float32)
        extra = tl.zeros((), dtype=tl.float32)
        for b0 in range(0, NB, NB_STEP):
            j = b0 + tl.arange(0, NB_STEP)
            tile = tl.load(part_ptr + (row * NB + j[:, None]) * FANOUT + tl.arange(0, FANOUT)[None, :],
                           mask=(j < NB)[:, None], other=0.0)  # fmt: skip
            acc += tl.sum(tile, axis=0)
            extra += tl.sum(tl.load(aux_ptr + row * NB + j, mask=j < NB, other=0.0), axis=0)
        if MODE == 0:
            ok = acc >= tl.load(top_k_ptr + row).to(tl.float32)
        elif MODE == 1:  # ties taken: as many as top-k still needs after the keys above kth
            ok = acc < tl.load(top_k_ptr + row).to(tl.float32) - extra
        elif MODE == 2:
            target = tl.load(top_p_ptr + row) * extra
            tl.store(sf_ptr + row * 4, target)
            ok = acc >= target
        else:  # ties whose mass before stays below target (at least one)
            tau = tl.load(st_ptr + row * 8 + 4)
            ties = tl.ceil(tl.div_rn(tl.load(sf_ptr + row * 4) - extra, tl.exp(_value(tau) - m)))
            ok = acc < tl.maximum(ties, 1.0)
        new_lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), axis=0))
        new_hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv - 1), axis=0))
        tl.store(st_ptr + row * 8 + 0, new_lo)
        tl.store(st_ptr + row * 8 + 1, new_hi)
        if LAST:
            # 0 -> kth = lo; 1 -> kcut = lo + 1; 2 -> tau = lo + 1; 3 -> pcut = lo + 1
            if MODE == 0:
                tl.store(st_ptr + row * 8 + 2, new_lo)
            else:
                tl.store(st_ptr + row * 8 + 2 + MODE, new_lo + 1)


@triton.jit
def _kept(
    x: tl.tensor, idx: tl.tensor, valid: tl.tensor, st_ptr: tl.tensor, row: tl.tensor, floor: tl.tensor
) -> tl.tensor:
    key = _key(x)
    kth, kcut = tl.load(st_ptr + row * 8 + 2), tl.load(st_ptr + row * 8 + 3)
    tau, pcut = tl.load(st_ptr + row * 8 + 4), tl.load(st_ptr + row * 8 + 5)
    return valid & _in_top_k(key, idx, kth, kcut) & ((key > tau) | ((key == tau) & (idx < pcut))) & (key >= floor)


@triton.jit
def _floor(m: tl.tensor, min_p_ptr: tl.tensor, row: tl.tensor) -> tl.tensor:
    min_p = tl.load(min_p_ptr + row)
    # The clamp is float32's smallest normal (2**-126): Triton types a smaller literal float64 on a GPU.
    return tl.where(min_p > 0, _key(m + tl.log(tl.maximum(min_p, 1.1754943508222875e-38))), _key(m) * 0 + _INT_MIN)


@triton.jit
def _mass_kernel(
    logits_ptr: tl.tensor, pmax_ptr: tl.tensor, st_ptr: tl.tensor, min_p_ptr: tl.tensor, temp_ptr: tl.tensor,
    z_ptr: tl.tensor, last_ptr: tl.tensor, kept_ptr: tl.tensor, V: tl.tensor, NB: tl.tensor,
    WRITE_KEPT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, NBP: tl.constexpr,
) -> None:  # fmt: skip
    """Each chunk's kept mass after temperature and its last kept id; writes the kept set if asked."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    base = logits_ptr + row * V
    m = _row_max(pmax_ptr, row, NB, NBP)
    floor = _floor(m, min_p_ptr, row)
    inv_t = tl.div_rn(1.0, tl.load(temp_ptr + row))  # IEEE, as the interpreter
    z = tl.zeros((), tl.float32)
    last = tl.full((), -1, tl.int32)
    for s in range(0, CHUNK, BLOCK):
        idx = b * CHUNK + s + tl.arange(0, BLOCK)
        valid = idx < V
        x = tl.load(base + idx, mask=valid, other=float("-inf"))
        kept = _kept(x, idx, valid, st_ptr, row, floor)
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
        for s in range(0, CHUNK, BLOCK):
            idx = b * CHUNK + s + tl.arange(0, BLOCK)
            valid = idx < V
            x = tl.load(base + idx, mask=valid, other=float("-inf"))
            kept = _kept(x, idx, valid, st_ptr, row, floor)
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


def _search(mode: int, rounds: int, bufs: dict[str, Any], args: dict[str, Any]) -> None:
    rows, nb = args["rows"], args["NB"]
    common = (bufs["pmax"], bufs["st"], args["top_k"], args["top_p"])
    for r in range(rounds):
        first, last = r == 0, r == rounds - 1
        _measure_kernel[(rows, nb)](
            args["logits"], *common, bufs["part"], bufs["aux"], args["V"], nb, MODE=mode, FIRST=first,
            FANOUT=_FANOUT, CHUNK=args["CHUNK"], BLOCK=_MBLOCK, NBP=args["NBP"],
        )  # fmt: skip
        _narrow_kernel[(rows,)](
            bufs["pmax"], bufs["st"], bufs["sf"], args["top_k"], args["top_p"], bufs["part"], bufs["aux"],
            args["V"], nb, MODE=mode, FIRST=first, LAST=last, FANOUT=_FANOUT, NB_STEP=_NB_STEP, NBP=args["NBP"],
        )  # fmt: skip


def sample(
    logits: Any, u: Any, top_k: Any, top_p: Any, min_p: Any, temperature: Any, *, kept: Any = None, chunk: int = _CHUNK
) -> Any:
    """Token ids (int32 ``[rows]``) drawn from float32 ``logits [rows, V]`` with uniforms ``u [rows]``;
    ``top_k``/``top_p``/``min_p``/``temperature`` are per-row tensors (temperature > 0: greedy rows
    take an argmax instead). ``kept``, an int8 ``[rows, V]`` tensor, receives the kept set when given.
    ``chunk`` (a multiple of 128) is the logits per program; the tests shrink it to get many chunks."""
    import torch

    rows, vocab = logits.shape
    logits = logits.contiguous()
    dev = logits.device
    nb = triton.cdiv(vocab, chunk)
    # One host read decides which searches run at all (a batch without top-p launches none of its).
    flags = torch.stack([((top_k > 0) & (top_k < vocab)).any(), (top_p < 1.0).any()]).tolist()
    bufs = {
        "pmax": torch.empty((rows, nb), dtype=torch.float32, device=dev),
        "st": torch.empty((rows, 8), dtype=torch.int64, device=dev),
        "sf": torch.empty((rows, 4), dtype=torch.float32, device=dev),
        "part": torch.empty((rows, nb, _FANOUT), dtype=torch.float32, device=dev),
        "aux": torch.empty((rows, nb), dtype=torch.float32, device=dev),
        "z": torch.empty((rows, nb), dtype=torch.float32, device=dev),
        "last": torch.empty((rows, nb), dtype=torch.int32, device=dev),
        "found": torch.empty((rows, nb), dtype=torch.int32, device=dev),
    }
    nbp = max(16, triton.next_power_of_2(nb))
    args = {
        "logits": logits,
        "top_k": top_k,
        "top_p": top_p,
        "V": vocab,
        "NB": nb,
        "rows": rows,
        "CHUNK": chunk,
        "NBP": nbp,
    }
    _max_kernel[(rows, nb)](logits, bufs["pmax"], bufs["st"], vocab, nb, CHUNK=chunk, BLOCK=_BLOCK)
    key_rounds, idx_rounds = _rounds(2**32), _rounds(vocab + 1)
    if flags[0]:
        _search(_KEY_K, key_rounds, bufs, args)
        _search(_IDX_K, idx_rounds, bufs, args)
    if flags[1]:
        _search(_KEY_P, key_rounds, bufs, args)
        _search(_IDX_P, idx_rounds, bufs, args)
    out = torch.empty(rows, dtype=torch.int32, device=dev)
    _mass_kernel[(rows, nb)](
        logits, bufs["pmax"], bufs["st"], min_p, temperature, bufs["z"], bufs["last"],
        kept if kept is not None else out, vocab, nb, WRITE_KEPT=kept is not None, CHUNK=chunk, BLOCK=_BLOCK, NBP=nbp,
    )  # fmt: skip
    _draw_kernel[(rows, nb)](
        logits, bufs["pmax"], bufs["st"], u, min_p, temperature, bufs["z"], bufs["found"], vocab, nb,
        CHUNK=chunk, BLOCK=_BLOCK, NBP=nbp,
    )  # fmt: skip
    _pick_kernel[(rows,)](bufs["found"], bufs["last"], out, vocab, nb, NBP=nbp)
    return out
