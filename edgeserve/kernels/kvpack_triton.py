"""KV int8 quantize/dequantize in Triton (the CUDA side of the handoff), one program per (token, head) row.

Same layout and rule as the NumPy reference (``kvpack``): ``scale = max|row| / 127`` in float32,
``q = round-half-to-even(row / scale)`` clipped to +-127, zero rows give scale 0 and q 0. The
quotient is taken in float32 here (float64 in the reference), so ``q`` may differ from the
reference's by one where ``row / scale`` lies within 2**-24 * 127 of a half-integer; the error bound
becomes ``|x - q * s| <= s * (1/2 + 2**-16)``. ``pack``/``unpack`` of the result are the
reference's (the wire format is one).

Needs ``torch`` and ``triton``: on a CPU, ``TRITON_INTERPRET=1`` runs these kernels on CPU
tensors (the tests do); otherwise they need a CUDA device.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


# Kernel parameters are annotated ``tl.tensor``: Triton's compiler (not its interpreter) looks every
# annotation up as a global and refuses ``typing.Any``, so ``Any`` here failed every GPU compile.
@triton.jit
def _quantize_kernel(
    x_ptr: tl.tensor, q_ptr: tl.tensor, s_ptr: tl.tensor, head_dim: tl.tensor, BLOCK: tl.constexpr
) -> None:
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < head_dim
    x = tl.load(x_ptr + row * head_dim + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    # div_rn: a plain "/" compiles to div.approx/div.full.f32 on a GPU (up to 2 ulp off; the
    # interpreter divides exactly), so scales would not equal the reference's max / 127 bit for bit.
    scale = tl.div_rn(amax, 127.0)
    safe = tl.where(scale > 0, scale, 1.0)
    v = tl.div_rn(x, safe)
    f = tl.floor(v)
    d = v - f
    even = (f - 2.0 * tl.floor(f * 0.5)) == 0.0
    r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(even, f, f + 1.0)))
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    r = tl.where(scale > 0, r, 0.0)
    tl.store(q_ptr + row * head_dim + offs, r.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _dequantize_kernel(
    q_ptr: tl.tensor, s_ptr: tl.tensor, out_ptr: tl.tensor, head_dim: tl.tensor, BLOCK: tl.constexpr
) -> None:
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < head_dim
    q = tl.load(q_ptr + row * head_dim + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(s_ptr + row)
    tl.store(out_ptr + row * head_dim + offs, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)


def quantize(x: Any) -> tuple[Any, Any]:
    """``x``: a torch float16/float32/bfloat16 tensor ``[tokens, heads, head_dim]`` -> (q int8, scales float32)."""
    import torch

    tokens, heads, head_dim = x.shape
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty((tokens, heads), dtype=torch.float32, device=x.device)
    if x.numel():
        _quantize_kernel[(tokens * heads,)](x, q, scales, head_dim, BLOCK=triton.next_power_of_2(head_dim))
    return q, scales


def dequantize(q: Any, scales: Any, dtype: Any = None) -> Any:
    """``q * scale`` per row as a torch tensor of ``dtype`` (float16 by default)."""
    import torch

    tokens, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=dtype or torch.float16, device=q.device)
    if q.numel():
        grid = (tokens * heads,)
        _dequantize_kernel[grid](
            q.contiguous(), scales.contiguous(), out, head_dim, BLOCK=triton.next_power_of_2(head_dim)
        )
    return out
