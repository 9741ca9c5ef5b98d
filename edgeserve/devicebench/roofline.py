"""The memory-bandwidth roofline of batch-1 decode: every generated token reads every weight the
step touches and the KV cache once, so a device that streams ``B`` bytes a second cannot decode
faster than ``B / (weight bytes + KV bytes)`` tokens a second, whatever the kernels do.

Bandwidth is measured here, with NumPy on the CPU: a read-only reduction (``max``) over a buffer
far larger than any CPU cache, split over 1..N threads (NumPy releases the GIL in reductions),
best of a few repeats. Device memory (CUDA, Metal) is not measured by this build: it would need a
GPU library the base install does not carry, and a CPU figure would be the wrong ceiling there.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Large against every CPU cache (tens of MiB), and about the size of the default model's weights.
BUFFER_BYTES = 256 << 20
#: Files that hold weights in a converted folder (MLX/HF safetensors, ONNX and its external data).
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".bin", ".npz", ".gguf")
GPU_BANDWIDTH_NOTE = "not measured by this build (device memory needs a GPU library the base install lacks)"


@dataclass(frozen=True)
class Bandwidth:
    """Read and copy bandwidth in GB/s (10^9 bytes) by thread count."""

    read_gbs: dict[int, float]
    copy_gbs: dict[int, float]
    buffer_bytes: int
    repeats: int

    def ceiling(self, threads: int) -> float:
        """The best read bandwidth measured with at most ``threads`` threads: what decode with that
        many threads could stream."""
        usable = [gbs for n, gbs in self.read_gbs.items() if n <= threads] or list(self.read_gbs.values())
        return max(usable)

    def as_json(self) -> dict[str, Any]:
        return {
            "method": "numpy max() (read) and copyto() (read+write, both counted) over a buffer split "
            "across threads, best of repeats",
            "buffer_bytes": self.buffer_bytes,
            "repeats": self.repeats,
            "read_gbs": {str(n): round(v, 2) for n, v in self.read_gbs.items()},
            "copy_gbs": {str(n): round(v, 2) for n, v in self.copy_gbs.items()},
        }


def measure_bandwidth(thread_counts: Sequence[int], *, buffer_bytes: int = BUFFER_BYTES, repeats: int = 7) -> Bandwidth:
    import numpy as np

    src = np.ones(buffer_bytes // 4, dtype=np.float32)  # ones, not empty: every page really mapped
    dst = np.empty_like(src)
    read: dict[int, float] = {}
    copy: dict[int, float] = {}
    for n in sorted(set(thread_counts)):
        parts = list(zip(np.array_split(src, n), np.array_split(dst, n), strict=True))
        with ThreadPoolExecutor(n) as pool:

            def reads(pool: ThreadPoolExecutor = pool, parts: list[Any] = parts) -> None:
                list(pool.map(lambda p: p[0].max(), parts))

            def copies(pool: ThreadPoolExecutor = pool, parts: list[Any] = parts) -> None:
                list(pool.map(lambda p: np.copyto(p[1], p[0]), parts))

            read[n] = src.nbytes / _best(reads, repeats) / 1e9
            copy[n] = 2 * src.nbytes / _best(copies, repeats) / 1e9
    return Bandwidth(read, copy, int(src.nbytes), repeats)


def _best(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm: threads started, pages touched
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class Weights:
    """The weight bytes one decode step reads, and how that figure was obtained."""

    read_per_token: int
    file_bytes: int
    #: Bytes of the output projection (the lm_head), when known: its share of each step.
    output_bytes: int | None
    source: str

    def as_json(self) -> dict[str, Any]:
        return {
            "bytes_read_per_token": self.read_per_token,
            "file_bytes": self.file_bytes,
            "output_layer_bytes": self.output_bytes,
            "source": self.source,
        }


def gguf_weights(path: Path) -> Weights:
    """Tensor data of a GGUF file. A tied embedding (no ``output.weight``, as in Gemma) is read
    whole by the output projection every step; an untied input embedding gives one row a step."""
    sizes, rows = gguf_tensor_bytes(path)
    total = sum(sizes.values())
    embd = sizes.get("token_embd.weight", 0)
    if "output.weight" in sizes:
        read = total - embd + embd // max(rows.get("token_embd.weight", 1), 1)
        return Weights(read, path.stat().st_size, sizes["output.weight"], "gguf tensors (untied output layer)")
    return Weights(total, path.stat().st_size, embd or None, "gguf tensors (output layer tied to the embedding)")


def gguf_tensor_bytes(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, rows) of each tensor, from the header alone. ``gguf.GGUFReader`` would take ~25 s
    here: it parses every metadata value, a 262k-entry vocabulary included, in Python; this skips
    them. Sizes come from each tensor's quantization type (``gguf``'s block table)."""
    import gguf

    from edgeserve.models.convert.archs import skip_gguf_value

    sizes: dict[str, int] = {}
    rows: dict[str, int] = {}
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        for _ in range(n_kv):
            f.seek(struct.unpack("<Q", f.read(8))[0], 1)  # the key
            skip_gguf_value(f, struct.unpack("<I", f.read(4))[0])
        for _ in range(n_tensors):
            name = f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8")
            (n_dims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            kind, _offset = struct.unpack("<IQ", f.read(12))
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            sizes[name] = math.prod(dims) // block * type_size
            rows[name] = dims[-1] if dims else 1
    return sizes, rows


def folder_weights(folder: Path) -> Weights:
    """Weights of a converted folder, tensor by tensor where the format says how a step uses them:
    safetensors (MLX, HF) and ONNX. An input-embedding table that is only gathered from (stored
    apart from the output layer) gives one row a step, not all of it."""
    reads: list[tuple[str, int, int, bool]] = []  # (name, bytes, rows, gathered only)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    onnx_files = [p for p in files if p.suffix == ".onnx"]
    for path in files:
        if path.suffix == ".safetensors":
            reads += _safetensors_tensors(path)
    for path in onnx_files:
        reads += _onnx_initializers(path)
    file_bytes = sum(p.stat().st_size for p in files)
    if not reads:
        return Weights(file_bytes, file_bytes, None, f"weight files in {folder.name} (upper bound)")
    has_head = any("lm_head" in name for name, *_ in reads)
    total, output = 0, 0
    for name, n_bytes, rows, gathered in reads:
        embedding_only = gathered or (has_head and "embed_tokens" in name)
        total += n_bytes // max(rows, 1) if embedding_only else n_bytes
        if "lm_head" in name or (not has_head and "embed_tokens" in name):
            output += n_bytes
    return Weights(total, file_bytes, output or None, f"tensors in {folder.name}")


def _safetensors_tensors(path: Path) -> list[tuple[str, int, int, bool]]:
    """(name, bytes, rows, False) from a safetensors header: 8 bytes of length, then JSON."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [
        (name, int(t["data_offsets"][1]) - int(t["data_offsets"][0]), int((t["shape"] or [1])[0]), False)
        for name, t in header.items()
        if name != "__metadata__"
    ]


def _onnx_initializers(path: Path) -> list[tuple[str, int, int, bool]]:
    """(name, bytes, rows, only gathered from) of an ONNX graph's initializers, external data
    included, read without loading the data (``onnx`` comes with the onnx extra)."""
    try:
        import onnx
    except ImportError:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    others = {i for n in graph.node if n.op_type != "Gather" for i in n.input}
    out = []
    for init in graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        n_bytes = int(ext.get("length", 0)) or len(init.raw_data)
        rows = int(init.dims[0]) if init.dims else 1
        out.append((init.name, n_bytes, rows, init.name in gathered and init.name not in others))
    return out


def roofline_tok_s(bandwidth_gbs: float | None, bytes_per_token: int) -> float | None:
    if bandwidth_gbs is None or bytes_per_token <= 0:
        return None
    return bandwidth_gbs * 1e9 / bytes_per_token
