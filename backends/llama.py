"""llama.cpp through llama-cpp-python: the default backend.

It drives llama.cpp through llama-cpp-python's low-level API: one context whose KV cache holds
every sequence (llama.cpp's sequence ids are the backend's *slots*), and one
``llama_batch`` per decode call carrying a token of every sequence, so N sequences cost one pass
over the weights (continuous batching, as llama-server's parallel slots). Sampling is our own
llama.cpp sampler chain, so every ``SamplingParams`` field (logit_bias included) runs natively and
nothing Python-side touches the 262k-entry logits; the chain object is the request's sampler: its
RNG and penalty history survive a park. Plain greedy is the exception: an argmax of the logits row,
the same token without the chain's copy of the whole vocabulary (``_Argmax``).

Parking copies one slot's KV state out with ``llama_state_seq_get_data`` (no logits, no output
buffers: ~18 KB a token for Gemma 3 270M) and restoring copies it into a free slot. What a
released or parked sequence leaves in its slot stays there as a prefix cache for the next
``open``, which takes the free slot sharing the longest prefix with its prompt.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeserve.backend import SeqId, Step
from edgeserve.errors import BackendError, KVCacheFullError, KVStateError, ModelNotFoundError
from edgeserve.sampling import PENALTY_LAST_N, fresh_seed
from edgeserve.settings import ModelSettings
from edgeserve.threads import ThreadTuner
from edgeserve.types import Capabilities, ResolvedModel, SamplingParams

if TYPE_CHECKING:
    from edgeserve.progress import ProgressCallback

from ._common import common_prefix, pack_state, unpack_state

log = logging.getLogger(__name__)

STATE_MAGIC = b"EDGESERVE-KV2\n"


def load(model: ResolvedModel, settings: ModelSettings, progress: ProgressCallback | None = None) -> LlamaBackend:
    import llama_cpp

    _route_llama_logs()
    llama_cpp.llama_backend_init()  # idempotent; the high-level Llama class does it the same way
    return LlamaBackend(model, settings)


_LOG_CALLBACK: Any = None


def _route_llama_logs() -> None:
    """Send llama.cpp's own log lines to Python logging (``edgeserve.llama_cpp``) instead of stderr,
    where llama-cpp-python prints some of them even with ``verbose=False``."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import llama_cpp

    native = logging.getLogger("edgeserve.llama_cpp")
    # ggml's enum (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line).
    levels = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        last[0] = levels.get(level, last[0] if level == 5 else logging.DEBUG)
        line = text.decode("utf-8", errors="replace").rstrip()
        if line:
            native.log(last[0], "%s", line)

    _LOG_CALLBACK = callback  # ctypes keeps no reference: without this the callback is freed
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@dataclass
class _Slot:
    """One llama.cpp sequence id: the tokens its KV cells hold (positions 0..n-1), and the engine
    sequence using it (None: free; its tokens are then a prefix cache)."""

    index: int
    tokens: list[int] = field(default_factory=list)
    owner: SeqId | None = None
    #: When it was last freed (the least recently freed residue is dropped first).
    freed: int = 0


class LlamaBackend:
    def __init__(self, model: ResolvedModel, settings: ModelSettings) -> None:
        import llama_cpp
        from llama_cpp import _internals

        if model.path.is_dir():
            raise ModelNotFoundError(f"{model.path} is a folder; the llama backend needs a .gguf file")
        self._lib = llama_cpp
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if settings.gpu_layers == -1 else settings.gpu_layers
        # No repacked weight layouts on the CPU: their matrix kernels take another path for a batch
        # of rows than for one, so a sequence decoded beside others gave other greedy text than
        # alone (agreement 0.1-0.8 over 10 tokens here); plain layouts are batch-invariant, and
        # measured no slower on this CPU (tests/test_conformance.py checks the invariance).
        model_params.use_extra_bufts = False
        try:
            self._model = _internals.LlamaModel(path_model=str(model.path), params=model_params, verbose=False)
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's "Failed to load model from file"
            raise BackendError(f"llama.cpp could not load {model.path}: {exc}") from exc
        meta = self._model.metadata()
        n_ctx = min(settings.n_ctx, self._model.n_ctx_train() or settings.n_ctx)
        self._kv_token_bytes = _kv_bytes_per_token(meta)
        if settings.parallel is not None:
            n_slots, n_cells = settings.parallel, settings.parallel * n_ctx
        else:
            n_slots, n_cells = _auto_slots(n_ctx, self._kv_token_bytes, shared=settings.kv_unified)
        ctx_params = llama_cpp.llama_context_default_params()
        # By default one unified cache, as llama-server: at 2 threads here a batched step of 8 cost
        # 0.67x the CPU of a KV stream per slot (equal at 4; bench/batch_step_cost_threads2.json).
        # The price: a sequence's cells sit among other sequences' cells, and the summation order,
        # and near-tie greedy choices with it, then depend on its neighbours. --no-kv-unified gives
        # each slot its own stream, always in position order, and batched text equal to solo text.
        ctx_params.n_ctx = n_cells
        ctx_params.n_seq_max = n_slots
        ctx_params.kv_unified = self._unified = settings.kv_unified
        ctx_params.n_batch = ctx_params.n_ubatch = max(settings.n_batch, n_slots)
        ctx_params.n_threads = ctx_params.n_threads_batch = settings.threads
        # Flash attention: a 16-sequence decode step took 0.75x the time with it at 2 threads here
        # (bench/batch_step_cost_threads2_fa_*.json), but with it a prompt whose prefix came from a
        # prefix cache gave other greedy text than the same prompt prefilled afresh (its sums depend
        # on how the cells were batched). Unset, it follows the cache: auto (on for a CPU, as
        # llama-server) with the shared cache, which gives up exactness anyway; off in the exact
        # mode (--no-kv-unified).
        if settings.flash_attn is None:
            flash = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
                if settings.kv_unified
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        else:
            flash = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if settings.flash_attn
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        ctx_params.flash_attn_type = flash
        ctx_params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=ctx_params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            self._model.close()
            raise BackendError(f"llama.cpp could not create a context for {model.path}: {exc}") from exc
        # llama.cpp may round the cells up (to a floor per sequence): report what it made.
        n_cells = int(llama_cpp.llama_n_ctx(self._ctx.ctx))
        self._n_batch = int(ctx_params.n_batch)
        self._batch = _internals.LlamaBatch(n_tokens=self._n_batch, embd=0, n_seq_max=1, verbose=False)
        self._vocab = self._model.vocab
        self._n_vocab = self._model.n_vocab()
        self._piece = ctypes.create_string_buffer(256)
        # Threads: a fixed --threads pins the count; otherwise it is the most the tuner may use, and
        # the tuner follows the measured decode step time (edgeserve.threads: contention on a busy
        # machine made 2 threads 50x slower than 1 here).
        self._threads = settings.threads
        self._tuner = None if settings.threads_pinned else ThreadTuner(settings.threads)
        if self._tuner is not None:
            self._set_threads(self._tuner.threads)
        self._slots = [_Slot(i) for i in range(n_slots)]
        #: Fewer cells than a full context a sequence: the cache can fill (``KVCacheFullError``).
        self._shared = n_cells < n_slots * n_ctx
        self._by_seq: dict[SeqId, _Slot] = {}
        self._frees = itertools.count(1)
        bos = self._model.token_bos()
        self._caps = Capabilities(
            backend="llama",
            model=model.name,
            n_ctx=n_ctx,
            n_vocab=self._n_vocab,
            eog_token_ids=self._eog_ids(),
            bos_token_id=bos if bos >= 0 else None,
            chat_template=meta.get("tokenizer.chat_template") or None,
            bos_token=self._special_text(bos),
            eos_token=self._special_text(self._model.token_eos()),
            architecture=meta.get("general.architecture", ""),
            kv_state=True,
            device="cpu" if not llama_cpp.llama_supports_gpu_offload() else "gpu",
            max_sequences=n_slots,
            max_batch=n_slots,
            kv_bytes=n_cells * self._kv_token_bytes,
        )
        self._fingerprint = {
            "architecture": self._caps.architecture,
            "n_vocab": self._n_vocab,
            "n_params": int(llama_cpp.llama_model_n_params(self._model.model)),
            "size": int(llama_cpp.llama_model_size(self._model.model)),
        }
        log.info(
            "llama.cpp: %d sequence slots of up to %d tokens sharing %d KV cells, KV budget %.0f MiB",
            n_slots,
            n_ctx,
            n_cells,
            self._caps.kv_bytes / 2**20,
        )

    # ---- Backend protocol -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._caps

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self._token_bytes(t) for t in tokens)

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        self._check_new(seq)
        # The free slot whose prefix cache shares the most with the prompt (never its last token,
        # which the first decode step evaluates), else the one freed longest ago.
        free = [slot for slot in self._slots if slot.owner is None]
        if not free:
            raise BackendError(f"all {len(self._slots)} sequence slots are open; park or release one first")
        slot, keep = self._free_slot(), 0
        if reuse:
            for candidate in free:
                n = min(common_prefix(candidate.tokens, prompt), len(prompt) - 1)
                if n > keep:
                    slot, keep = candidate, n
        self._truncate(slot, keep)
        slot.owner = seq
        self._by_seq[seq] = slot
        return keep

    def prefill(self, seq: SeqId, tokens: Sequence[int]) -> None:
        slot = self._slot(seq)
        start = len(slot.tokens)
        try:
            for i in range(0, len(tokens), self._n_batch):
                chunk = tokens[i : i + self._n_batch]
                self._run([(slot, t, False) for t in chunk])
                slot.tokens.extend(chunk)
        except KVCacheFullError:
            self._truncate(slot, start)  # all or nothing: the engine evaluates the tokens again later
            raise

    def decode(self, steps: Sequence[Step]) -> list[int]:
        slots = [self._slot(step.seq) for step in steps]
        if len(set(map(id, slots))) != len(slots):
            raise BackendError("a decode call carries each sequence at most once")
        started = time.perf_counter()
        self._run([(slot, step.token, True) for slot, step in zip(slots, steps, strict=True)])
        # The tuner compares step times at one batch width: a wider batch is slower, not contended.
        tuner = self._tuner if len(steps) == 1 else None
        if tuner is not None and (threads := tuner.observe(time.perf_counter() - started)):
            self._set_threads(threads)
        out = []
        for i, (slot, step) in enumerate(zip(slots, steps, strict=True)):
            slot.tokens.append(step.token)
            if step.constraint is not None:
                step.constraint.mask(_logits_row(self._lib, self._ctx, i, self._n_vocab))
            out.append(int(step.sampler.sample(self._ctx, i)))  # type: ignore[attr-defined]
        return out

    def park(self, seq: SeqId) -> bytes:
        slot = self._slot(seq)
        lib, ctx = self._lib, self._ctx.ctx
        size = lib.llama_state_seq_get_size(ctx, slot.index)
        buf = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(ctx, buf, size, slot.index)
        blob = pack_state(STATE_MAGIC, self._fingerprint, slot.tokens, bytes(buf)[:written])
        # The KV state stays in the slot as a prefix cache until another sequence needs it.
        self.release(seq)
        return blob

    def restore(self, seq: SeqId, blob: bytes) -> list[int]:
        self._check_new(seq)
        tokens, data = unpack_state(
            blob, STATE_MAGIC, self._fingerprint, n_ctx=self._caps.n_ctx, n_vocab=self._n_vocab, what="llama.cpp"
        )
        slot = self._free_slot()
        self._truncate(slot, 0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        set_data = self._lib.llama_state_seq_set_data
        if set_data(self._ctx.ctx, buf, len(data), slot.index) == 0 and not (
            self._drop_residues() and set_data(self._ctx.ctx, buf, len(data), slot.index) != 0
        ):
            # The blob was checked above (magic, model fingerprint, sizes): where the sequences
            # share the cache, what is left is a cache without room for its cells.
            if self._shared:
                raise KVCacheFullError(f"the KV cache has no room for a state of {len(tokens)} tokens")
            raise KVStateError("llama.cpp rejected the KV state")
        slot.tokens, slot.owner = list(tokens), seq
        self._by_seq[seq] = slot
        return tokens

    def release(self, seq: SeqId) -> None:
        slot = self._by_seq.pop(seq, None)
        if slot is None:
            return
        # Its KV state stays as a prefix cache. In a unified cache every sequence's attention spans
        # the used cells, other sequences' too (a prefill beside three cached 1.5k-token prefixes
        # ran 2.5x slower), so only the newest prefix cache is kept there: a chat's next turn.
        slot.owner, slot.freed = None, next(self._frees)
        if self._unified:
            self._drop_residues(keep=slot)

    def close(self) -> None:
        self._by_seq.clear()
        self._batch.close()
        self._ctx.close()
        self._model.close()

    @property
    def threads(self) -> int:
        """The thread count in use now."""
        return self._threads

    def _set_threads(self, threads: int) -> None:
        # Prompt batches too: under contention their barriers stall the same way.
        self._lib.llama_set_n_threads(self._ctx.ctx, threads, threads)
        self._threads = threads
        log.debug("llama.cpp threads: %d", threads)

    # ---- slots ------------------------------------------------------------------------------

    def _run(self, entries: Sequence[tuple[_Slot, int, bool]]) -> None:
        """Evaluate (slot, token, wants logits) entries in one ``llama_decode``, each token at the
        end of its slot (callers extend ``slot.tokens`` afterwards). When the cache has no room
        for the batch, the prefix caches of free slots go first, then it fails."""
        batch = self._batch.batch
        batch.n_tokens = len(entries)
        ends: dict[int, int] = {}
        for i, (slot, token, logits) in enumerate(entries):
            pos = ends.get(slot.index, len(slot.tokens))
            ends[slot.index] = pos + 1
            batch.token[i], batch.pos[i] = token, pos
            batch.seq_id[i][0], batch.n_seq_id[i] = slot.index, 1
            batch.logits[i] = logits
        rc = self._lib.llama_decode(self._ctx.ctx, batch)
        if rc == 1 and self._drop_residues():
            rc = self._lib.llama_decode(self._ctx.ctx, batch)
        if rc == 1:
            raise KVCacheFullError(f"the KV cache has no room for {len(entries)} more tokens")
        if rc != 0:
            raise BackendError(f"llama_decode failed ({rc}): see the log")

    def _drop_residues(self, keep: _Slot | None = None) -> bool:
        """Empty the prefix caches of the free slots (but ``keep``'s); whether any held one."""
        dropped = False
        for slot in self._slots:
            if slot.owner is None and slot.tokens and slot is not keep:
                self._truncate(slot, 0)
                dropped = True
        return dropped

    def _truncate(self, slot: _Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            self._ctx.kv_cache_seq_rm(slot.index, keep, -1)
            del slot.tokens[keep:]

    def _free_slot(self) -> _Slot:
        """A free slot, the one whose prefix cache was freed longest ago (an empty one first)."""
        free = [slot for slot in self._slots if slot.owner is None]
        if not free:
            raise BackendError(f"all {len(self._slots)} sequence slots are open; park or release one first")
        return min(free, key=lambda slot: (bool(slot.tokens), slot.freed))

    def _slot(self, seq: SeqId) -> _Slot:
        slot = self._by_seq.get(seq)
        if slot is None:
            raise BackendError(f"sequence {seq} is not open")
        return slot

    def _check_new(self, seq: SeqId) -> None:
        if seq in self._by_seq:
            raise BackendError(f"sequence {seq} is already open")

    # ---- helpers ----------------------------------------------------------------------------

    def sampler(self, params: SamplingParams) -> Any:
        from llama_cpp._internals import LlamaSampler

        penalties = params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
        if params.greedy and not (params.logit_bias or penalties):
            return _Argmax(self._lib, self._n_vocab)
        s = LlamaSampler()
        if params.logit_bias:  # ids were checked against n_vocab before queueing
            s.add_logit_bias(self._n_vocab, dict(params.logit_bias))
        if penalties:
            s.add_penalties(
                self._n_vocab,
                PENALTY_LAST_N,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        if params.greedy:
            s.add_greedy()
            return s
        seed = fresh_seed(params)
        if params.top_k:
            s.add_top_k(params.top_k)
        if params.top_p < 1:
            s.add_top_p(params.top_p, 1)
        if params.min_p > 0:
            s.add_min_p(params.min_p, 1)
        s.add_temp(params.temperature)
        s.add_dist(seed)
        return s

    def _token_bytes(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:  # a piece longer than the buffer: llama.cpp returns minus the size it needs
            self._piece = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def _eog_ids(self) -> frozenset[int]:
        # llama.cpp knows every end-of-generation token (EOS, <end_of_turn>, <|eot_id|>, ...).
        # Checking each id once at load costs ~0.1 s and saves a call per decoded token.
        is_eog = self._lib.llama_vocab_is_eog
        return frozenset(t for t in range(self._n_vocab) if is_eog(self._vocab, t))


class _Argmax:
    """Plain greedy (no bias, no penalties): the first largest logit, as llama.cpp's greedy sampler
    picks, read straight from the logits row. The chain would first copy all 262k logits into a
    candidates array: 0.35 ms a sequence, 2.8 ms of an 8-sequence step of about 52 ms here, against
    0.4 ms for the eight argmaxes (a scratch timing at 2 threads)."""

    def __init__(self, lib: Any, n_vocab: int) -> None:
        self._lib, self._n_vocab = lib, n_vocab

    def sample(self, ctx: Any, i: int) -> int:
        return int(_logits_row(self._lib, ctx, i, self._n_vocab).argmax())

    def close(self) -> None:
        pass


def _logits_row(lib: Any, ctx: Any, i: int, n_vocab: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The logits of the ``i``-th output of the last decode call, in place (a view, not a copy)."""
    return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.ctx, i), shape=(n_vocab,))


def _kv_bytes_per_token(meta: dict[str, str]) -> int:
    """KV cache bytes one token takes (f16 keys and values in every layer), from the GGUF
    metadata; an upper bound where layers use a sliding window."""
    arch = meta.get("general.architecture", "")

    def num(key: str, default: int = 0) -> int:
        try:
            return int(meta.get(f"{arch}.{key}", default))
        except ValueError:
            return default

    n_head = max(num("attention.head_count", 1), 1)
    head_dim = num("embedding_length") // n_head
    n_kv = num("attention.head_count_kv", n_head)
    k = num("attention.key_length", head_dim)
    v = num("attention.value_length", head_dim)
    return max(num("block_count", 1) * n_kv * (k + v) * 2, 1)


#: ``--parallel`` unset: at most this many full contexts of KV memory...
MOST_CONTEXTS = 8
#: ...shared by at most this many sequences (one shared cache), or one context a sequence (a
#: stream each, ``--no-kv-unified``).
MOST_SHARED_SEQUENCES = 16


def _auto_slots(n_ctx: int, token_bytes: int, *, shared: bool) -> tuple[int, int]:
    """Sequence slots and KV cells for ``--parallel`` unset: as many full contexts as half the free
    memory holds, up to ``MOST_CONTEXTS``. In a shared cache ``MOST_SHARED_SEQUENCES`` sequences
    use them: a chat turn fills a small part of its context, and at 2 threads here the burst of
    issue 18 then ended at 0.78x llama-server -np 4's makespan against 0.93-0.97x with 8 sequences
    (README). A full context for each of 16 would hold 1546 MiB after loading instead of 966,
    which every app embedding the library would pay at start; when they do outgrow the cells, the
    engine parks one (``KVCacheFullError``). The engine batches as many as its measured decode
    rate justifies."""
    import psutil

    budget = psutil.virtual_memory().available // 2
    contexts = int(max(1, min(MOST_CONTEXTS, budget // max(n_ctx * token_bytes, 1))))
    return (MOST_SHARED_SEQUENCES if shared else contexts), contexts * n_ctx
