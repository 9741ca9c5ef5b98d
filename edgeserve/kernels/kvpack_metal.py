"""KV int8 quantize/dequantize as Metal kernels (``mx.fast.metal_kernel``), the device side of the handoff.

The rule is the NumPy reference's (``kvpack``): one float32 scale per (token, head) row,
``max|row| / 127``; ``q = rint(row / scale)`` (ties to even) clipped to +-127; a zero row gives
scale 0 and q 0. One simdgroup (32 threads) per row, the row's max by ``simd_max``. The quotient
is float32, so ``q`` may differ from the reference's by one at a near-tie, as in Triton and CUDA.

``MetalKVPack()`` builds both kernels once; keep the object and call it for every block (MLX
caches the compiled pipeline per template, i.e. per dtype). Needs Apple silicon (macOS, Metal).
"""

from __future__ import annotations

from typing import Any

_QUANTIZE = """
    uint row = threadgroup_position_in_grid.x;
    uint lane = thread_position_in_threadgroup.x;
    uint D = x_shape[2];
    float amax = 0.0f;
    for (uint i = lane; i < D; i += 32) {
        amax = max(amax, fabs(float(x[row * D + i])));
    }
    amax = simd_max(amax);
    float scale = amax / 127.0f;
    for (uint i = lane; i < D; i += 32) {
        float r = scale > 0.0f ? clamp(rint(float(x[row * D + i]) / scale), -127.0f, 127.0f) : 0.0f;
        q[row * D + i] = int8_t(r);
    }
    if (lane == 0) {
        scales[row] = scale;
    }
"""

_DEQUANTIZE = """
    uint i = thread_position_in_grid.x;
    uint D = q_shape[2];
    out[i] = T(float(q[i]) * scales[i / D]);
"""


class MetalKVPack:
    """The two kernels, built once; ``quantize``/``dequantize`` take and return ``mx.array``s."""

    def __init__(self) -> None:
        import mlx.core as mx

        self._mx = mx
        self._quantize: Any = mx.fast.metal_kernel(
            name="edgeserve_kv_quantize", input_names=["x"], output_names=["q", "scales"], source=_QUANTIZE
        )
        self._dequantize: Any = mx.fast.metal_kernel(
            name="edgeserve_kv_dequantize", input_names=["q", "scales"], output_names=["out"], source=_DEQUANTIZE
        )

    def quantize(self, x: Any) -> tuple[Any, Any]:
        """float16/float32/bfloat16 ``x [tokens, heads, head_dim]`` -> (q int8, float32 scales ``[tokens, heads]``)."""
        mx = self._mx
        tokens, heads, _ = x.shape
        q, scales = self._quantize(
            inputs=[x],
            grid=(tokens * heads * 32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[x.shape, (tokens, heads)],
            output_dtypes=[mx.int8, mx.float32],
        )
        return q, scales

    def dequantize(self, q: Any, scales: Any, dtype: Any = None) -> Any:
        """``q * scale`` per row, an ``mx.array`` of ``dtype`` (float16 by default)."""
        mx = self._mx
        dtype = dtype or mx.float16
        (out,) = self._dequantize(
            inputs=[q, scales],
            template=[("T", dtype)],
            grid=(q.size, 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[q.shape],
            output_dtypes=[dtype],
        )
        return out
