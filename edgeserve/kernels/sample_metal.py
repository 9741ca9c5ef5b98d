"""Fused sampling as one Metal kernel (``mx.fast.metal_kernel``): top-k -> top-p -> min-p ->
temperature -> a draw, one threadgroup of 1,024 threads per row of logits, with no sort.

The algorithm is the Triton kernel's (``sample_triton``), with binary instead of 16-way searches:
a float32 logit maps to an int32 key of the same order; top-k's cut is the largest key with at
least ``k`` keys at or above it, ties at it by lower id (a search over the index); top-p's cut is
the smallest key above which the top-k mass is below ``top_p`` of it, ties again by id; min-p is one
comparison; the draw is an inverse CDF in id order (each thread sums a contiguous chunk, the
first thread walks the chunks). Float32 sums: a cut within float32 rounding of ``top_p`` may
differ from the reference (``sample_ref``). Bias and penalties are applied to the logits before.

``MetalSampler()`` builds the kernel once; keep the object (MLX compiles it once per vocabulary
size, a template constant). Needs Apple silicon (macOS, Metal).
"""

from __future__ import annotations

from typing import Any

THREADS = 1024

_HEADER = """
inline long key_of(float x) {
    int b = as_type<int>(x + 0.0f);  // + 0.0 folds -0.0 into +0.0
    return (long)(b < 0 ? (b ^ 0x7FFFFFFF) : b);
}

inline float value_of(long k) {
    int i = (int)k;
    return as_type<float>(i < 0 ? (i ^ 0x7FFFFFFF) : i);
}

inline bool in_top_k(long key, uint i, long kth, long kcut) {
    return key > kth || (key == kth && (long)i < kcut);
}

inline bool kept_at(long key, uint i, long kth, long kcut, long tau, long pcut, long floor_key) {
    return in_top_k(key, i, kth, kcut) && (key > tau || (key == tau && (long)i < pcut)) && key >= floor_key;
}

// mode 0: #key >= piv; 1: #(key == kth, id < piv); 2: top-k mass with key > piv; 3: #(top-k, key == tau, id < piv)
inline float measure(const device float* x, uint lo, uint hi, int mode, long piv, float m, long kth, long kcut,
                     long tau) {
    float acc = 0.0f;
    for (uint i = lo; i < hi; ++i) {
        long k = key_of(x[i]);
        if (mode == 0) {
            acc += k >= piv ? 1.0f : 0.0f;
        } else if (mode == 1) {
            acc += (k == kth && (long)i < piv) ? 1.0f : 0.0f;
        } else if (mode == 2) {
            acc += (in_top_k(k, i, kth, kcut) && k > piv) ? exp(x[i] - m) : 0.0f;
        } else {
            acc += (in_top_k(k, i, kth, kcut) && k == tau && (long)i < piv) ? 1.0f : 0.0f;
        }
    }
    return acc;
}

inline float tg_sum(float v, threadgroup float* buf, uint lid, uint sid, uint lane) {
    v = simd_sum(v);
    if (lane == 0) buf[sid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float r = simd_sum(lid < 32 ? buf[lid] : 0.0f);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lid == 0) buf[0] = r;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float out = buf[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return out;
}

inline float tg_max(float v, threadgroup float* buf, uint lid, uint sid, uint lane) {
    v = simd_max(v);
    if (lane == 0) buf[sid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float r = simd_max(lid < 32 ? buf[lid] : -INFINITY);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lid == 0) buf[0] = r;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float out = buf[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return out;
}
"""

_SOURCE = """
    uint row = threadgroup_position_in_grid.x;
    uint lid = thread_position_in_threadgroup.x;
    uint lane = thread_index_in_simdgroup;
    uint sid = simdgroup_index_in_threadgroup;
    threadgroup float buf[32];
    threadgroup float parts[1024];
    const device float* x = logits + (ulong)row * V;
    uint chunk = (V + 1023) / 1024;
    uint lo_i = min(lid * chunk, (uint)V), hi_i = min(lo_i + chunk, (uint)V);

    float m = -INFINITY;
    for (uint i = lo_i; i < hi_i; ++i) m = max(m, x[i]);
    m = tg_max(m, buf, lid, sid, lane);
    long top = key_of(m);
    long none = -2147483649L;

    long k = (long)top_k[row];
    long kth = none, kcut = (long)V;
    if (k > 0 && k < (long)V) {
        long lo = none + 1, hi = top;  // the kth key: largest t with #key >= t >= k
        while (lo < hi) {
            long mid = lo + (hi - lo + 1) / 2;
            float c = tg_sum(measure(x, lo_i, hi_i, 0, mid, m, kth, kcut, none), buf, lid, sid, lane);
            if (c >= (float)k) lo = mid; else hi = mid - 1;
        }
        kth = lo;
        float need = (float)k - tg_sum(measure(x, lo_i, hi_i, 0, kth + 1, m, kth, kcut, none), buf, lid, sid, lane);
        long jlo = 0, jhi = (long)V;  // largest j with #(tie, id < j) < need; the cut is j + 1
        while (jlo < jhi) {
            long mid = jlo + (jhi - jlo + 1) / 2;
            float c = tg_sum(measure(x, lo_i, hi_i, 1, mid, m, kth, kcut, none), buf, lid, sid, lane);
            if (c < need) jlo = mid; else jhi = mid - 1;
        }
        kcut = jlo + 1;
    }

    float p = top_p[row];
    long tau = none, pcut = (long)V;
    if (p < 1.0f) {
        float target = p * tg_sum(measure(x, lo_i, hi_i, 2, none, m, kth, kcut, none), buf, lid, sid, lane);
        long lo = none, hi = top;  // largest t with top-k mass above t >= target; the cut is t + 1
        while (lo < hi) {
            long mid = lo + (hi - lo + 1) / 2;
            float mass = tg_sum(measure(x, lo_i, hi_i, 2, mid, m, kth, kcut, none), buf, lid, sid, lane);
            if (mass >= target) lo = mid; else hi = mid - 1;
        }
        tau = lo + 1;
        float above = tg_sum(measure(x, lo_i, hi_i, 2, tau, m, kth, kcut, none), buf, lid, sid, lane);
        float need = max(ceil((target - above) / exp(value_of(tau) - m)), 1.0f);
        long jlo = 0, jhi = (long)V;
        while (jlo < jhi) {
            long mid = jlo + (jhi - jlo + 1) / 2;
            float c = tg_sum(measure(x, lo_i, hi_i, 3, mid, m, kth, kcut, tau), buf, lid, sid, lane);
            if (c < need) jlo = mid; else jhi = mid - 1;
        }
        pcut = jlo + 1;
    }

    float mp = min_p[row];
    long floor_key = mp > 0.0f ? key_of(m + log(mp)) : none;
    float inv_t = 1.0f / temperature[row];
    float part = 0.0f;
    for (uint i = lo_i; i < hi_i; ++i) {
        if (kept_at(key_of(x[i]), i, kth, kcut, tau, pcut, floor_key)) part += exp((x[i] - m) * inv_t);
    }
    parts[lid] = part;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lid == 0) {  // the chunks in id order, then one chunk token by token
        float total = 0.0f;
        for (uint t = 0; t < 1024; ++t) total += parts[t];
        float target = u[row] * total;
        float run = 0.0f;
        int found = -1;
        uint last_chunk = 0;
        for (uint t = 0; t < 1024 && found < 0; ++t) {
            if (parts[t] <= 0.0f) continue;
            last_chunk = t;
            if (run + parts[t] <= target) { run += parts[t]; continue; }
            uint a = min(t * chunk, (uint)V), b = min(a + chunk, (uint)V);
            for (uint i = a; i < b; ++i) {
                if (!kept_at(key_of(x[i]), i, kth, kcut, tau, pcut, floor_key)) continue;
                float w = exp((x[i] - m) * inv_t);
                if (w > 0.0f && run + w > target) { found = (int)i; break; }
                run += w;
            }
        }
        if (found < 0) {  // u * total rounded up to the total: the last token with any weight
            uint a = min(last_chunk * chunk, (uint)V), b = min(a + chunk, (uint)V);
            for (uint i = a; i < b; ++i) {
                if (kept_at(key_of(x[i]), i, kth, kcut, tau, pcut, floor_key) && exp((x[i] - m) * inv_t) > 0.0f) {
                    found = (int)i;
                }
            }
        }
        out[row] = found;
    }
"""


class MetalSampler:
    """The kernel, built once; call it with ``mx.array``s: float32 ``logits [rows, V]``, and per row
    ``u`` (uniform in [0, 1)), ``top_k`` (int32), ``top_p``, ``min_p``, ``temperature`` (> 0).
    Returns int32 token ids ``[rows]``."""

    def __init__(self) -> None:
        import mlx.core as mx

        self._mx = mx
        self._kernel: Any = mx.fast.metal_kernel(
            name="edgeserve_sample",
            input_names=["logits", "u", "top_k", "top_p", "min_p", "temperature"],
            output_names=["out"],
            header=_HEADER,
            source=_SOURCE,
        )

    def __call__(self, logits: Any, u: Any, top_k: Any, top_p: Any, min_p: Any, temperature: Any) -> Any:
        mx = self._mx
        rows, vocab = logits.shape
        (out,) = self._kernel(
            inputs=[logits, u, top_k, top_p, min_p, temperature],
            template=[("V", vocab)],
            grid=(rows * THREADS, 1, 1),
            threadgroup=(THREADS, 1, 1),
            output_shapes=[(rows,)],
            output_dtypes=[mx.int32],
        )
        return out
