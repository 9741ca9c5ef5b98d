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
    """Rows of 3,000 logits (interpreted Triton is slow); combinations of the cuts at once,
    row by row. The kept set is the reference's; the draw is the reference's inverse CDF up to
    float32 (a boundary within float32 rounding of u may move one token)."""
    from edgeserve.kernels import sample_ref, sample_triton

    rng = np.random.default_rng(3)
    vocab = 3000
    combos = [(40, 1.0, 0.0, 0.8), (0, 0.9, 0.0, 1.0), (40, 0.95, 0.0, 0.7), (0, 1.0, 0.05, 1.0), (100, 0.8, 0.02, 1.3)]
    combos += [(5, 1.0, 0.0, 1.0), (1, 1.0, 0.0, 1.0), (0, 0.0, 0.0, 1.0)]  # ties at the k cut; greedy; top_p 0
    logits = (rng.normal(0, 1.5, (len(combos), vocab)) + rng.gumbel(0, 0.7, (len(combos), vocab))).astype(np.float32)
    logits[1, ::7] = -np.inf  # a constraint's mask
    logits[2, [5, 17, 900]] = logits[2].max()  # ties at the top
    logits[5, [3, 70, 800, 2999]] = np.sort(logits[5])[-4]  # five ties at the 4th place: top-k 5 takes two
    u = rng.random(len(combos)).astype(np.float32)
    columns = [np.array(column) for column in zip(*combos, strict=True)]
    k, p, mp, t = columns[0].astype(np.int32), *(c.astype(np.float32) for c in columns[1:])
    kept = torch.zeros((len(combos), vocab), dtype=torch.int8, device=DEVICE)
    tensors = [torch.from_numpy(a).to(DEVICE) for a in (logits, u, k, p, mp, t)]
    # 512-logit chunks: 6 programs per row, so the cross-chunk sums and the draw's hand-over run.
    tokens = sample_triton.sample(*tensors, kept=kept, chunk=512).cpu().numpy()
    for row, combo in enumerate(combos):
        ids, probs = sample_ref.distribution(logits[row], *combo)
        assert np.flatnonzero(kept[row].cpu().numpy()).tolist() == ids.tolist(), combo
        assert ids.size > 1 or combo[0] == 1 or combo[1] == 0, "each row should keep a real choice"
        assert tokens[row] == sample_ref.draw(ids, probs, float(u[row])), combo


# Every kernel's signature for a GPU compile: pointers typed as the wrappers pass them, scalars i32.
_F32, _I64, _I32 = "*fp32", "*i64", "*i32"
_COMPILE_SCRIPT = """
import importlib.util, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
modules = {}
for name in ("kvpack_triton", "sample_triton"):  # by path: edgeserve/__init__ needs the whole install
    spec = importlib.util.spec_from_file_location(name, f"edgeserve/kernels/{name}.py")
    modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[name])
for module, name, signature, constexprs in CASES:
    fn = getattr(modules[module], name)
    signature = {**signature, **{c: "constexpr" for c in constexprs}}
    try:
        triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    except Exception as exc:  # reported with the case, then the test fails
        print(f"FAILED {name} {constexprs}: {type(exc).__name__}: {exc}")
        sys.exit(1)
print("compiled", len(CASES))
"""


def _compile_cases() -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
    sizes = {"V": "i32", "NB": "i32"}
    chunk = {"CHUNK": 2048, "NBP": 128}
    search = {"FANOUT": 128, "NB_STEP": 16, **chunk}
    state = {"st_in": _I64, "st_out": _I64, "sf_ptr": _F32, "top_k_ptr": _I32, "top_p_ptr": _F32, "part_in": _F32,
             "aux_in": _F32}  # fmt: skip
    cases: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
        ("kvpack_triton", "_quantize_kernel", {"x_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": _F32, "head_dim": "i32"},
         {"BLOCK": 256}),
        ("kvpack_triton", "_dequantize_kernel", {"q_ptr": "*i8", "s_ptr": _F32, "out_ptr": "*fp16", "head_dim": "i32"},
         {"BLOCK": 128}),
        ("sample_triton", "_max_kernel", {"logits_ptr": _F32, "pmax_ptr": _F32, "st_ptr": _I64, **sizes},
         {"CHUNK": 2048, "BLOCK": 128}),
        ("sample_triton", "_draw_kernel", {"logits_ptr": _F32, "pmax_ptr": _F32, "st_ptr": _I64, "u_ptr": _F32,
         "min_p_ptr": _F32, "temp_ptr": _F32, "z_ptr": _F32, "found_ptr": _I32, **sizes}, {"BLOCK": 128, **chunk}),
        ("sample_triton", "_pick_kernel", {"found_ptr": _I32, "last_ptr": _I32, "out_ptr": _I32, **sizes},
         {"NBP": 128}),
    ]  # fmt: skip
    mass = {"logits_ptr": _F32, "pmax_ptr": _F32, **state, "min_p_ptr": _F32, "temp_ptr": _F32, "z_ptr": _F32,
            "last_ptr": _I32, "kept_ptr": "*i8", **sizes}  # fmt: skip
    step = {"logits_ptr": _F32, "pmax_ptr": _F32, **state, "part_out": _F32, "aux_out": _F32, **sizes}
    for prev in (-1, 3):  # no search; after top-p's last round
        cases.append(
            ("sample_triton", "_mass_kernel", mass, {"PREV": prev, "WRITE_KEPT": True, "BLOCK": 128, **search})
        )
    for mode in range(4):  # every search measured and narrowed, a first round and a later one
        rounds = {"PREV": mode - 1, "PREV_LAST": mode % 2 == 0, "MODE": mode, "FIRST": mode % 2 == 0}
        cases.append(("sample_triton", "_step_kernel", step, {**rounds, "BLOCK": 32, **search}))
        cases.append(("sample_triton", "_step_kernel", step, {**rounds, "PREV": mode, "PREV_LAST": False,
                      "FIRST": False, "BLOCK": 32, **search}))  # fmt: skip
    return cases


def test_triton_kernels_compile_for_a_cuda_gpu(tmp_path: Any) -> None:
    """Triton's compiler (not its interpreter, which the tests above use here) on every kernel, down
    to a cubin for sm_90 with the ptxas that triton's wheel ships: the interpreter accepts code that
    no GPU build does (``typing.Any`` annotations, non-constexpr globals, float64 literals), and those
    bugs were only found on a GPU. A fresh process, since the interpreter is chosen at import."""
    import subprocess
    import sys
    from pathlib import Path

    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not any((bin_dir / name).exists() for name in ("ptxas", "ptxas-blackwell")) and not os.environ.get(
        "TRITON_PTXAS_PATH"
    ):
        pytest.skip(f"no ptxas in {bin_dir} (triton's wheel usually ships one) and TRITON_PTXAS_PATH is unset")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cached one
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences triton 3.9's notice
    script = f"CASES = {_compile_cases()!r}\n{_COMPILE_SCRIPT}"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"compiled {len(_compile_cases())}" in proc.stdout
