"""KV blocks to int8 with one scale per token and head, packed for the wire, and back (NumPy reference).

This is the reference every other KV-pack kernel (Triton, CUDA, Metal) is tested against, and the
fallback where none of them runs. Layout: ``x`` is ``[tokens, heads, head_dim]``; each
``(token, head)`` row gets a symmetric scale ``s = max|row| / 127`` (float32) and
``q = round(row / s)`` (int8 in ``[-127, 127]``; -128 is never used, so negation is closed).

Error bound, exact (``tests/test_kernels_kvpack.py`` checks it with no tolerance):

    |x - q * s| <= s / 2      for every element, with q * s and the difference taken in float64

because ``q`` is the nearest integer to ``x / s``: the quotient is formed in float64, where its
rounding error (<= 127 * 2**-53) is far below the smallest distance (2**-27) a float32 quotient
that is not itself a tie can lie from a half-integer, and the clip to +-127 costs at most
``max|row| * 2**-24`` when ``s`` rounds down. ``dequantize`` to float16/float32 then rounds
``q * s`` once more (half an ulp of that type). A row whose ``max|row| / 127`` underflows float32
(below about 1.8e-43: never seen in a KV cache) is stored as zeros.

Wire format (little-endian), self-describing:

    magic b"EKV8" | version u8 = 1 | 3 reserved bytes | tokens u32 | heads u32 | head_dim u32
    | scales float32[tokens, heads] | q int8[tokens, heads, head_dim]
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from edgeserve.errors import KVStateError

MAGIC = b"EKV8"
VERSION = 1
_HEADER = struct.Struct("<4sB3xIII")
#: The largest magnitude of a quantized value (symmetric: -127..127).
QMAX = 127
#: Tokens per step of quantize/dequantize.
_CHUNK = 32

Array = np.ndarray[Any, Any]


def scales_of(x: Array) -> Array:
    """The per-(token, head) scales, float32 ``[tokens, heads]``: ``max|row| / 127``."""
    amax = np.max(np.abs(x.astype(np.float32, copy=False)), axis=-1)
    scales: Array = (amax / np.float32(QMAX)).astype(np.float32)
    return scales


def quantize(x: Array) -> tuple[Array, Array]:
    """float16/float32 ``x [tokens, heads, head_dim]`` -> (q int8 of that shape, float32 scales ``[tokens, heads]``)."""
    if x.ndim != 3 or x.dtype not in (np.float16, np.float32):
        raise KVStateError(f"KV quantize wants float16/float32 [tokens, heads, head_dim], got {x.dtype} {x.shape}")
    q = np.empty(x.shape, dtype=np.int8)
    scales = np.empty(x.shape[:2], dtype=np.float32)
    for t in range(0, x.shape[0], _CHUNK):  # a few hundred KB at a time: the float64 pass stays in cache
        chunk = x[t : t + _CHUNK].astype(np.float32)
        s = scales_of(chunk)
        if not np.isfinite(s).all():  # max|row| is inf or NaN if any element is
            raise KVStateError("KV block holds inf or NaN: it cannot be quantized")
        scales[t : t + _CHUNK] = s
        # A zero (or underflowed) scale divides by 1: its row is 0 (or < 1e-43) and rounds to 0.
        y = chunk.astype(np.float64)
        y /= np.where(s > 0, s, np.float32(1)).astype(np.float64)[..., None]
        np.rint(y, out=y)
        np.clip(y, -QMAX, QMAX, out=y)
        q[t : t + _CHUNK] = y
    return q, scales


def dequantize(q: Array, scales: Array, dtype: Any = np.float16) -> Array:
    """``q * scale`` per row, in ``dtype`` (float16 by default, the KV caches' own type)."""
    _check_pair(q, scales)
    out = np.empty(q.shape, dtype=dtype)
    for t in range(0, q.shape[0], _CHUNK):
        y = q[t : t + _CHUNK].astype(np.float64)
        y *= scales[t : t + _CHUNK].astype(np.float64)[..., None]
        out[t : t + _CHUNK] = y
    return out


def pack(q: Array, scales: Array) -> bytes:
    """One self-describing little-endian blob (see the module docstring for the layout)."""
    _check_pair(q, scales)
    tokens, heads, head_dim = q.shape
    header = _HEADER.pack(MAGIC, VERSION, tokens, heads, head_dim)
    return b"".join(
        (header, np.ascontiguousarray(scales, dtype="<f4").tobytes(), np.ascontiguousarray(q, dtype=np.int8).tobytes())
    )


def unpack(data: bytes) -> tuple[Array, Array]:
    """The inverse of ``pack``: (q int8 ``[tokens, heads, head_dim]``, scales float32 ``[tokens, heads]``).

    Raises ``KVStateError`` for a blob that is not one (wrong magic or version, wrong length)."""
    if len(data) < _HEADER.size:
        raise KVStateError(f"KV pack blob too short: {len(data)} bytes, the header alone is {_HEADER.size}")
    magic, version, tokens, heads, head_dim = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise KVStateError(f"not a KV pack blob (magic {magic!r}, version {version}; want {MAGIC!r} v{VERSION})")
    n_scales, n_q = tokens * heads, tokens * heads * head_dim
    if len(data) != _HEADER.size + 4 * n_scales + n_q:
        raise KVStateError(
            f"KV pack blob of {len(data)} bytes does not match its shape [{tokens}, {heads}, {head_dim}]"
        )
    scales = np.frombuffer(data, dtype="<f4", count=n_scales, offset=_HEADER.size).astype(np.float32)
    q = np.frombuffer(data, dtype=np.int8, count=n_q, offset=_HEADER.size + 4 * n_scales)
    return q.reshape(tokens, heads, head_dim).copy(), scales.reshape(tokens, heads)


def _check_pair(q: Array, scales: Array) -> None:
    if q.ndim != 3 or q.dtype != np.int8 or scales.shape != q.shape[:2]:
        raise KVStateError(
            f"q int8 [tokens, heads, head_dim] and scales [tokens, heads] expected, got {q.shape}, {scales.shape}"
        )
