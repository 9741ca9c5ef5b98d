"""A scripted backend: the test double beside the ``Backend`` Protocol, for the engine's own logic.

No model: a byte-level vocabulary, and logits that are a pure function of everything a sequence
has evaluated, so the tokens that come out depend only on a request's own history. A request that
is parked, interleaved with others or resumed must therefore produce exactly what it produces
alone; any leak between sequences, lost token or replayed RNG draw shows as different text.
Sampling runs the real shared sampler (``edgeserve.sampling``). Step times are controllable
(``step_s``, ``prefill_s``: real sleeps, so cancel races and close-during-prefill are real races),
every call is logged in ``calls``, and ``fail_on`` makes one call raise.

    tokens 0..2: EOS, BOS, <turn> (special); 3..258: the bytes 0..255
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeserve.backend import SeqId, Step
from edgeserve.errors import BackendError, KVCacheFullError, KVStateError
from edgeserve.sampling import Sampler
from edgeserve.types import Capabilities, SamplingParams

EOS, BOS, TURN = 0, 1, 2
N_SPECIAL = 3
N_VOCAB = N_SPECIAL + 256
_MAGIC = b"EDGESERVE-SCRIPTED1\n"
_SPECIAL_TEXT = {"<eos>": EOS, "<bos>": BOS, "<turn>": TURN}


@dataclass
class ScriptedBackend:
    """Deterministic tokens, controllable time; see the module docstring."""

    max_sequences: int = 1
    #: Sequences one decode call evaluates together (a batched step costs ``step_s`` plus
    #: ``batch_cost`` of it for each further sequence).
    max_batch: int = 1
    batch_cost: float = 0.25
    n_ctx: int = 4096
    #: Seconds each decode step and each prefilled token take.
    step_s: float = 0.0
    prefill_s: float = 0.0
    #: Answers end (EOS is forced) after this many generated tokens; None: only max_tokens ends them.
    answer_tokens: int | None = None
    #: Tokens all open sequences may hold together (a shared KV memory); None: no limit. Beyond it
    #: ``prefill``, ``decode`` and ``restore`` raise ``KVCacheFullError`` and change nothing.
    kv_cells: int | None = None
    #: Raise ``RuntimeError`` on the n-th call (0-based, all methods counted) of this method name.
    fail_on: tuple[str, int] | None = None
    calls: list[tuple[str, SeqId | None]] = field(default_factory=list)
    #: The sequences of every decode call, in order.
    batches: list[tuple[SeqId, ...]] = field(default_factory=list)
    _seqs: dict[SeqId, list[int]] = field(default_factory=dict)
    _generated: dict[SeqId, int] = field(default_factory=dict)
    _cache: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def capabilities(self) -> Capabilities:
        return Capabilities(
            backend="scripted",
            model="scripted",
            n_ctx=self.n_ctx,
            n_vocab=N_VOCAB,
            eog_token_ids=frozenset({EOS}),
            bos_token_id=BOS,
            bos_token="<bos>",
            eos_token="<eos>",
            architecture="scripted",
            kv_state=True,
            max_sequences=self.max_sequences,
            max_batch=self.max_batch,
        )

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        out = [BOS] if add_bos else []
        i = 0
        while i < len(text):
            mark = next((m for m in _SPECIAL_TEXT if special and text.startswith(m, i)), None)
            if mark is not None:
                out.append(_SPECIAL_TEXT[mark])
                i += len(mark)
                continue
            out += [N_SPECIAL + b for b in text[i].encode("utf-8", errors="replace")]
            i += 1
        return out

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return bytes(t - N_SPECIAL for t in tokens if t >= N_SPECIAL)

    def sampler(self, params: SamplingParams) -> Sampler:
        return Sampler(params)

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        self._call("open", seq)
        self._check_free(seq)
        keep = 0
        if reuse:
            while keep < min(len(self._cache), len(prompt) - 1) and self._cache[keep] == prompt[keep]:
                keep += 1
        self._seqs[seq] = list(prompt[:keep])
        self._generated[seq] = 0
        return keep

    def prefill(self, seq: SeqId, tokens: Sequence[int]) -> None:
        self._call("prefill", seq)
        self._check_room(len(tokens))
        self._get(seq).extend(tokens)
        time.sleep(self.prefill_s * len(tokens))

    def decode(self, steps: Sequence[Step]) -> list[int]:
        if len(steps) > self.max_batch:
            raise BackendError(f"{len(steps)} steps in one call; this backend batches {self.max_batch}")
        self._check_room(len(steps))
        self.batches.append(tuple(step.seq for step in steps))
        if self.max_batch > 1:
            time.sleep(self.step_s * (1 + self.batch_cost * (len(steps) - 1)))
        out = []
        for step in steps:
            self._call("decode", step.seq)
            tokens = self._get(step.seq)
            tokens.append(step.token)
            if self.max_batch == 1:
                time.sleep(self.step_s)
            logits = self._logits(step.seq, tokens)
            if step.constraint is not None:
                step.constraint.mask(logits)
            out.append(step.sampler(logits))  # type: ignore[operator]
            self._generated[step.seq] += 1
        return out

    def park(self, seq: SeqId) -> bytes:
        self._call("park", seq)
        tokens = self._get(seq)
        header = json.dumps({"tokens": tokens, "generated": self._generated.pop(seq)}).encode()
        del self._seqs[seq]
        self._cache = list(tokens)
        return _MAGIC + header

    def restore(self, seq: SeqId, blob: bytes) -> list[int]:
        self._call("restore", seq)
        self._check_free(seq)
        try:
            header = json.loads(blob.removeprefix(_MAGIC)) if blob.startswith(_MAGIC) else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or not isinstance(header.get("tokens"), list):
            raise KVStateError("not a scripted backend state")
        self._check_room(len(header["tokens"]))
        self._seqs[seq] = list(header["tokens"])
        self._generated[seq] = int(header.get("generated", 0))
        return list(header["tokens"])

    def release(self, seq: SeqId) -> None:
        # The sequence is freed before a scripted failure, as llama.cpp's backend frees its slot
        # before dropping old prefix caches (the step that could fail).
        if seq in self._seqs:
            self._cache = self._seqs.pop(seq)
            self._generated.pop(seq, None)
        self._call("release", seq)

    def close(self) -> None:
        self._call("close", None)
        self._seqs.clear()
        self.closed = True

    @property
    def open_sequences(self) -> list[SeqId]:
        return list(self._seqs)

    # ---- helpers ----------------------------------------------------------------------------

    def _logits(self, seq: SeqId, tokens: list[int]) -> np.ndarray[Any, np.dtype[np.float32]]:
        """A pure function of the evaluated tokens: lowercase letters and spaces, EOS when scripted."""
        rng = np.random.default_rng(zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes()))
        logits = np.full(N_VOCAB, -30.0, dtype=np.float32)
        letters = [N_SPECIAL + b for b in b"abcdefghijklmnopqrstuvwxyz "]
        logits[letters] = rng.standard_normal(len(letters)).astype(np.float32) * 2
        if self.answer_tokens is not None and self._generated[seq] >= self.answer_tokens:
            logits[EOS] = 100.0
        return logits

    def _call(self, name: str, seq: SeqId | None) -> None:
        with self._lock:
            n = sum(1 for c, _ in self.calls if c == name)
            self.calls.append((name, seq))
        if self.fail_on == (name, n):
            raise RuntimeError(f"scripted failure in {name} #{n}")

    def _get(self, seq: SeqId) -> list[int]:
        if seq not in self._seqs:
            raise BackendError(f"sequence {seq} is not open")
        return self._seqs[seq]

    def _check_room(self, more: int) -> None:
        held = sum(len(tokens) for tokens in self._seqs.values())
        if self.kv_cells is not None and held + more > self.kv_cells:
            raise KVCacheFullError(f"{held} of {self.kv_cells} cells are held; {more} more do not fit")

    def _check_free(self, seq: SeqId) -> None:
        if seq in self._seqs:
            raise BackendError(f"sequence {seq} is already open")
        if len(self._seqs) >= self.max_sequences:
            raise BackendError(f"{self.max_sequences} sequences are open; park or release one first")
