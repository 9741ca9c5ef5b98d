"""Sampling settings the kernel benchmarks share (``bench/kernels.py`` on the CPU,
``bench/kernels_gpu.py`` on a GPU), so both report the same settings under the same names. No
imports beyond the standard library: the GPU machine runs without edgeserve's dependencies."""

from __future__ import annotations

#: (top_k, top_p, min_p, temperature)
Combo = tuple[int, float, float, float]

#: The cuts both benchmarks time; each adds its own greedy form (and the GPU one a combined case).
CUTS: dict[str, Combo] = {
    "top_k 40": (40, 1.0, 0.0, 0.8),
    "top_p 0.95 (top_k 0)": (0, 0.95, 0.0, 0.8),
    "defaults (top_k 40, top_p 0.95)": (40, 0.95, 0.0, 0.8),
    "min_p 0.05 (top_k 0)": (0, 1.0, 0.05, 0.8),
    "no cut (top_k 0, top_p 1)": (0, 1.0, 0.0, 0.8),
    "top_p 0.99 (top_k 0)": (0, 0.99, 0.0, 1.0),
}
