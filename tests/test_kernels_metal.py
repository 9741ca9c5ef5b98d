"""The Metal kernels (mx.fast.metal_kernel) against their NumPy references. They need Apple
silicon: skipped elsewhere, with the reason printed (``pytest -rs``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgeserve.kernels import kvpack, sample_ref


def _metal_reason() -> str | None:
    if sys.platform != "darwin":
        return f"Metal kernels run on macOS only (this is {sys.platform})"
    try:
        import mlx.core as mx
    except ImportError:
        return "mlx is not installed (the mlx extra brings it)"
    return None if mx.metal.is_available() else "mlx reports no Metal device"


REASON = _metal_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def test_metal_kvpack_matches_the_reference() -> None:
    import mlx.core as mx

    from edgeserve.kernels.kvpack_metal import MetalKVPack

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 3, 256)) * rng.uniform(1e-3, 30, (7, 3, 1))).astype(np.float16)
    x[0, 0] = 0
    pack = MetalKVPack()  # built once, used twice
    for block in (x, x[:2]):
        q, s = pack.quantize(mx.array(block))
        q, s = np.array(q), np.array(s)
        q_ref, s_ref = kvpack.quantize(block)
        assert np.array_equal(s, s_ref) and np.abs(q.astype(int) - q_ref).max() <= 1
        err = np.abs(block.astype(np.float64) - q * s.astype(np.float64)[..., None])
        assert (err <= s[..., None] * (0.5 + 2.0**-16)).all()
        deq = np.array(pack.dequantize(mx.array(q_ref), mx.array(s_ref)))
        want = kvpack.dequantize(q_ref, s_ref)
        assert (np.abs(deq.astype(np.float64) - want) <= np.spacing(np.abs(want))).all()


def test_metal_sampler_keeps_the_reference_set() -> None:
    import mlx.core as mx

    from edgeserve.kernels.sample_metal import MetalSampler

    rng = np.random.default_rng(3)
    vocab = 50_000
    combos = [(40, 1.0, 0.0, 0.8), (0, 0.9, 0.0, 1.0), (40, 0.95, 0.0, 0.7), (0, 1.0, 0.05, 1.0), (100, 0.8, 0.02, 1.3)]
    logits = (rng.normal(0, 1.5, (len(combos), vocab)) + rng.gumbel(0, 0.7, (len(combos), vocab))).astype(np.float32)
    sampler = MetalSampler()
    columns = [np.array(column) for column in zip(*combos, strict=True)]
    for trial in range(20):
        u = rng.random(len(combos)).astype(np.float32)
        args = [mx.array(columns[0].astype(np.int32)), *(mx.array(c.astype(np.float32)) for c in columns[1:])]
        tokens = np.array(sampler(mx.array(logits), mx.array(u), *args))
        for row, combo in enumerate(combos):
            ids, probs = sample_ref.distribution(logits[row], *combo)
            assert tokens[row] in set(ids.tolist()), (trial, combo)
            if trial == 0:  # the same uniform, the same token (float32 sums: one may move at a boundary)
                assert tokens[row] == sample_ref.draw(ids, probs, float(u[row])), combo
