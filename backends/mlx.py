"""MLX through mlx-lm: the fast backend on Apple Silicon (Metal), and a correct one on any CPU.

mlx-lm supplies the model (one module per architecture) and its prompt caches; tokenizing and
sampling are edgeserve's own, so that both behave as the llama backend's do: the tokenizer is the
``tokenizer.json`` the converter builds from the GGUF (token for token llama.cpp's), and the
sampler is ``edgeserve.sampling`` (llama.cpp's chain in NumPy, shared with ONNX Runtime) over the
step's logits copied to the host (1 MB for a 262k vocabulary: ~0.1 ms).

A ``.gguf`` model is converted on first use to a cached folder (``edgeserve convert MODEL --to
mlx`` does the same ahead of time); a folder model (an mlx-lm or Hugging Face folder) loads as is.
``threads`` does not apply (MLX schedules its own CPU work); ``n_batch`` is the prefill chunk.
Prefix reuse trims the KV cache, which a sliding-window cache allows only until it first wraps
(Gemma 3: 512 tokens); past that a new prompt is evaluated from scratch.

Every MLX call runs on one long-lived thread (``WORKER``), never on the engine's loop thread: MLX
streams belong to the thread that made them, and an MLX thread that exits before the process does
can abort the process at exit ("terminate called without an active exception", seen here in 4 of 6
runs with mlx 0.32.4; ml-explore/mlx#3126). The loop thread exits on every ``Engine.close``.

Sequences: each open sequence has its own prompt cache (up to ``MAX_SEQUENCES`` at once);
parking saves one with mlx-lm's ``save_prompt_cache`` (safetensors bytes) and restoring loads it,
so a resumed sequence continues bit for bit. The last released sequence stays as the prefix cache.

Batched decoding: a decode call of several sequences is one forward over ``[B, 1]`` tokens. Their
caches are merged into mlx-lm's batch caches (``BatchKVCache``, and ``BatchRotatingKVCache`` for
Gemma 3's sliding-window layers: left-padded, masked per row, RoPE at each row's own offset), as
mlx-lm's ``BatchGenerator`` does. The merge is kept while the same sequences decode together, so a
steady batch costs one forward per step and no copies; a sequence that leaves (release, park) is
extracted and the rest filtered, and the batch is split back into per-sequence caches only when its
membership grows or a member is prefilled (``_Batch``). A decode call of one sequence takes the
unbatched path, unchanged. Padding and the batched matmuls change float rounding, so a batched
sequence's logits equal its solo ones only up to float differences (tests/test_mlx_batch.py
measures the greedy agreement).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edgeserve.backend import SeqId, Step
from edgeserve.errors import BackendError, KVStateError, ModelNotFoundError
from edgeserve.sampling import Sampler
from edgeserve.settings import ModelSettings
from edgeserve.types import Capabilities, ResolvedModel, SamplingParams

from ._common import Sequences, common_prefix, converted_folder, pack_state, unpack_state
from ._hf import FolderTokenizer

if TYPE_CHECKING:
    from edgeserve.progress import ProgressCallback

log = logging.getLogger(__name__)

STATE_MAGIC = b"EDGESERVE-MLX-KV1\n"
#: Sequences open at once: each holds its own prompt cache, which grows with its tokens only.
#: All of them may decode in one batched forward.
MAX_SEQUENCES = 8
R = TypeVar("R")


class MlxThread:
    """The one thread that runs MLX for the whole process; started on first use, never exits."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the MLX thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgeserve-mlx", daemon=True)
                self._thread.start()
        future: Future[R] = Future()
        self._jobs.put((fn, future))
        return future.result()

    def _run(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)


WORKER = MlxThread()


def load(model: ResolvedModel, settings: ModelSettings, progress: ProgressCallback | None = None) -> MlxBackend:
    folder = model_folder(model, settings, progress)
    return WORKER.call(lambda: MlxBackend(model, folder, settings))


def model_folder(model: ResolvedModel, settings: ModelSettings, progress: ProgressCallback | None = None) -> Path:
    return converted_folder(model, settings, "mlx", progress)


class MlxBackend:
    def __init__(self, model: ResolvedModel, folder: Path, settings: ModelSettings) -> None:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model

        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{folder} has no config.json; the mlx backend needs an mlx-lm or HF folder")
        try:
            self._model, config = load_model(folder)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendError(f"mlx-lm could not load {folder}: {exc}") from exc
        self._mx = mx
        #: The fused Metal sampler: False until first asked for, then the kernel or None (no Metal).
        self._metal: Any = False
        self._make_cache = make_prompt_cache
        text_config = config.get("text_config", config)
        self._n_vocab = int(text_config["vocab_size"])
        self._tokenizer = tok = FolderTokenizer(folder, self._n_vocab, backend="mlx")
        bos = tok.vocab.get(tok.bos_text) if tok.bos_text else None
        self._bos = bos if tok.adds_bos(default=bos is not None) else None
        self._n_batch = settings.n_batch
        #: Open sequences, and what the last released one left: the prefix cache for the next open.
        self._seqs: Sequences[_Seq] = Sequences(MAX_SEQUENCES)
        #: The sequences decoding together, their caches merged; None while every cache is its own.
        self._batch: _Batch | None = None
        architecture = str(text_config.get("model_type", config.get("model_type", "")))
        probe = make_prompt_cache(self._model)
        #: mlx-lm can batch the model's caches (Gemma's plain and sliding-window ones can; a
        #: quantized or chunked cache cannot): else each sequence decodes on its own.
        self._batchable = all(callable(getattr(c, "merge", None)) for c in probe)
        self._caps = Capabilities(
            backend="mlx",
            model=model.name,
            n_ctx=min(settings.n_ctx, int(text_config.get("max_position_embeddings", settings.n_ctx))),
            n_vocab=self._n_vocab,
            eog_token_ids=tok.eog_ids(config.get("eos_token_id")),
            bos_token_id=bos,
            chat_template=tok.chat_template,
            bos_token=tok.bos_text,
            eos_token=tok.eos_text,
            architecture=architecture.removesuffix("_text"),
            kv_state=True,
            device="gpu" if mx.metal.is_available() else "cpu",
            max_sequences=MAX_SEQUENCES,
            max_batch=MAX_SEQUENCES if self._batchable else 1,
        )
        n_params = sum(v.size for _, v in _flatten(self._model.parameters()))
        self._fingerprint = {
            "architecture": architecture,
            "n_vocab": self._n_vocab,
            "n_layers": len(probe),
            "n_params": int(n_params),
            "caches": [type(c).__name__ for c in probe],
        }

    # ---- Backend protocol -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._caps

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return self._tokenizer.tokenize(text, self._bos if add_bos else None, special=special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._tokenizer.detokenize(tokens)

    def sampler(self, params: SamplingParams) -> Sampler:
        return Sampler(params)

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        return WORKER.call(lambda: self._open(seq, list(prompt), reuse))

    def prefill(self, seq: SeqId, tokens: Sequence[int]) -> None:
        WORKER.call(lambda: self._prefill(seq, list(tokens)))

    def decode(self, steps: Sequence[Step]) -> list[int]:
        return WORKER.call(lambda: self._decode(list(steps)))

    def park(self, seq: SeqId) -> bytes:
        return WORKER.call(lambda: self._park(seq))

    def restore(self, seq: SeqId, blob: bytes) -> list[int]:
        return WORKER.call(lambda: self._restore(seq, blob))

    def release(self, seq: SeqId) -> None:
        WORKER.call(lambda: self._release(seq))

    def close(self) -> None:
        WORKER.call(self._close)

    # ---- the same, on the MLX thread --------------------------------------------------------

    def _open(self, seq: SeqId, prompt: list[int], reuse: bool) -> int:
        self._seqs.check_free(seq)
        state = self._seqs.take_residue()
        keep = 0
        if reuse and state is not None:
            # The prompt's last token is always evaluated by the first decode step.
            keep = min(common_prefix(state.tokens, prompt), len(prompt) - 1)
            if keep == 0 or not state.trim(len(state.tokens) - keep):
                keep = 0
        self._seqs.open[seq] = state if keep and state is not None else _Seq(self._make_cache(self._model), [])
        return keep

    def _prefill(self, seq: SeqId, tokens: list[int]) -> None:
        if self._batch is not None and seq in self._batch.ids:
            self._unmerge()
        self._extend(self._seqs.get(seq), tokens)

    def _release(self, seq: SeqId) -> None:
        self._leave(seq)
        self._seqs.release(seq)

    def _extend(self, state: _Seq, tokens: list[int]) -> None:
        """Add ``tokens`` to a sequence's KV cache, ``n_batch`` at a time, computing no logits (MLX
        is lazy: evaluating only the cache leaves the output layer's matmul out)."""
        mx = self._mx
        for i in range(0, len(tokens), self._n_batch):
            chunk = tokens[i : i + self._n_batch]
            self._model(mx.array(chunk)[None], cache=state.cache)
            mx.eval([c.state for c in state.cache])
            state.tokens.extend(chunk)

    def _decode(self, steps: list[Step]) -> list[int]:
        if len(steps) == 1 or not self._batchable:
            self._unmerge()
            return [self._step(s) for s in steps]
        ids = [s.seq for s in steps]
        if len(set(ids)) != len(ids):
            raise BackendError(f"a decode call names a sequence twice: {ids}")
        batch = self._batch
        if batch is None or set(batch.ids) != set(ids):
            self._unmerge()
            batch = self._batch = self._merge(ids)
        row_of = {seq: i for i, seq in enumerate(batch.ids)}  # the engine may list them in another order
        tokens = [0] * len(ids)
        for s in steps:
            tokens[row_of[s.seq]] = s.token
            self._seqs.get(s.seq).tokens.append(s.token)
        mx = self._mx
        rows = self._model(mx.array(tokens)[:, None], cache=batch.cache)[:, -1].astype(mx.float32)  # [B, n_vocab]
        host: list[np.ndarray[Any, np.dtype[np.float32]]] = []

        def host_row(i: int) -> Callable[[], np.ndarray[Any, np.dtype[np.float32]]]:
            def get() -> np.ndarray[Any, np.dtype[np.float32]]:
                if not host:  # every row to the host at once, on the first row that needs it
                    host.append(np.array(rows))
                row: np.ndarray[Any, np.dtype[np.float32]] = host[0][i]
                return row

            return get

        return [self._pick(s, rows[row_of[s.seq]], host_row(row_of[s.seq])) for s in steps]

    def _step(self, step: Step) -> int:
        """Evaluate one token; sample the next from its logits."""
        state = self._seqs.get(step.seq)
        out = self._model(self._mx.array([[step.token]]), cache=state.cache)  # [1, 1, n_vocab]
        state.tokens.append(step.token)
        row = out[0, -1].astype(self._mx.float32)
        return self._pick(step, row, lambda: np.array(row))  # [n_vocab], evaluated when asked

    def _pick(self, step: Step, row: Any, host: Callable[[], np.ndarray[Any, np.dtype[np.float32]]]) -> int:
        """The token after ``row`` (one sequence's logits, an MLX array), by the step's sampler."""
        sampler = step.sampler
        if step.constraint is None and isinstance(sampler, Sampler) and sampler.plain and not sampler.params.greedy:
            metal = self._metal_sampler()
            if metal is not None:  # the fused Metal kernel draws on the GPU, from the request's own stream
                return sampler.draw_with(lambda u: self._draw_on_gpu(metal, row, sampler.params, u))
        logits = host()
        if step.constraint is not None:
            step.constraint.mask(logits)
        token: int = step.sampler(logits)  # type: ignore[operator]
        return token

    # ---- the batch: merged caches, split lazily ---------------------------------------------

    def _merge(self, ids: list[SeqId]) -> _Batch:
        """One batch cache per layer over these sequences' caches (row i is ``ids[i]``). Their own
        caches are emptied: the batch holds the only copy until ``_unmerge`` or ``_leave``."""
        states = [self._seqs.get(seq) for seq in ids]
        layers = zip(*(state.cache for state in states), strict=True)
        cache = [layer[0].merge(list(layer)) for layer in layers]
        for state in states:
            state.cache = []
        return _Batch(tuple(ids), cache)

    def _unmerge(self) -> None:
        """Give every member of the batch its own cache back; the batch is gone."""
        batch, self._batch = self._batch, None
        if batch is not None:
            for i, seq in enumerate(batch.ids):
                self._take_out(batch, i, self._seqs.get(seq))

    def _leave(self, seq: SeqId) -> None:
        """Take ``seq`` out of the batch with its own cache; the others stay merged (their rows
        filtered), unless one is left, which needs no batch."""
        batch = self._batch
        if batch is None or seq not in batch.ids:
            return
        if len(batch.ids) <= 2:
            self._unmerge()
            return
        i = batch.ids.index(seq)
        self._take_out(batch, i, self._seqs.get(seq))
        keep = [j for j in range(len(batch.ids)) if j != i]
        for c in batch.cache:
            c.filter(keep)
        self._batch = _Batch(tuple(batch.ids[j] for j in keep), batch.cache)

    def _take_out(self, batch: _Batch, i: int, state: _Seq) -> None:
        state.cache = [c.extract(i) for c in batch.cache]
        # Evaluated now, so that the copy no longer holds the batch's arrays.
        self._mx.eval([c.state for c in state.cache])

    def _metal_sampler(self) -> Any:
        """``edgeserve.kernels.sample_metal``'s kernel, built once, where Metal is there; else None."""
        if self._metal is False:
            from edgeserve.kernels.sample_metal import MetalSampler

            self._metal = MetalSampler() if self._mx.metal.is_available() else None
        return self._metal

    def _draw_on_gpu(self, metal: Any, row: Any, params: SamplingParams, u: float) -> int:
        mx = self._mx
        picked = metal(
            row[None],
            mx.array([u], mx.float32),
            mx.array([params.top_k], mx.int32),
            mx.array([params.top_p], mx.float32),
            mx.array([params.min_p], mx.float32),
            mx.array([params.temperature], mx.float32),
        )
        return int(picked[0].item())

    def _park(self, seq: SeqId) -> bytes:
        from mlx_lm.models.cache import save_prompt_cache

        self._leave(seq)
        state = self._seqs.get(seq)
        with tempfile.TemporaryDirectory(prefix="edgeserve-kv-") as tmp:
            path = Path(tmp) / "kv.safetensors"
            save_prompt_cache(str(path), state.cache)
            data = path.read_bytes()
        del self._seqs.open[seq]
        return pack_state(STATE_MAGIC, self._fingerprint, state.tokens, data)

    def _restore(self, seq: SeqId, blob: bytes) -> list[int]:
        from mlx_lm.models.cache import load_prompt_cache

        self._seqs.check_free(seq)
        tokens, data = unpack_state(
            blob, STATE_MAGIC, self._fingerprint, n_ctx=self._caps.n_ctx, n_vocab=self._n_vocab, what="MLX"
        )
        if _cache_classes(data) != self._fingerprint["caches"]:
            raise KVStateError("KV state does not hold this model's caches")
        with tempfile.TemporaryDirectory(prefix="edgeserve-kv-") as tmp:
            path = Path(tmp) / "kv.safetensors"
            path.write_bytes(data)
            try:
                cache = load_prompt_cache(str(path))
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                raise KVStateError(f"MLX could not read the KV state: {exc}") from exc
        if any(getattr(c, "offset", len(tokens)) != len(tokens) for c in cache):
            raise KVStateError("KV state caches disagree with its token list")
        self._seqs.open[seq] = _Seq(cache, list(tokens))
        return tokens

    def _close(self) -> None:
        self._batch = None
        self._seqs.clear()
        self._mx.clear_cache()


@dataclass
class _Seq:
    """One sequence. Invariant: ``tokens`` lists exactly the tokens whose keys and values are in
    ``cache``."""

    cache: list[Any]
    tokens: list[int]

    def trim(self, n: int) -> bool:
        """Drop the last ``n`` tokens; False if this cache cannot (a wrapped sliding window)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if not can_trim_prompt_cache(self.cache):
            return False
        trim_prompt_cache(self.cache, n)
        del self.tokens[len(self.tokens) - n :]
        return True


@dataclass
class _Batch:
    """Sequences that decode together: ``cache`` holds one mlx-lm batch cache per layer, row i
    for ``ids[i]``. While merged, a member's own ``_Seq.cache`` is empty."""

    ids: tuple[SeqId, ...]
    cache: list[Any]


# ---- helpers --------------------------------------------------------------------------------


def _cache_classes(data: bytes) -> list[str] | None:
    """The cache class names a saved prompt cache declares (read from the safetensors header
    before mlx-lm instantiates anything by those names)."""
    if len(data) < 8:
        return None
    size = int.from_bytes(data[:8], "little")
    try:
        meta = json.loads(data[8 : 8 + size]).get("__metadata__", {})
    except (ValueError, AttributeError):
        return None
    # mlx-lm flattens [metadata, classes, scalars] into keys "1.0", "1.1", ...
    classes = sorted(((int(k.split(".")[1]), v) for k, v in meta.items() if re.fullmatch(r"1\.\d+", k)))
    return [v for _, v in classes]


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    flat: list[tuple[str, Any]] = tree_flatten(tree)  # type: ignore[assignment]
    return flat
