"""The CUDA sources compile to PTX with the machine's nvcc (no GPU needed); skipped, with the
reason, where nvcc is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import edgeserve.kernels

CUDA_DIR = Path(edgeserve.kernels.__file__).parent / "cuda"
NVCC = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: the CUDA sources cannot be compiled here")
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_kvpack_cu_compiles_to_ptx(tmp_path: Path, arch: str) -> None:
    assert NVCC is not None
    out = tmp_path / "kvpack.ptx"
    source = CUDA_DIR / "kvpack.cu"
    subprocess.run([NVCC, "-ptx", f"-arch={arch}", str(source), "-o", str(out)], check=True, timeout=120)
    ptx = out.read_text()
    assert f".target {arch}" in ptx
    for entry in ("kv_quantize_f16", "kv_dequantize_f16"):  # extern "C": unmangled names a loader can find
        assert f".entry {entry}(" in ptx
