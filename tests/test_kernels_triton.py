"""The Triton kernels against their NumPy references, run by Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``) where there is no CUDA device; skipped, with the reason, without
triton or torch."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from edgeserve.kernels import kvpack

torch = pytest.importorskip("torch", reason="torch is not installed (the kernels extra brings it)")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, below
pytest.importorskip("triton", reason="triton is not installed (the kernels extra brings it)")

from edgeserve.kernels import kvpack_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(shape: tuple[int, int, int], seed: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(1e-3, 30, size=(*shape[:2], 1))
    x[0, 0] = 0.0  # a zero row
    return x.astype(np.float16)


@pytest.mark.parametrize("shape", [(6, 2, 256), (3, 4, 80)], ids=["pow2", "ragged"])
def test_triton_kvpack_matches_the_reference(shape: tuple[int, int, int]) -> None:
    x = _block(shape, seed=shape[2])
    q_ref, s_ref = kvpack.quantize(x)
    q, s = kvpack_triton.quantize(torch.from_numpy(x).to(DEVICE))
    q, s = q.cpu().numpy(), s.cpu().numpy()
    assert np.array_equal(s, s_ref)  # the same float32 max / 127
    # The quotient is float32 here: at most one step apart, and only at a near-tie.
    assert np.abs(q.astype(int) - q_ref).max() <= 1 and np.mean(q != q_ref) < 1e-3
    err = np.abs(x.astype(np.float64) - q * s.astype(np.float64)[..., None])
    assert (err <= s[..., None] * (0.5 + 2.0**-16)).all()
    deq = kvpack_triton.dequantize(torch.from_numpy(q_ref).to(DEVICE), torch.from_numpy(s_ref).to(DEVICE))
    want = kvpack.dequantize(q_ref, s_ref)  # float64 q * s rounded once; float32 here, then float16
    assert (np.abs(deq.cpu().numpy().astype(np.float64) - want) <= np.spacing(np.abs(want))).all()
    # The wire format is the reference's: a Triton-made block unpacks to itself.
    q2, s2 = kvpack.unpack(kvpack.pack(q, s))
    assert np.array_equal(q2, q) and np.array_equal(s2, s)


def test_triton_sampler_keeps_the_reference_set_and_draws_from_it() -> None:
    """Rows of 3,000 logits (interpreted Triton is slow); every combination of the cuts at once,
    row by row. The kept set is the reference's; the draw is the reference's inverse CDF up to
    float32 (a boundary within float32 rounding of u may move one token)."""
    from edgeserve.kernels import sample_ref, sample_triton

    rng = np.random.default_rng(3)
    vocab = 3000
    combos = [(40, 1.0, 0.0, 0.8), (0, 0.9, 0.0, 1.0), (40, 0.95, 0.0, 0.7), (0, 1.0, 0.05, 1.0), (100, 0.8, 0.02, 1.3)]
    logits = (rng.normal(0, 1.5, (len(combos), vocab)) + rng.gumbel(0, 0.7, (len(combos), vocab))).astype(np.float32)
    logits[1, ::7] = -np.inf  # a constraint's mask
    logits[2, [5, 17, 900]] = logits[2].max()  # ties at the top
    u = rng.random(len(combos)).astype(np.float32)
    columns = [np.array(column) for column in zip(*combos, strict=True)]
    k, p, mp, t = columns[0].astype(np.int32), *(c.astype(np.float32) for c in columns[1:])
    kept = torch.zeros((len(combos), vocab), dtype=torch.int8, device=DEVICE)
    tensors = [torch.from_numpy(a).to(DEVICE) for a in (logits, u, k, p, mp, t)]
    tokens = sample_triton.sample(*tensors, kept=kept).cpu().numpy()
    for row, combo in enumerate(combos):
        ids, probs = sample_ref.distribution(logits[row], *combo)
        assert np.flatnonzero(kept[row].cpu().numpy()).tolist() == ids.tolist(), combo
        assert ids.size > 1 or combo[0] == 1, "each row should keep a real choice"
        assert tokens[row] == sample_ref.draw(ids, probs, float(u[row])), combo
