"""llama.cpp through llama-cpp-python: the default backend.

The high-level ``Llama`` object is used for what it does well (loading, batched ``eval`` with KV
bookkeeping); sampling is our own llama.cpp sampler chain, so that every ``SamplingParams`` field
(logit_bias included) runs natively and nothing Python-side touches the 262k-entry logits. The
chain object is the request's sampler: its RNG and penalty history survive a park.

Sequences: the context holds one at a time (``max_sequences=1``); parking copies that sequence's
KV state out with ``llama_state_seq_get_data`` (no logits, no output buffers: ~18 KB a token for
Gemma 3 270M) and restoring copies it back. What a released or parked sequence leaves in the
context stays there as the prefix cache for the next ``open``.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeserve.backend import SeqId, Step
from edgeserve.errors import BackendError, KVStateError, ModelNotFoundError
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
    _route_llama_logs()
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


class LlamaBackend:
    def __init__(self, model: ResolvedModel, settings: ModelSettings) -> None:
        import llama_cpp

        if model.path.is_dir():
            raise ModelNotFoundError(f"{model.path} is a folder; the llama backend needs a .gguf file")
        self._lib = llama_cpp
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(model.path),
                n_ctx=settings.n_ctx,
                n_batch=settings.n_batch,
                n_ubatch=settings.n_batch,
                n_threads=settings.threads,
                n_threads_batch=settings.threads,
                n_gpu_layers=settings.gpu_layers,
                flash_attn=settings.flash_attn,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's "Failed to load model from file"
            raise BackendError(f"llama.cpp could not load {model.path}: {exc}") from exc
        llm = self._llm
        self._vocab = llm._model.vocab
        self._ctx = llm._ctx
        self._n_vocab = llm.n_vocab()
        self._piece = ctypes.create_string_buffer(256)
        # Threads: a fixed --threads pins the count; otherwise it is the most the tuner may use, and
        # the tuner follows the measured decode step time (edgeserve.threads: contention on a busy
        # machine made 2 threads 50x slower than 1 here).
        self._threads = settings.threads
        self._tuner = None if settings.threads_pinned else ThreadTuner(settings.threads)
        if self._tuner is not None:
            self._set_threads(self._tuner.threads)
        #: The sequence whose KV state the context holds (one at a time); None: free, and what the
        #: context holds (``input_ids[:n_tokens]``) is a prefix cache for the next ``open``.
        self._open: SeqId | None = None
        meta = llm.metadata
        bos = llm.token_bos()
        self._caps = Capabilities(
            backend="llama",
            model=model.name,
            n_ctx=llm.n_ctx(),
            n_vocab=self._n_vocab,
            eog_token_ids=self._eog_ids(),
            bos_token_id=bos if bos >= 0 else None,
            chat_template=meta.get("tokenizer.chat_template") or None,
            bos_token=self._special_text(bos),
            eos_token=self._special_text(llm.token_eos()),
            architecture=meta.get("general.architecture", ""),
            kv_state=True,
            device="cpu" if not llama_cpp.llama_supports_gpu_offload() else "gpu",
            max_sequences=1,
        )
        self._fingerprint = {
            "architecture": self._caps.architecture,
            "n_vocab": self._n_vocab,
            "n_params": int(llama_cpp.llama_model_n_params(llm._model.model)),
            "size": int(llama_cpp.llama_model_size(llm._model.model)),
        }

    # ---- Backend protocol -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._caps

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self._token_bytes(t) for t in tokens)

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        self._check_free(seq)
        llm = self._llm
        n_cached = int(llm.n_tokens) if reuse else 0
        # The prompt's last token is always evaluated by the first decode step.
        keep = min(common_prefix(llm.input_ids[:n_cached].tolist(), prompt), len(prompt) - 1)
        if not self._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0  # this memory type cannot drop a tail: start over
            self._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.n_tokens = keep
        self._open = seq
        return keep

    def prefill(self, seq: SeqId, tokens: Sequence[int]) -> None:
        self._check_open(seq)
        if tokens:
            self._llm.eval(list(tokens))

    def decode(self, steps: Sequence[Step]) -> list[int]:
        out = []
        for step in steps:  # one context holds one sequence: steps run one after another
            self._check_open(step.seq)
            started = time.perf_counter()
            self._llm.eval([step.token])
            if self._tuner is not None and (threads := self._tuner.observe(time.perf_counter() - started)):
                self._set_threads(threads)
            if step.constraint is not None:
                row = self._lib.llama_get_logits_ith(self._ctx.ctx, -1)
                step.constraint.mask(np.ctypeslib.as_array(row, shape=(self._n_vocab,)))
            out.append(int(step.sampler.sample(self._ctx, -1)))  # type: ignore[attr-defined]
        return out

    def park(self, seq: SeqId) -> bytes:
        self._check_open(seq)
        lib, ctx = self._lib, self._ctx.ctx
        size = lib.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(ctx, buf, size, 0)
        n = int(self._llm.n_tokens)
        blob = pack_state(STATE_MAGIC, self._fingerprint, self._llm.input_ids[:n].tolist(), bytes(buf)[:written])
        # The KV state stays in the context as a prefix cache until another sequence needs it.
        self._open = None
        return blob

    def restore(self, seq: SeqId, blob: bytes) -> list[int]:
        self._check_free(seq)
        tokens, data = unpack_state(
            blob, STATE_MAGIC, self._fingerprint, n_ctx=self._caps.n_ctx, n_vocab=self._n_vocab, what="llama.cpp"
        )
        self._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm = self._llm
        llm.n_tokens = 0
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self._lib.llama_state_seq_set_data(self._ctx.ctx, buf, len(data), 0) == 0:
            raise KVStateError("llama.cpp rejected the KV state")
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        self._open = seq
        return tokens

    def release(self, seq: SeqId) -> None:
        if self._open == seq:
            self._open = None  # its KV state stays as the prefix cache

    def close(self) -> None:
        self._open = None
        self._llm.close()

    @property
    def threads(self) -> int:
        """The thread count in use now."""
        return self._threads

    def _set_threads(self, threads: int) -> None:
        # Prompt batches too: under contention their barriers stall the same way.
        self._lib.llama_set_n_threads(self._ctx.ctx, threads, threads)
        self._threads = threads
        log.debug("llama.cpp threads: %d", threads)

    def _check_free(self, seq: SeqId) -> None:
        if self._open is not None:
            raise BackendError(f"llama.cpp holds one sequence at a time; sequence {self._open} is open")

    def _check_open(self, seq: SeqId) -> None:
        if self._open != seq:
            raise BackendError(f"sequence {seq} is not open")

    # ---- helpers ----------------------------------------------------------------------------

    def sampler(self, params: SamplingParams) -> Any:
        from llama_cpp._internals import LlamaSampler

        s = LlamaSampler()
        if params.logit_bias:  # ids were checked against n_vocab before queueing
            s.add_logit_bias(self._n_vocab, dict(params.logit_bias))
        if params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty:
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
