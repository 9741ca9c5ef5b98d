"""Issue 16's GPU kernels on a CUDA device: correctness against the references, then time against
the unfused torch sequences they replace. Writes JSON to ``--out`` (default ``$OUT/kernels_gpu.json``
where ``$OUT`` is set, else ``bench/kernels_gpu.json``).

1. **Sampler** (``edgeserve.kernels.sample_triton``) over real Gemma 3 270M logits (vocab 262,144;
   ``bench/results/kernels_gpu_logits.npy``, made here by ``bench/kernels.py``'s ``real_logits(2)``:
   8 rows, 4 prompts x 2 positions; synthetic rows where the file is absent, and the JSON says so),
   batch 1/4/8, per combination of the cuts, three seeded uniforms per row. The kept set and the
   token are compared with ``sample_ref`` (float64) row by row: "exact", "float32" (a difference
   the kernel's contract allows: a top-p or min-p cut, or a draw, within float32 rounding, gap
   recorded) or "MISMATCH". The unfused torch chain (sort, softmax, cumsum, masks, a second
   cumsum and searchsorted) is judged the same way. Greedy is ``top_k 1``.
2. **KV int8 pack**: Triton (``kvpack_triton``) and the CUDA source (``cuda/kvpack.cu``, built by
   nvcc to a cubin for this GPU and loaded by CuPy) against the NumPy reference (``kvpack``):
   scales bit for bit, q within one step and only at a near-tie, the error bound, every output
   element written (poisoned buffers), dequantize within one float16 ulp; Triton against CUDA bit
   for bit; then both timed against torch's unfused quantize/dequantize.
3. Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every rep, warm-up first),
   median and 20/80 % quantiles in microseconds; the fused sampler is timed twice (the spread is
   the noise), ratios are unfused / fused.

``--variants DIR`` also runs earlier copies of the Triton modules found there (each file one
module) and records whether they compiled and how their results differ; an earlier sampler is
timed against the current one in the same run (defaults, top-p, min-p at batch 1 and 8).

    PYTHONUNBUFFERED=1 python3 bench/kernels_gpu.py --out $OUT/kernels_gpu.json
    python3 bench/kernels_gpu.py --pytest tests/test_kernels_triton.py tests/test_kernels_cuda.py
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --smoke      # CPU dry run, tiny sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from _combos import CUTS, Combo

ROOT = Path(__file__).resolve().parents[1]
LOGITS = ROOT / "bench" / "results" / "kernels_gpu_logits.npy"
Array = np.ndarray[Any, Any]
COMBOS: dict[str, Combo] = {
    "greedy (top_k 1)": (1, 1.0, 0.0, 1.0),
    **CUTS,
    "all cuts (top_k 100, top_p 0.8, min_p 0.02, T 1.3)": (100, 0.8, 0.02, 1.3),
}
SEEDS = (0, 1, 2)
TOL = 1e-4  # a cut or draw boundary this close (relative mass, or logit units for min-p) is float32's call


def import_kernels() -> str:
    """Make ``edgeserve.kernels`` importable. The device image lacks the base install's pydantic and
    friends, which ``edgeserve/__init__`` pulls in; the kernel modules need none of them, so a bare
    package object stands in for ``edgeserve`` there."""
    sys.path.insert(0, str(ROOT))
    try:
        import edgeserve  # noqa: F401

        return "edgeserve (full import)"
    except ImportError as exc:
        for name in [m for m in sys.modules if m == "edgeserve" or m.startswith("edgeserve.")]:
            del sys.modules[name]
        pkg = types.ModuleType("edgeserve")
        pkg.__path__ = [str(ROOT / "edgeserve")]
        sys.modules["edgeserve"] = pkg
        return f"bare edgeserve package (full import failed: {exc})"


# ---- timing -------------------------------------------------------------------------------------


def timer(cuda: bool, reps: int) -> Callable[[Callable[[], object]], dict[str, float]]:
    def on_gpu(fn: Callable[[], object]) -> dict[str, float]:
        import triton.testing

        q20, q50, q80 = triton.testing.do_bench(fn, warmup=25, rep=reps, quantiles=[0.2, 0.5, 0.8])
        return {"median_us": round(q50 * 1e3, 2), "p20_us": round(q20 * 1e3, 2), "p80_us": round(q80 * 1e3, 2)}

    def on_cpu(fn: Callable[[], object]) -> dict[str, float]:  # the dry run: interpreter, wall clock
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        q20, q50, q80 = np.percentile(times, [20, 50, 80])
        return {"median_us": round(float(q50), 2), "p20_us": round(float(q20), 2), "p80_us": round(float(q80), 2)}

    return on_gpu if cuda else on_cpu


# ---- sampler ------------------------------------------------------------------------------------


def load_logits(smoke: bool) -> tuple[Array, str]:
    if LOGITS.exists() and not smoke:
        return np.load(LOGITS).astype(np.float32), f"real: Gemma 3 270M via llama.cpp ({LOGITS.name})"
    rng = np.random.default_rng(7)
    vocab = 3000 if smoke else 262144
    x = rng.normal(-2, 2.5, (8, vocab)) + rng.gumbel(0, 1.2, (8, vocab))
    x[:, rng.integers(0, vocab, 8)] += 9  # a few likely tokens, as in real rows
    return x.astype(np.float32), "synthetic (normal + gumbel): the real-logits file was absent"


def constrained(logits: Array) -> Array:
    """A grammar's mask (-inf on every 7th id) and a three-way tie at the top of row 0."""
    out = logits.copy()
    out[:, ::7] = -np.inf
    out[0, [5, 17, 900]] = out[0].max() + 1
    return out


def torch_unfused(logits: Any, u: Any, top_k: Any, top_p: Any, min_p: Any, temperature: Any) -> tuple[Any, Any]:
    """The chain the fused kernel replaces, as torch ops over the batch (per-row parameters):
    a stable sort, the top-k/top-p/min-p masks in sorted order, scatter back, then the draw by
    inverse CDF in id order (the reference's). Returns (token ids int64, kept bool)."""
    import torch

    vocab = logits.shape[1]
    vals, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    pos = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab).to(torch.int64)[:, None]
    keep = pos < k
    probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    keep &= (top_p[:, None] >= 1) | (before < top_p[:, None]) | (pos == 0)
    floor = vals[:, :1] + torch.log(min_p.clamp_min(1e-38))[:, None]
    keep &= (min_p[:, None] <= 0) | (vals >= floor)
    kept = torch.zeros_like(keep).scatter_(1, order, keep)
    w = torch.where(kept, torch.exp((logits - vals[:, :1]) / temperature[:, None]), 0.0)
    cdf = torch.cumsum(w, dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
    last = vocab - 1 - torch.argmax(kept.flip(-1).to(torch.int8), dim=-1)
    return torch.minimum(pick, last), kept


def torch_topk_draw(logits: Any, u: Any, k: int, temperature: Any) -> Any:
    """The cheaper unfused path for a top-k-only setting: torch.topk, then the draw over the k in id order."""
    import torch

    vals, ids = torch.topk(logits, k, dim=-1, sorted=False)
    ids, perm = torch.sort(ids, dim=-1)
    vals = torch.gather(vals, 1, perm)
    w = torch.exp((vals - vals.max(dim=-1, keepdim=True).values) / temperature[:, None])
    cdf = torch.cumsum(w, dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).clamp_max(k - 1)
    return torch.gather(ids, 1, pick)[:, 0]


def judge(row: Array, combo: Combo, u: float, kept: Array, token: int, ref: tuple[Array, Array]) -> dict[str, Any]:
    """'exact', 'float32' (the difference sits within TOL of a cut or of the draw's boundary) or 'MISMATCH'."""
    from edgeserve.kernels import sample_ref

    ids, probs = ref
    want = sample_ref.draw(ids, probs, u)
    if not np.array_equal(kept, ids):
        gap = cut_gap(row, combo, np.setxor1d(kept, ids))
        return {
            "verdict": "float32" if gap <= TOL else "MISMATCH",
            "kept": int(kept.size),
            "want_kept": int(ids.size),
            "cut_gap": gap,
        }
    if token == want:
        return {"verdict": "exact"}
    cdf = np.cumsum(probs)
    i, j = int(np.searchsorted(ids, token)), int(np.searchsorted(ids, want))
    gap = abs(float(cdf[min(i, j)]) - u * float(cdf[-1])) / float(cdf[-1]) if abs(i - j) == 1 else math.inf
    return {"verdict": "float32" if gap <= TOL else "MISMATCH", "token": token, "want": want, "draw_gap": gap}


def cut_gap(row: Array, combo: Combo, diff: Array) -> float:
    """How far the tokens kept by one side only are from a cut: top-p mass before them vs top_p,
    or their logit vs the min-p floor. inf when neither cut explains them (top-k is exact)."""
    from edgeserve.kernels import sample_ref

    top_k, top_p, min_p, _ = combo
    ids, cand = sample_ref.top_k_stage(np.arange(row.size), row.astype(np.float64), top_k)
    if not np.isin(diff, ids).all():
        return math.inf
    gaps = []
    if top_p < 1:
        order = np.argsort(-cand, kind="stable")
        probs = sample_ref.softmax(cand[order])
        before = dict(zip(ids[order].tolist(), (np.cumsum(probs) - probs).tolist(), strict=True))
        gaps.append(max(abs(before[int(t)] - top_p) for t in diff))
    if min_p > 0:
        floor = cand.max() + math.log(min_p)
        gaps.append(max(abs(float(row[int(t)]) - floor) for t in diff))
    return min(gaps) if gaps else math.inf


def sampler_checks(logits: Array, batches: tuple[int, ...], device: str) -> list[dict[str, Any]]:
    from edgeserve.kernels import sample_ref

    refs: dict[tuple[str, int, str], tuple[Array, Array]] = {}
    cases = []
    for label, data in (("real", logits), ("constrained", constrained(logits))):
        for batch in batches if label == "real" else batches[-1:]:
            for name, combo in COMBOS.items():
                for r in range(batch):  # the reference's kept set does not depend on the draw
                    if (label, r, name) not in refs:
                        refs[label, r, name] = sample_ref.distribution(data[r], *combo)
                case = check_case(data[:batch], combo, device, [refs[label, r, name] for r in range(batch)])
                cases.append({"logits": label, "batch": batch, "setting": name, "combo": list(combo), **case})
                v = case["verdicts"]
                print(f"check {label:11s} b{batch} {name:52s} fused {v['fused']} torch {v['unfused_torch']}")
    return cases


def check_case(rows: Array, combo: Combo, device: str, refs: list[tuple[Array, Array]]) -> dict[str, Any]:
    """Fused and unfused torch against the reference, row by row, for each seeded set of uniforms."""
    import torch

    from edgeserve.kernels import sample_triton

    batch = rows.shape[0]
    x, params = torch.from_numpy(rows).to(device), per_row(combo, batch, device)
    verdicts: dict[str, dict[str, int]] = {"fused": {}, "unfused_torch": {}}
    not_exact: list[dict[str, Any]] = []
    unwritten = 0
    for seed in SEEDS:
        u_np = np.random.default_rng([seed, batch]).random(batch).astype(np.float32)
        u = torch.from_numpy(u_np).to(device)
        kept = torch.full(rows.shape, 7, dtype=torch.int8, device=device)  # poison: the kernel writes 0 or 1
        tokens = sample_triton.sample(x, u, *params, kept=kept).cpu().numpy()
        kept_np = kept.cpu().numpy()
        unwritten += int(np.count_nonzero(kept_np > 1))
        t_tokens, t_kept = (t.cpu().numpy() for t in torch_unfused(x, u, *params))
        for r in range(batch):
            for side, kset, tok in (("fused", kept_np[r] == 1, tokens[r]), ("unfused_torch", t_kept[r], t_tokens[r])):
                v = judge(rows[r], combo, float(u_np[r]), np.flatnonzero(kset), int(tok), refs[r])
                verdicts[side][v["verdict"]] = verdicts[side].get(v["verdict"], 0) + 1
                if v["verdict"] != "exact" and len(not_exact) < 4:
                    not_exact.append({"side": side, "row": r, "seed": seed, **v})
    return {"verdicts": verdicts, "not_exact": not_exact, "kept_entries_unwritten": unwritten}


def per_row(combo: Combo, batch: int, device: str) -> list[Any]:
    import torch

    k, p, mp, t = combo
    return [
        torch.full((batch,), k, dtype=torch.int32, device=device),
        *(torch.full((batch,), v, dtype=torch.float32, device=device) for v in (p, mp, t)),
    ]


def sampler_timing(logits: Array, batches: tuple[int, ...], device: str, bench: Any) -> list[dict[str, Any]]:
    import torch

    from edgeserve.kernels import sample_triton

    out = []
    for batch in batches:
        x = torch.from_numpy(logits[:batch]).to(device)
        u = torch.from_numpy(np.random.default_rng(batch).random(batch).astype(np.float32)).to(device)
        for name, combo in COMBOS.items():
            params = per_row(combo, batch, device)
            fused = partial(sample_triton.sample, x, u, *params)
            row: dict[str, Any] = {"batch": batch, "setting": name, "fused": bench(fused)}
            row["unfused_torch_sort"] = bench(partial(torch_unfused, x, u, *params))
            row["fused_again"] = bench(fused)  # the spread between the two is the noise
            k, p, mp, _ = combo
            if k == 1:
                row["torch_argmax"] = bench(partial(torch.argmax, x, dim=-1))
            elif k > 0 and p >= 1 and mp <= 0:
                row["torch_topk"] = bench(partial(torch_topk_draw, x, u, k, params[3]))
            f_us = row["fused"]["median_us"]
            for other in ("unfused_torch_sort", "torch_argmax", "torch_topk"):
                if other in row:
                    row[f"ratio_{other}_over_fused"] = round(row[other]["median_us"] / f_us, 3)
            out.append(row)
            print(
                f"time b{batch} {name:52s} fused {f_us:9.1f} us (again {row['fused_again']['median_us']:9.1f})"
                f"  torch {row['unfused_torch_sort']['median_us']:9.1f} us"
            )
    return out


# ---- KV int8 pack -------------------------------------------------------------------------------


def kv_block(shape: tuple[int, int, int], seed: int) -> Array:
    """Per-row magnitudes over four decades, a few outlier channels (keys have them), one zero row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-4, 3, (*shape[:2], 1)))
    x[..., rng.integers(0, shape[2], 3)] *= 12
    x[0, 0] = 0.0
    return x.astype(np.float16)


class CudaKV:
    """cuda/kvpack.cu built by nvcc for this GPU (a cubin) and launched through CuPy."""

    def __init__(self, arch: str) -> None:
        import cupy

        self.cupy = cupy
        source = ROOT / "edgeserve" / "kernels" / "cuda" / "kvpack.cu"
        nvcc = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
        if nvcc is None:
            raise RuntimeError("nvcc not found")
        cubin = Path(tempfile.mkdtemp()) / "kvpack.cubin"
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-Xptxas", "-v", str(source), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed: {proc.stderr[-1500:]}")
        self.build = {"command": " ".join(cmd[1:-2]), "ptxas": proc.stderr.strip().splitlines()[-6:]}
        module = cupy.RawModule(path=str(cubin))
        self.quantize_fn = module.get_function("kv_quantize_f16")
        self.dequantize_fn = module.get_function("kv_dequantize_f16")

    def quantize(self, x: Any, q: Any, s: Any) -> None:
        rows, head_dim = x.shape[0] * x.shape[1], x.shape[2]
        threads = min(256, 32 * -(-head_dim // 32))
        cp = self.cupy
        self.quantize_fn((rows,), (threads,), (cp.asarray(x), cp.asarray(q), cp.asarray(s), np.int32(head_dim)))

    def dequantize(self, q: Any, s: Any, out: Any) -> None:
        rows, head_dim = q.shape[0] * q.shape[1], q.shape[2]
        threads = min(256, 32 * -(-head_dim // 32))
        cp = self.cupy
        self.dequantize_fn((rows,), (threads,), (cp.asarray(q), cp.asarray(s), cp.asarray(out), np.int32(head_dim)))


def torch_quantize(x: Any) -> tuple[Any, Any]:
    import torch

    xf = x.float()
    s = xf.abs().amax(dim=-1) / 127.0
    q = torch.round(xf / torch.where(s > 0, s, 1.0)[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def torch_dequantize(q: Any, s: Any) -> Any:
    import torch

    return (q.float() * s[..., None]).to(torch.float16)


def kv_compare(x: Array, q: Array, s: Array, ref: tuple[Array, Array]) -> dict[str, Any]:
    """One implementation's (q, s) against the reference's: the contract in kvpack_triton's docstring."""
    q_ref, s_ref = ref
    x64, s64 = x.astype(np.float64), s.astype(np.float64)[..., None]
    diff = q.astype(np.int32) != q_ref
    quotient = x64 / np.where(s64 > 0, s64, 1.0)
    near_tie = np.abs(np.abs(quotient - np.floor(quotient)) - 0.5) <= 127 * 2.0**-23
    err = np.abs(x64 - q.astype(np.float64) * s64)
    return {
        "scales_bit_equal": bool(np.array_equal(s.view(np.uint32), s_ref.view(np.uint32))),
        "scales_differing": int(np.count_nonzero(s.view(np.uint32) != s_ref.view(np.uint32))),
        "q_differing": int(np.count_nonzero(diff)),
        "q_differing_not_near_tie": int(np.count_nonzero(diff & ~near_tie)),
        "q_max_step": int(np.abs(q.astype(np.int32) - q_ref).max()),
        "error_bound_holds": bool((err <= s64 * (0.5 + 2.0**-16)).all()),
        "max_error_over_scale": float((err / np.where(s64 > 0, s64, 1.0)).max()),
    }


def kv_dequant_compare(out: Array, ref: Array) -> dict[str, Any]:
    a, b = out.view(np.int16).astype(np.int32), ref.view(np.int16).astype(np.int32)
    return {
        "bit_equal_fraction": float(np.mean(a == b)),
        "max_ulp": int(np.abs(a - b).max()),
        "within_one_ulp": bool((np.abs(out.astype(np.float64) - ref) <= np.spacing(np.abs(ref))).all()),
    }


def kv_checks(shapes: list[tuple[int, int, int]], device: str, cuda_kv: CudaKV | None) -> list[dict[str, Any]]:
    import torch

    from edgeserve.kernels import kvpack, kvpack_triton

    cases = []
    for shape in shapes:
        x = kv_block(shape, seed=shape[2])
        ref = kvpack.quantize(x)
        deq_ref = kvpack.dequantize(*ref)
        xt = torch.from_numpy(x).to(device)
        qt, st = kvpack_triton.quantize(xt)
        case: dict[str, Any] = {"shape": list(shape), "triton": kv_compare(x, qt.cpu().numpy(), st.cpu().numpy(), ref)}
        q_ref_t, s_ref_t = (torch.from_numpy(a).to(device) for a in ref)
        case["triton"]["dequantize"] = kv_dequant_compare(
            kvpack_triton.dequantize(q_ref_t, s_ref_t).cpu().numpy(), deq_ref
        )
        # Every element written: the raw kernel into poisoned buffers (-128 is never a result).
        q_p = torch.full(shape, -128, dtype=torch.int8, device=device)
        s_p = torch.full(shape[:2], float("nan"), dtype=torch.float32, device=device)
        kvpack_triton._quantize_kernel[(shape[0] * shape[1],)](
            xt, q_p, s_p, shape[2], BLOCK=1 << (shape[2] - 1).bit_length()
        )
        case["triton"]["all_written"] = bool((q_p != -128).all() and torch.isfinite(s_p).all())
        if cuda_kv is not None:
            q_c = torch.full(shape, -128, dtype=torch.int8, device=device)
            s_c = torch.full(shape[:2], float("nan"), dtype=torch.float32, device=device)
            cuda_kv.quantize(xt, q_c, s_c)
            torch.cuda.synchronize()
            case["cuda"] = kv_compare(x, q_c.cpu().numpy(), s_c.cpu().numpy(), ref)
            case["cuda"]["all_written"] = bool((q_c != -128).all() and torch.isfinite(s_c).all())
            out_c = torch.full(shape, float("nan"), dtype=torch.float16, device=device)
            cuda_kv.dequantize(q_ref_t, s_ref_t, out_c)
            torch.cuda.synchronize()
            case["cuda"]["dequantize"] = kv_dequant_compare(out_c.cpu().numpy(), deq_ref)
            case["triton_equals_cuda"] = bool(
                torch.equal(q_c, qt) and torch.equal(s_c.view(torch.int32), st.view(torch.int32))
            )
        cases.append(case)
        print(f"check kv {shape}: {json.dumps(case)}")
    return cases


def kv_timing(shapes: dict[str, tuple[int, int, int]], device: str, bench: Any, cuda_kv: CudaKV | None) -> list[Any]:
    import torch

    from edgeserve.kernels import kvpack_triton

    out = []
    for name, shape in shapes.items():
        x = torch.randn(shape, device=device).mul_(3).to(torch.float16)
        q, s = torch_quantize(x)
        fns = {
            "quantize": {"triton": partial(kvpack_triton.quantize, x), "unfused_torch": partial(torch_quantize, x)},
            "dequantize": {
                "triton": partial(kvpack_triton.dequantize, q, s),
                "unfused_torch": partial(torch_dequantize, q, s),
            },
        }
        if cuda_kv is not None:
            qc, sc, oc = torch.empty_like(q), torch.empty_like(s), torch.empty_like(x)
            fns["quantize"]["cuda"] = partial(cuda_kv.quantize, x, qc, sc)
            fns["dequantize"]["cuda"] = partial(cuda_kv.dequantize, q, s, oc)
        moved = 3 * x.numel() + 4 * x.numel() // shape[2]  # f16 in + int8 out + scales (or the reverse)
        row: dict[str, Any] = {"model": name, "shape": list(shape), "bytes_moved": moved}
        for op, impls in fns.items():
            row[op] = {impl: bench(fn) for impl, fn in impls.items()}
            base = row[op]["unfused_torch"]["median_us"]
            for t in row[op].values():
                t["ratio_unfused_over_this"] = round(base / t["median_us"], 3)
                t["GB_per_s"] = round(moved / t["median_us"] / 1e3, 1)
        if cuda_kv is not None:
            cuda_kv.quantize(x, qc, sc)
            qt, st = kvpack_triton.quantize(x)
            row["triton_equals_cuda"] = bool(torch.equal(qc, qt) and torch.equal(sc, st))
        out.append(row)
        medians = {op: {i: v["median_us"] for i, v in row[op].items()} for op in fns}
        print(f"time kv {name} {shape}: {json.dumps(medians)}")
    return out


# ---- earlier copies of the modules --------------------------------------------------------------


def sampler_variant(module: Any, device: str, logits: Array, bench: Any) -> dict[str, Any]:
    """An earlier sampler's token for the defaults at u = 0.5, and its time beside this module's
    (same run, same GPU) for a few settings at batch 1 and 8."""
    import torch

    from edgeserve.kernels import sample_triton

    x = torch.from_numpy(logits[:1]).to(device)
    u = torch.full((1,), 0.5, device=device)
    params = per_row(COMBOS["defaults (top_k 40, top_p 0.95)"], 1, device)
    out: dict[str, Any] = {"token": int(module.sample(x, u, *params)[0])}
    out["token_now"] = int(sample_triton.sample(x, u, *params)[0])
    timing = []
    for batch in (1, 8):
        x = torch.from_numpy(logits[:batch]).to(device)
        u = torch.full((batch,), 0.5, device=device)
        for name in ("defaults (top_k 40, top_p 0.95)", "top_p 0.95 (top_k 0)", "min_p 0.05 (top_k 0)"):
            params = per_row(COMBOS[name], batch, device)
            then, now = (
                bench(partial(module.sample, x, u, *params)),
                bench(partial(sample_triton.sample, x, u, *params)),
            )
            ratio = round(then["median_us"] / now["median_us"], 2)
            timing.append({"batch": batch, "setting": name, "variant": then, "now": now, "variant_over_now": ratio})
    out["timing"] = timing
    return out


def variants(folder: Path, device: str, logits: Array, bench: Any) -> dict[str, Any]:
    """Run each earlier copy: did it compile, and (KV) do its scales equal the reference's; an
    earlier sampler is also timed against this one."""
    import torch

    from edgeserve.kernels import kvpack

    out: dict[str, Any] = {}
    for path in sorted(folder.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"variant_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if "kvpack" in path.stem:
                x = kv_block((1024, 36, 256), seed=256)
                q, s = module.quantize(torch.from_numpy(x).to(device))
                out[path.name] = {"ran": True, **kv_compare(x, q.cpu().numpy(), s.cpu().numpy(), kvpack.quantize(x))}
            else:
                out[path.name] = {"ran": True, **sampler_variant(module, device, logits, bench)}
        except Exception as exc:  # (recorded: that is the point)
            out[path.name] = {"ran": False, "error": f"{type(exc).__name__}: {str(exc)[-600:]}"}
        print(f"variant {path.name}: {json.dumps(out[path.name])[:400]}")
    return out


# ---- the run ------------------------------------------------------------------------------------


def environment(cuda: bool, import_note: str) -> dict[str, Any]:
    import torch
    import triton

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    env |= {"triton": triton.__version__, "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    env["edgeserve_import"] = import_note
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["multiprocessors"] = props.multi_processor_count
        env["memory_GiB"] = round(props.total_memory / 2**30, 1)
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "--query-gpu=driver_version,clocks.sm,clocks.max.sm"
            env["nvidia_smi"] = subprocess.run(
                [smi, query, "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
    else:
        env["device"] = f"CPU (dry run, Triton interpreter): {platform.processor() or platform.machine()}"
    try:
        import cupy

        env["cupy"] = cupy.__version__
    except ImportError:
        env["cupy"] = None
    return env


def copy_bandwidth(bench: Any, device: str) -> dict[str, Any]:
    """The memory ceiling the KV kernels are held to: a 1 GiB device-to-device copy (read + write)."""
    import torch

    a = torch.empty(2**28, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    return {"bytes": 2 * a.numel() * 4, "copy": t, "GB_per_s": round(2 * a.numel() * 4 / t["median_us"] / 1e3, 1)}


def run_pytest(args: list[str]) -> int:
    """The kernel tests, with the same bare-package import (the root conftest needs the whole install)."""
    note = import_kernels()
    print(f"pytest with {note}", flush=True)
    import pytest

    return int(pytest.main(["-q", "--noconftest", "-p", "no:cacheprovider", "-rs", *args]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU dry run under TRITON_INTERPRET=1)")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench's timed milliseconds per measurement")
    ap.add_argument("--variants", type=Path, default=None, help="a folder of earlier copies of the Triton modules")
    ap.add_argument("--pytest", nargs=argparse.REMAINDER, default=None, help="run these tests instead")
    args = ap.parse_args()
    if args.pytest is not None:
        sys.exit(run_pytest(args.pytest))
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated
    import_note = import_kernels()
    default = (
        Path(os.environ["OUT"]) / "kernels_gpu.json" if os.environ.get("OUT") else ROOT / "bench" / "kernels_gpu.json"
    )
    out = args.out or default
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": environment(cuda, import_note),
        "timing_method": "triton.testing.do_bench: CUDA events per rep, L2 flushed before each, "
        f"25 ms warm-up, {args.rep_ms} ms of reps; median and 20/80 % quantiles",
    }
    print(json.dumps(report["environment"]), flush=True)
    started = time.perf_counter()
    for name, fn in plan(args, cuda, report):
        part, _, key = name.partition(".")
        try:
            value = fn()
        except Exception as exc:  # one broken section must not cost the others their numbers
            import traceback

            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {exc}"}
        report.setdefault(part, {})
        if key:
            report[part][key] = value
        else:
            report[part] = value
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")  # each section: a timeout keeps the rest
        print(f"== {name} done at {time.perf_counter() - started:.1f} s", flush=True)
    print_summary(report)


def plan(args: argparse.Namespace, cuda: bool, report: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
    """The sections to run, in order; each fills one key of the report."""
    import torch

    device = "cuda" if cuda else "cpu"
    bench = timer(cuda, args.rep_ms)
    logits, source = load_logits(args.smoke)
    batches = (1, 2) if args.smoke else (1, 4, 8)
    report["sampler"] = {"logits": source, "vocab": int(logits.shape[1]), "seeds": list(SEEDS), "tolerance": TOL}
    cuda_kv: CudaKV | None = None
    report["kvpack"] = {"cuda_build": {"skipped": "no CUDA device"}}
    if cuda:
        try:
            cuda_kv = CudaKV("sm_{}{}".format(*torch.cuda.get_device_capability(0)))
            report["kvpack"]["cuda_build"] = cuda_kv.build
        except Exception as exc:  # recorded; the Triton half still runs
            report["kvpack"]["cuda_build"] = {"error": f"{type(exc).__name__}: {exc}"}
    checked = [(6, 2, 256), (3, 4, 80), (257, 8, 128)] if args.smoke else [(1024, 36, 256), (257, 8, 128), (64, 4, 80)]
    timed = {"tiny": (16, 4, 64)} if args.smoke else TIMED_KV
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("sampler.correctness", lambda: sampler_checks(logits, batches, device)),
        ("sampler.timing", lambda: sampler_timing(logits, batches, device, bench)),
        ("kvpack.correctness", lambda: kv_checks(checked, device, cuda_kv)),
        ("kvpack.timing", lambda: kv_timing(timed, device, bench, cuda_kv)),
    ]
    if cuda:
        sections.insert(0, ("copy_ceiling", lambda: copy_bandwidth(bench, device)))
    if args.variants and args.variants.is_dir():
        sections.append(("variants", lambda: variants(args.variants, device, logits, bench)))
    return sections


TIMED_KV = {
    "Gemma 3 270M, 1024 tokens": (1024, 36, 256),
    "8B-class (32 layers x K,V x 8 heads), 4096 tokens": (4096, 512, 128),
}


def print_summary(report: dict[str, Any]) -> None:
    """A short table last: the device reply carries only the end of the output."""
    sampler = report.get("sampler", {})
    for case in sampler.get("correctness", []) if isinstance(sampler.get("correctness"), list) else []:
        if set(case["verdicts"]["fused"]) != {"exact"}:
            print(
                f"NOT EXACT {case['logits']} b{case['batch']} {case['setting']}: {json.dumps(case['not_exact'])[:300]}"
            )
    if isinstance(sampler.get("timing"), list):
        print(
            f"{'sampler (us, median)':60s} {'fused':>9s} {'again':>9s} {'torch':>9s} {'ratio':>7s} {'topk/argmax':>11s}"
        )
        for r in sampler["timing"]:
            extra = r.get("torch_argmax", r.get("torch_topk", {})).get("median_us", "")
            us = [r[k]["median_us"] for k in ("fused", "fused_again", "unfused_torch_sort")]
            ratio = r["ratio_unfused_torch_sort_over_fused"]
            print(f"b{r['batch']} {r['setting']:57s} {us[0]:9.1f} {us[1]:9.1f} {us[2]:9.1f} {ratio:7.3f} {extra:>11}")
    kv = report.get("kvpack", {})
    for c in kv.get("correctness", []) if isinstance(kv.get("correctness"), list) else []:
        keys = ("scales_bit_equal", "q_differing", "q_differing_not_near_tie", "error_bound_holds", "all_written")
        row = {impl: [c[impl][k] for k in keys] for impl in ("triton", "cuda") if impl in c}
        print(f"kv check {c['shape']}: {json.dumps(row)} triton==cuda {c.get('triton_equals_cuda')}")
    for r in kv.get("timing", []) if isinstance(kv.get("timing"), list) else []:
        for op in ("quantize", "dequantize"):
            cells = "  ".join(f"{i} {t['median_us']:.1f} us ({t['GB_per_s']} GB/s)" for i, t in r[op].items())
            print(f"kv {op:10s} {r['shape']}: {cells}")
    for name, v in report.get("variants", {}).items():
        rows = v.get("timing", []) if isinstance(v, dict) else []
        print(f"variant {name}: {json.dumps({k: x for k, x in v.items() if k != 'timing'})[:300]}")
        for r in rows:
            then, now = r["variant"]["median_us"], r["now"]["median_us"]
            print(f"  b{r['batch']} {r['setting']:36s} then {then:9.1f} us now {now:9.1f} us x{r['variant_over_now']}")


if __name__ == "__main__":
    main()
