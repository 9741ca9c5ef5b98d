"""Pieces every backend needs the same way: the KV-state blob's envelope and prefix matching.

A state blob is ``MAGIC`` + one JSON header line (the model's fingerprint and the tokens the state
covers) + the backend's own payload. The header is checked here, once, so that every backend turns a
blob from another model, a truncated blob or a forged token list into ``KVStateError`` alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from edgeserve.backend import SeqId
from edgeserve.errors import BackendError, KVStateError
from edgeserve.progress import ProgressCallback
from edgeserve.settings import ModelSettings
from edgeserve.types import ResolvedModel

S = TypeVar("S")


def pack_state(magic: bytes, fingerprint: Mapping[str, Any], tokens: Sequence[int], payload: bytes = b"") -> bytes:
    header = {**fingerprint, "tokens": list(tokens)}
    return magic + json.dumps(header).encode() + b"\n" + payload


def unpack_state(
    blob: bytes, magic: bytes, fingerprint: Mapping[str, Any], *, n_ctx: int, n_vocab: int, what: str
) -> tuple[list[int], bytes]:
    """The tokens a blob covers and its payload; ``KVStateError`` unless it fits this model."""
    if not blob.startswith(magic):
        raise KVStateError(f"not an edgeserve {what} state")
    head, sep, payload = blob[len(magic) :].partition(b"\n")
    try:
        header = json.loads(head) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("tokens"), list):
        raise KVStateError(f"corrupt {what} state header")
    mismatched = [k for k, v in fingerprint.items() if header.get(k) != v]
    if mismatched:
        raise KVStateError(f"the state is from another model (differs in {', '.join(mismatched)})")
    tokens = header["tokens"]
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in tokens):
        raise KVStateError("the state holds token ids outside this vocabulary")
    if len(tokens) > n_ctx:
        raise KVStateError(f"the state holds {len(tokens)} tokens, more than this context ({n_ctx})")
    return tokens, payload


class Sequences(Generic[S]):
    """A backend's open sequences (at most ``capacity``) and what the last released one left behind,
    kept as the prefix cache for the next ``open``. For backends that hold one state per sequence
    (MLX prompt caches, ONNX Runtime generators)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.open: dict[SeqId, S] = {}
        self.residue: S | None = None

    def get(self, seq: SeqId) -> S:
        state = self.open.get(seq)
        if state is None:
            raise BackendError(f"sequence {seq} is not open")
        return state

    def check_free(self, seq: SeqId) -> None:
        """Raise unless ``seq`` can be opened now."""
        if seq in self.open:
            raise BackendError(f"sequence {seq} is already open")
        if len(self.open) >= self.capacity:
            raise BackendError(f"{self.capacity} sequences are open; park or release one first")

    def take_residue(self) -> S | None:
        state, self.residue = self.residue, None
        return state

    def release(self, seq: SeqId) -> None:
        if (state := self.open.pop(seq, None)) is not None:
            self.residue = state

    def clear(self) -> None:
        self.open, self.residue = {}, None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share: what a prefill can keep of its cache."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def converted_folder(
    model: ResolvedModel, settings: ModelSettings, fmt: str, progress: ProgressCallback | None = None
) -> Path:
    """The folder a converting backend loads: the model itself when it is a folder, else its
    conversion to ``fmt``, built once and cached. The conversion's progress goes to ``progress``
    (the app's callback) and the log lines; with no callback, to a bar on a terminal or the log
    lines elsewhere (a service manager's journal, a container's log)."""
    if model.path.is_dir():
        return model.path
    from edgeserve.models.convert import convert
    from edgeserve.progress import sinks

    folder: Path = convert(model.path, fmt, cache_dir=settings.cache_dir, progress=sinks(progress))
    return folder
