"""KV int8 quantize/pack reference: the exact error bound, the wire round trip, bad blobs."""

from __future__ import annotations

import numpy as np
import pytest

from edgeserve.errors import KVStateError
from edgeserve.kernels import kvpack


def _block(dtype: type, seed: int = 0, shape: tuple[int, int, int] = (37, 4, 256)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(1e-3, 30, size=(*shape[:2], 1))
    x[3, 1] = 0.0  # an all-zero row: scale 0, q 0, no division by zero
    x[5, 2, 7] = 65000.0 if dtype == np.float16 else 3e9  # one outlier sets its row's scale
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_quantize_error_is_at_most_half_a_scale_exactly(dtype: type) -> None:
    x = _block(dtype)
    q, scales = kvpack.quantize(x)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert scales.dtype == np.float32 and scales.shape == x.shape[:2]
    assert np.abs(q).max() <= 127 and q[5, 2, 7] == 127 and (q[3, 1] == 0).all() and scales[3, 1] == 0
    exact = q.astype(np.float64) * scales.astype(np.float64)[..., None]
    err = np.abs(x.astype(np.float64) - exact)
    # No tolerance: the bound holds in exact arithmetic on the stored values.
    assert (err <= scales.astype(np.float64)[..., None] / 2).all()
    # Dequantizing to the cache's own type adds at most half an ulp of q * s in that type on top.
    deq = kvpack.dequantize(q, scales, dtype).astype(np.float64)
    ulp = np.spacing(np.abs(exact).astype(dtype)).astype(np.float64)
    assert (np.abs(deq - exact) <= ulp / 2).all()
    assert np.array_equal(kvpack.dequantize(q, scales, np.float64), exact)


def test_ties_and_the_top_of_the_range() -> None:
    """Values at exact half-steps round to even and a row's largest magnitude maps to +-127."""
    row = np.array([[[-127.0, -2.5, -0.5, 0.5, 1.5, 2.5, 126.5, 127.0]]], dtype=np.float32)
    q, scales = kvpack.quantize(row)
    assert scales[0, 0] == 1.0
    assert q[0, 0].tolist() == [-127, -2, 0, 0, 2, 2, 126, 127]


def test_pack_round_trip_is_lossless_and_self_describing() -> None:
    q, scales = kvpack.quantize(_block(np.float16, seed=1, shape=(9, 3, 64)))
    blob = kvpack.pack(q, scales)
    assert blob[:4] == b"EKV8" and len(blob) == 20 + 9 * 3 * 4 + q.size
    q2, s2 = kvpack.unpack(blob)
    assert np.array_equal(q2, q) and np.array_equal(s2, scales) and q2.flags.writeable
    # Little-endian on the wire whatever the host: the first scale is readable by hand.
    assert np.frombuffer(blob[20:24], dtype="<f4")[0] == scales[0, 0]


def test_empty_block_round_trips() -> None:
    q, scales = kvpack.quantize(np.zeros((0, 2, 8), dtype=np.float16))
    q2, s2 = kvpack.unpack(kvpack.pack(q, scales))
    assert q2.shape == (0, 2, 8) and s2.shape == (0, 2)


@pytest.mark.parametrize(
    "blob",
    [b"", b"EKV8", b"XXXX" + bytes(16), kvpack.pack(*kvpack.quantize(np.ones((2, 1, 4), np.float32)))[:-1]],
    ids=["empty", "short", "magic", "truncated"],
)
def test_bad_blobs_are_refused(blob: bytes) -> None:
    with pytest.raises(KVStateError):
        kvpack.unpack(blob)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(KVStateError):
        kvpack.quantize(np.ones((2, 4), np.float32))
    with pytest.raises(KVStateError):
        kvpack.quantize(np.array([[[1.0, np.inf]]], np.float32))


def test_describe_names_the_implementation_each_kernel_picks() -> None:
    from edgeserve.kernels import describe

    here = describe(cuda=False, metal=False)
    assert here["sample"] == "numpy-fused" and here["kvpack"] == "numpy"
    assert describe(cuda=True, metal=False)["kvpack"] in ("triton", "numpy")  # triton only where it is installed
