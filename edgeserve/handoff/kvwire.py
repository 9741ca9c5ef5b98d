"""KV state on the wire: an edgeserve llama.cpp state blob, its f16 K/V tensors quantized to int8 with
one scale per token (``edgeserve.kernels.kvpack``), the rest kept as is, all through zlib.

The blob is ``MAGIC + JSON header line + payload`` (``backends/_common.pack_state``); the payload is
llama.cpp's ``llama_state_seq_get_data``, which for each KV cache (Gemma 3 has two: the global one and
the sliding-window one) reads, in ``llama_kv_cache::state_write`` (little-endian):

    (8 bytes) u32 n_stream; per stream: u32 cell_count; if cell_count:
      meta: cell_count x (i32 pos, u32 n_seq_id, n_seq_id x i32 seq_id)
      u32 v_trans, u32 n_layer
      per layer: i32 k_type, u64 k_row_bytes, cell_count x k_row_bytes       (K rows: one per cell)
      v_trans=0: per layer: i32 v_type, u64 v_row_bytes, cell_count x v_row_bytes
      v_trans=1: per layer: i32 v_type, u32 el_bytes, u32 n_embd_v, n_embd_v x cell_count x el_bytes

f16 tensors (type 1) become records of int8 values plus float32 scales: values with one scale per cell
(token), keys with one per channel (see ``Span.key``); every other byte travels verbatim. A payload
this parser cannot walk to its exact end (another llama.cpp
layout, another backend) travels verbatim too, only compressed: ``encode`` never guesses.

Wire: ``b"EKVW1\\n"`` + zlib stream of records ``u8 kind | u64 length | bytes`` (kind 0: verbatim,
kind 1: an f16 tensor as ``u8 flipped | u32 rows | u32 cols | kvpack blob``, flipped: the kvpack
rows are the stored matrix's columns). The receiver feeds
chunks to ``Decoder`` as they arrive; decompression is incremental, and the restored blob is whole at
the end (llama.cpp loads a sequence's state in one call).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeserve.errors import KVStateError
from edgeserve.kernels import kvpack

WIRE_MAGIC = b"EKVW1\n"
#: The llama.cpp backend's state magic (``backends/llama.STATE_MAGIC``).
LLAMA_MAGIC = b"EDGESERVE-KV2\n"
GGML_TYPE_F16 = 1
_REC = struct.Struct("<BQ")
_TENSOR = struct.Struct("<BII")
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Span:
    """An f16 tensor region of the payload: ``rows x cols`` halves from ``start``; ``transposed``:
    stored as [embedding, cell] (rows are not tokens)."""

    start: int
    rows: int
    cols: int
    transposed: bool
    #: Keys are quantized per channel (one scale per embedding channel across the cells), values per
    #: token: keys carry outlier channels that a per-token scale spreads over every other channel
    #: (KIVI, ICML'24; measured here: per-token keys changed the first greedy token of README text).
    key: bool = False

    @property
    def flip(self) -> bool:
        """Quantize the transposed view: rows of the quantized matrix are channels for keys, tokens for
        values (which a transposed V stores as columns)."""
        return self.transposed != self.key

    @property
    def end(self) -> int:
        return self.start + 2 * self.rows * self.cols


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("past the end")
        self.pos += n


def f16_spans(payload: bytes, start: int = 0) -> list[Span] | None:
    """The f16 K/V tensors of a llama.cpp sequence state, or None where the layout is not the one above.
    llama-cpp-python 0.3.36's build writes 8 more bytes before the first cache; they are tried both
    ways and travel verbatim."""
    for prefix in (0, 8):
        spans = _walk(payload, start + prefix)
        if spans is not None:
            return spans
    return None


def _walk(payload: bytes, start: int) -> list[Span] | None:
    r = _Reader(payload, start)
    spans: list[Span] = []
    try:
        while r.pos < len(payload):
            n_stream = r.take("<I")
            if not 0 < n_stream <= 64:
                return None
            for _ in range(n_stream):
                _stream(r, spans)
    except (ValueError, struct.error):
        return None
    return spans if r.pos == len(payload) else None


def _stream(r: _Reader, spans: list[Span]) -> None:
    cells = r.take("<I")
    if cells == 0:
        return
    for _ in range(cells):
        r.skip(4)
        r.skip(4 * r.take("<I"))
    v_trans, n_layer = r.take("<I"), r.take("<I")
    if v_trans > 1 or not 0 < n_layer <= 1024:
        raise ValueError("not a KV data section")
    for _ in range(n_layer):  # K, then V when not transposed: one row per cell
        _rows(r, spans, cells, key=True)
    for _ in range(n_layer):
        if not v_trans:
            _rows(r, spans, cells, key=False)
            continue
        kind, el, n_embd = r.take("<i"), r.take("<I"), r.take("<I")
        if kind == GGML_TYPE_F16 and el == 2:
            spans.append(Span(r.pos, n_embd, cells, transposed=True))
        r.skip(n_embd * cells * el)


def _rows(r: _Reader, spans: list[Span], cells: int, *, key: bool) -> None:
    kind, row_bytes = r.take("<i"), r.take("<Q")
    if kind == GGML_TYPE_F16 and row_bytes % 2 == 0:
        spans.append(Span(r.pos, cells, row_bytes // 2, transposed=False, key=key))
    r.skip(cells * row_bytes)


def _payload_start(blob: bytes) -> int | None:
    """Where the llama.cpp payload begins (after the magic and the JSON header line), or None."""
    if not blob.startswith(LLAMA_MAGIC):
        return None
    end = blob.find(b"\n", len(LLAMA_MAGIC))
    return None if end < 0 else end + 1


def _records(blob: bytes, quantize: bool) -> Iterator[bytes]:
    start = _payload_start(blob)
    spans = f16_spans(blob, start) if quantize and start is not None else None
    pos = 0
    for span in spans or ():
        if span.start > pos:
            yield _REC.pack(0, span.start - pos) + blob[pos : span.start]
        x = np.frombuffer(blob, dtype="<f2", count=span.rows * span.cols, offset=span.start)
        x = x.reshape(span.rows, span.cols)
        rows = x.T if span.flip else x
        q, scales = kvpack.quantize(np.ascontiguousarray(rows)[:, None, :])
        body = _TENSOR.pack(int(span.flip), span.rows, span.cols) + kvpack.pack(q, scales)
        yield _REC.pack(1, len(body)) + body
        pos = span.end
    if pos < len(blob):
        yield _REC.pack(0, len(blob) - pos) + blob[pos:]


def encode(blob: bytes, *, quantize: bool = True, level: int = 1) -> Iterator[bytes]:
    """The wire form of ``blob`` in chunks of about ``CHUNK_BYTES``, produced as they are compressed."""
    yield WIRE_MAGIC
    z = zlib.compressobj(level)
    pending = b""
    for record in _records(blob, quantize):
        pending += z.compress(record)
        while len(pending) >= CHUNK_BYTES:
            yield pending[:CHUNK_BYTES]
            pending = pending[CHUNK_BYTES:]
    pending += z.flush()
    for i in range(0, len(pending), CHUNK_BYTES):
        yield pending[i : i + CHUNK_BYTES]


def quantized(blob: bytes) -> bool:
    """Whether ``encode`` would quantize this blob (its layout parsed)."""
    start = _payload_start(blob)
    return start is not None and bool(f16_spans(blob, start))


class Decoder:
    """Feed wire chunks as they arrive; each whole record is decoded at once (dequantization overlaps
    the transfer), and ``finish()`` returns the state blob."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj()
        self._magic = b""
        self._raw = bytearray()  # decompressed, not yet a whole record
        self._out = bytearray()
        self.wire_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.wire_bytes += len(chunk)
        if len(self._magic) < len(WIRE_MAGIC):
            need = len(WIRE_MAGIC) - len(self._magic)
            self._magic += chunk[:need]
            chunk = chunk[need:]
            if not WIRE_MAGIC.startswith(self._magic):
                raise KVStateError("not an edgeserve KV wire stream")
        try:
            self._raw += self._z.decompress(chunk)
        except zlib.error as exc:
            raise KVStateError(f"corrupt KV wire stream: {exc}") from None
        self._records()

    def _records(self) -> None:
        raw, pos = self._raw, 0
        while pos + _REC.size <= len(raw):
            kind, length = _REC.unpack_from(raw, pos)
            if pos + _REC.size + length > len(raw):
                break
            body = bytes(raw[pos + _REC.size : pos + _REC.size + length])
            self._out += body if kind == 0 else _tensor(body)
            pos += _REC.size + length
        del raw[:pos]

    def finish(self) -> bytes:
        if self._magic != WIRE_MAGIC or not self._z.eof or self._raw:
            raise KVStateError("the KV wire stream ended early")
        return bytes(self._out)


def _tensor(body: bytes) -> bytes:
    flip, rows, cols = _TENSOR.unpack_from(body)
    q, scales = kvpack.unpack(body[_TENSOR.size :])
    x = kvpack.dequantize(q, scales, np.float16)[:, 0, :]
    if flip:
        x = x.T
    if x.shape != (rows, cols):
        raise KVStateError("KV wire tensor shape mismatch")
    return np.ascontiguousarray(x, dtype="<f2").tobytes()


def file_sha256(path: Path) -> str:
    """The model file's digest: a KV state fits only the very same file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
