"""MLX through mlx-lm: the fast backend on Apple Silicon (Metal), and a correct one on any CPU.

mlx-lm supplies the model (one module per architecture) and its prompt caches; tokenizing and
sampling are edgeserve's own, so that both behave as the llama backend's do: the tokenizer is the
``tokenizer.json`` the converter builds from the GGUF (token for token llama.cpp's), and the
sampler runs llama.cpp's chain (logit bias, penalties, then greedy, or top-k → top-p → min-p →
temperature → a seeded draw) in MLX ops.

A ``.gguf`` model is converted on first use to a cached folder (``edgeserve convert MODEL --to
mlx`` does the same ahead of time); a folder model (an mlx-lm or Hugging Face folder) loads as is.
``threads`` does not apply (MLX schedules its own CPU work); ``n_batch`` is the prefill chunk.
Prefix reuse trims the KV cache, which a sliding-window cache allows only until it first wraps
(Gemma 3: 512 tokens); past that a new prompt is evaluated from scratch.

Every MLX call runs on one long-lived thread (``WORKER``), never on the engine's loop thread: MLX
streams belong to the thread that made them, and an MLX thread that exits before the process does
can abort the process at exit ("terminate called without an active exception", seen here in 4 of 6
runs with mlx 0.32.4; ml-explore/mlx#3126). The loop thread exits on every ``Engine.close``.

Invariant: ``self._tokens`` lists exactly the tokens whose keys and values are in ``self._cache``;
``self._logits`` is None or the logits after the last of them.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import queue
import random
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgeserve.errors import BackendError, KVStateError, ModelNotFoundError
from edgeserve.settings import ModelSettings
from edgeserve.types import Capabilities, ResolvedModel, SamplingParams

from ._common import common_prefix, converted_folder, pack_state, unpack_state
from ._hf import FolderTokenizer

if TYPE_CHECKING:
    import mlx.core as mx

log = logging.getLogger(__name__)

STATE_MAGIC = b"EDGESERVE-MLX-KV1\n"
#: How far back the repetition/frequency/presence penalties look, in tokens (as the llama backend).
PENALTY_LAST_N = 64
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


def load(model: ResolvedModel, settings: ModelSettings) -> MlxBackend:
    folder = model_folder(model, settings)
    return WORKER.call(lambda: MlxBackend(model, folder, settings))


def model_folder(model: ResolvedModel, settings: ModelSettings) -> Path:
    return converted_folder(model, settings, "mlx")


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
        self._make_cache = make_prompt_cache
        text_config = config.get("text_config", config)
        self._n_vocab = int(text_config["vocab_size"])
        self._tokenizer = tok = FolderTokenizer(folder, self._n_vocab, backend="mlx")
        bos = tok.vocab.get(tok.bos_text) if tok.bos_text else None
        self._bos = bos if tok.adds_bos(default=bos is not None) else None
        self._n_batch = settings.n_batch
        self._cache: list[Any] = make_prompt_cache(self._model)
        self._tokens: list[int] = []
        self._logits: mx.array | None = None
        architecture = str(text_config.get("model_type", config.get("model_type", "")))
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
        )
        n_params = sum(v.size for _, v in _flatten(self._model.parameters()))
        self._fingerprint = {
            "architecture": architecture,
            "n_vocab": self._n_vocab,
            "n_layers": len(self._cache),
            "n_params": int(n_params),
            "caches": [type(c).__name__ for c in self._cache],
        }

    # ---- Backend protocol -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._caps

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self._tokenizer.tokenize(text, self._bos if add_bos else None)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._tokenizer.detokenize(tokens)

    def prefill(self, prompt: Sequence[int], *, reuse: bool = True) -> int:
        return WORKER.call(lambda: self._prefill(list(prompt), reuse))

    def decode(self, params: SamplingParams) -> Iterator[int]:
        sample = WORKER.call(lambda: _Sampler(self._mx, params, self._n_vocab))
        token = WORKER.call(lambda: sample(self._live_logits()))
        while True:
            yield token
            token = WORKER.call(functools.partial(self._step_and_sample, sample, token))

    def export_state(self) -> bytes:
        return WORKER.call(self._export_state)

    def import_state(self, blob: bytes) -> list[int]:
        return WORKER.call(lambda: self._import_state(blob))

    def close(self) -> None:
        WORKER.call(self._close)

    # ---- the same, on the MLX thread --------------------------------------------------------

    def _prefill(self, prompt: list[int], reuse: bool) -> int:
        keep = 0
        if reuse:
            common = common_prefix(self._tokens, prompt)
            if common == len(prompt) == len(self._tokens) and self._logits is not None:
                return common  # the whole prompt is evaluated and its logits are live
            keep = min(common, len(prompt) - 1)
            if keep < len(self._tokens) and not self._trim(len(self._tokens) - keep):
                keep = 0
        if keep == 0:
            self._reset()
        self._logits = None
        # Everything but the last token fills the cache in batches; the last runs alone, so only
        # its logits are ever computed (the output layer is the costliest matmul of a small model).
        self._extend(prompt[keep:-1])
        self._step(prompt[-1])
        return keep

    def _step_and_sample(self, sample: _Sampler, token: int) -> int:
        return sample(self._step(token))

    def _live_logits(self) -> mx.array:
        if self._logits is None:
            raise BackendError("decode needs a prefill first")
        return self._logits

    def _export_state(self) -> bytes:
        from mlx_lm.models.cache import save_prompt_cache

        with tempfile.TemporaryDirectory(prefix="edgeserve-kv-") as tmp:
            path = Path(tmp) / "kv.safetensors"
            save_prompt_cache(str(path), self._cache)
            data = path.read_bytes()
        return pack_state(STATE_MAGIC, self._fingerprint, self._tokens, data)

    def _import_state(self, blob: bytes) -> list[int]:
        from mlx_lm.models.cache import load_prompt_cache

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
        self._cache, self._tokens, self._logits = cache, tokens, None
        return tokens

    def _close(self) -> None:
        self._cache, self._tokens, self._logits = [], [], None
        self._mx.clear_cache()

    # ---- model steps ------------------------------------------------------------------------

    def _extend(self, tokens: list[int]) -> None:
        """Add ``tokens`` to the KV cache, ``n_batch`` at a time, computing no logits (MLX is lazy:
        evaluating only the cache leaves the output layer's matmul out)."""
        mx = self._mx
        for i in range(0, len(tokens), self._n_batch):
            chunk = tokens[i : i + self._n_batch]
            self._model(mx.array(chunk)[None], cache=self._cache)
            mx.eval([c.state for c in self._cache])
            self._tokens.extend(chunk)

    def _step(self, token: int) -> mx.array:
        """Evaluate one token; its logits ([n_vocab], lazy) predict the next."""
        self._logits = None
        out: mx.array = self._model(self._mx.array([[token]]), cache=self._cache)  # [1, 1, n_vocab]
        self._tokens.append(token)
        self._logits = out[0, -1]
        return self._logits

    def _trim(self, n: int) -> bool:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        # A sliding-window cache that has wrapped around cannot drop its tail.
        if not can_trim_prompt_cache(self._cache):
            return False
        trim_prompt_cache(self._cache, n)
        del self._tokens[len(self._tokens) - n :]
        return True

    def _reset(self) -> None:
        self._cache = self._make_cache(self._model)
        self._tokens = []


class _Sampler:
    """llama.cpp's sampler chain over MLX arrays, in the llama backend's order. Penalties look at
    the tokens this call generated (the llama backend's sampler sees only those too)."""

    def __init__(self, mx: Any, params: SamplingParams, n_vocab: int) -> None:
        self.mx = mx
        self.p = params
        self.history: collections.deque[int] = collections.deque(maxlen=PENALTY_LAST_N)
        self.penalize = params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
        self.bias = None
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            self.bias = (mx.array(ids), mx.array([float(params.logit_bias[i]) for i in ids], dtype=mx.float32))
        seed = params.seed if params.seed is not None else random.randrange(2**32 - 1)
        self.key = mx.random.key(seed)

    def __call__(self, logits: Any) -> int:
        mx, p = self.mx, self.p
        logits = logits.astype(mx.float32)
        if self.bias is not None:
            logits = logits.at[self.bias[0]].add(self.bias[1])
        if self.penalize and self.history:
            counts = collections.Counter(self.history)
            ids = mx.array(list(counts))
            n = mx.array(list(counts.values()), dtype=mx.float32)
            seen = logits[ids]
            if p.repetition_penalty != 1:
                seen = mx.where(seen <= 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
            seen = seen - n * p.frequency_penalty - p.presence_penalty
            # Functional update: the backend's logits array must never change under it.
            logits = logits.at[ids].add(seen - logits[ids])
        token = int(mx.argmax(logits).item()) if p.greedy else self._draw(logits)
        self.history.append(token)
        return token

    def _draw(self, logits: Any) -> int:
        mx, p = self.mx, self.p
        ids = None  # candidate ids, when fewer than the vocabulary
        if 0 < p.top_k < logits.size:
            ids = mx.argpartition(-logits, p.top_k - 1)[: p.top_k]
            logits = logits[ids]
        if p.top_p < 1:
            order = mx.argsort(-logits)
            probs = mx.softmax(logits[order])
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = int(mx.sum(mx.cumsum(probs) - probs < p.top_p).item())
            order = order[: max(keep, 1)]
            logits = logits[order]
            ids = order if ids is None else ids[order]
        if p.min_p > 0:
            # Keep tokens at least min_p times as likely as the likeliest (a prefix once sorted).
            order = mx.argsort(-logits)
            keep = int(mx.sum(logits >= mx.max(logits) + math.log(p.min_p)).item())
            order = order[: max(keep, 1)]
            logits = logits[order]
            ids = order if ids is None else ids[order]
        self.key, sub = mx.random.split(self.key)
        pick = int(mx.random.categorical(logits / p.temperature, key=sub).item())
        return pick if ids is None else int(ids[pick].item())


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
