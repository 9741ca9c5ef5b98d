"""edgeserve's own hot paths as kernels: token sampling and KV quantize/pack.

One small module per kernel, with its reference beside it:

    sampling   sample_ref (NumPy float64, the definition) | sample_cpu (fused NumPy, no sort)
               | sample_triton (CUDA) | sample_metal (Apple GPU)
    KV pack    kvpack (NumPy, the definition and the wire format) | kvpack_triton (CUDA)
               | cuda/kvpack.cu (PTX for a CUDA loader) | kvpack_metal (Apple GPU)

``describe()`` says which implementation each kernel picks on this machine (``edgeserve info``
prints it). It looks for the GPU stacks without importing them (torch alone takes seconds).
"""

from __future__ import annotations

import importlib.util


def describe(cuda: bool | None = None, metal: bool | None = None) -> dict[str, str]:
    """Kernel name -> the implementation picked here, and what the GPU paths would need."""
    if cuda is None or metal is None:
        from edgeserve.hardware import probe

        hw = probe()
        cuda = hw.cuda if cuda is None else cuda
        metal = hw.metal if metal is None else metal
    triton = _installed("triton") and _installed("torch")
    mlx = _installed("mlx")
    if cuda and triton:
        kvpack = "triton"
    elif metal and mlx:
        kvpack = "metal"
    else:
        kvpack = "numpy"
    return {
        # The backends that sample in Python hand the sampler a NumPy row on the host.
        "sample": "numpy-fused",
        "kvpack": kvpack,
        "triton": ("ready" if cuda else "installed, no CUDA device") if triton else "not installed",
        "metal": ("ready" if metal else "mlx installed, no Metal device") if mlx else "mlx not installed",
    }


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
