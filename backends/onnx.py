"""ONNX Runtime through onnxruntime-genai: the runtime many desktop apps ship models with (CPU,
CUDA, DirectML; the execution provider is the one the model folder was built for).

Why onnxruntime-genai and not plain onnxruntime: the builder's Gemma 3 graph runs its attention
as ``GroupQueryAttention`` with a shared past/present buffer and a ring buffer for the
sliding-window layers (``sliding_window_cache``); onnxruntime-genai owns that KV layout, grows it,
and rewinds it (``rewind_to``), and is the runtime the builder's output is made and tested for.
Driving the graph from plain onnxruntime would mean re-implementing that cache protocol here.
What is taken from it: the model, its KV cache, ``append_tokens`` (prefill and each decode step)
and ``get_logits``. What is edgeserve's own:

- Tokenizing: ``tokenizer.json`` through ``tokenizers`` (the file the converter builds from the
  GGUF, token for token llama.cpp's; ``og.Tokenizer`` adds no BOS and decodes only to text, and a
  token may hold part of a UTF-8 character), and each token's bytes as llama.cpp prints them.
- Sampling: llama.cpp's chain on the logits in NumPy (logit bias, repetition/frequency/presence
  penalties over the last 64 generated tokens, then greedy, or top-k → top-p → min-p →
  temperature → a seeded draw), so every ``SamplingParams`` field means what it means on the
  llama backend. onnxruntime-genai's own search cannot bias logits, has no min-p and no
  presence/frequency penalty, and penalizes the prompt too.

KV state: onnxruntime-genai 0.18 can read its cache (``get_output("present.N.key")``) but offers
no way to load one into a generator. So ``export_state`` carries the *tokens* (and the model's
fingerprint), not the keys and values, and ``import_state`` evaluates them again: honest, exact
(the same tokens through the same graph), small and portable across machines and execution
providers, but importing costs a prefill instead of a memory copy.

A ``.gguf`` model is converted on first use to a cached folder (``edgeserve convert MODEL --to
onnx`` does the same ahead of time); a folder model (one with ``genai_config.json``) loads as is.

Invariant: ``self._tokens`` lists exactly the tokens whose keys and values are in the generator;
``self._live`` says whether the generator's logits are those after the last of them;
``self._pending`` holds an imported state's last token until a prefill evaluates it.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import BackendError, KVStateError, ModelNotFoundError
from edgeserve.settings import ModelSettings
from edgeserve.types import Capabilities, ResolvedModel, SamplingParams

from ._common import common_prefix, converted_folder, pack_state, unpack_state
from ._hf import FolderTokenizer, read_json

log = logging.getLogger(__name__)

STATE_MAGIC = b"EDGESERVE-ONNX-TOKENS1\n"
#: How far back the repetition/frequency/presence penalties look, in tokens (as the llama backend).
PENALTY_LAST_N = 64
#: Execution providers in order of preference, as onnxruntime-genai names them, each with the
#: check that says this install can run it.
_PROVIDERS = (("cuda", "is_cuda_available"), ("dml", "is_dml_available"), ("webgpu", "is_webgpu_available"))


def load(model: ResolvedModel, settings: ModelSettings) -> OnnxBackend:
    return OnnxBackend(model, model_folder(model, settings), settings)


def execution_providers() -> list[str]:
    """Execution providers this onnxruntime-genai install can run, best first (``cpu`` always)."""
    import onnxruntime_genai as og  # type: ignore[import-untyped]

    return [name for name, check in _PROVIDERS if getattr(og, check, lambda: False)()] + ["cpu"]


def model_folder(model: ResolvedModel, settings: ModelSettings) -> Path:
    return converted_folder(model, settings, "onnx")


class OnnxBackend:
    def __init__(self, model: ResolvedModel, folder: Path, settings: ModelSettings) -> None:
        import onnxruntime_genai as og

        genai = read_json(folder / "genai_config.json")
        if not genai:
            raise ModelNotFoundError(f"{folder} has no genai_config.json; convert the model with `edgeserve convert`")
        self._og = og
        spec = genai["model"]
        decoder = spec["decoder"]
        sliding = dict(decoder.get("sliding_window") or {})
        window = int(sliding.get("window_size") or 0)
        context = int(spec.get("context_length") or settings.n_ctx)
        self._n_ctx = min(settings.n_ctx, context)
        # onnxruntime-genai refuses a max_length shorter than the sliding window; the engine still
        # holds requests to n_ctx.
        self._max_length = min(max(self._n_ctx, window), context)
        overlay: dict[str, Any] = {
            "session_options": {"intra_op_num_threads": settings.threads, "inter_op_num_threads": 1}
        }
        if window:
            # The sliding-window layers keep a ring of window + cache_slack positions (slack 16 as
            # built): past it, rewind_to refuses, and every prompt that shares a prefix longer than
            # that would be evaluated from scratch. Slack for the whole context keeps every position
            # (as llama.cpp's full-size SWA cache does; 30 KB a token for Gemma 3 270M at float32).
            sliding["cache_slack"] = max(int(sliding.get("cache_slack") or 0), self._max_length - window)
            overlay["sliding_window"] = sliding  # an overlay replaces the object, so all of it
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": overlay}}))
        try:
            self._model = og.Model(config)
        except RuntimeError as exc:
            raise BackendError(f"onnxruntime-genai could not load {folder}: {exc}") from exc
        self._n_batch = settings.n_batch
        self._n_vocab = int(spec["vocab_size"])
        # Byte-level BPE is refused: the converter writes SentencePiece vocabularies only, and only
        # those were checked against llama.cpp on this backend.
        self._tokenizer = tok = FolderTokenizer(folder, self._n_vocab, backend="onnx", allow_byte_level=False)
        bos = spec.get("bos_token_id")
        self._bos = int(bos) if bos is not None and tok.adds_bos(default=True) else None
        architecture = str(spec.get("type", ""))
        self._caps = Capabilities(
            backend="onnx",
            model=model.name,
            n_ctx=self._n_ctx,
            n_vocab=self._n_vocab,
            eog_token_ids=tok.eog_ids(spec.get("eos_token_id")),
            bos_token_id=int(bos) if bos is not None else None,
            chat_template=tok.chat_template,
            bos_token=tok.bos_text,
            eos_token=tok.eos_text,
            architecture=architecture.removesuffix("_text"),
            kv_state=True,
            device=str(self._model.device_type).lower(),
        )
        self._fingerprint = {
            "architecture": architecture,
            "n_vocab": self._n_vocab,
            "n_layers": int(decoder.get("num_hidden_layers", 0)),
            "hidden_size": int(decoder.get("hidden_size", 0)),
        }
        self._generator: Any = None
        self._tokens: list[int] = []
        self._pending: list[int] = []
        self._live = False
        self._reset()

    # ---- Backend protocol -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._caps

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self._tokenizer.tokenize(text, self._bos if add_bos else None)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._tokenizer.detokenize(tokens)

    def prefill(self, prompt: Sequence[int], *, reuse: bool = True) -> int:
        prompt = list(prompt)
        self._pending = []
        keep = 0
        if reuse:
            common = common_prefix(self._tokens, prompt)
            if common == len(prompt) == len(self._tokens) and self._live:
                return common  # the whole prompt is evaluated and its logits are live
            # Sampling needs the logits of the prompt's last token, so at least that one runs.
            keep = min(common, len(prompt) - 1)
            if keep < len(self._tokens) and not self._rewind(keep):
                keep = 0
        if keep == 0:
            self._reset()
        # The last token always runs alone, so that a prompt evaluated from scratch and the same
        # prompt served from the cache take the same path: int8/int4 MatMulNBits kernels quantize
        # activations differently for one row than for many (logits differ by up to ~0.4).
        self._extend(prompt[keep:-1])
        self._extend(prompt[-1:])
        return keep

    def decode(self, params: SamplingParams) -> Iterator[int]:
        sample = _Sampler(params, self._n_vocab)
        while True:
            token = sample(self._last_logits())
            yield token
            self._extend([token])

    def export_state(self) -> bytes:
        return pack_state(STATE_MAGIC, self._fingerprint, self._tokens + self._pending)

    def import_state(self, blob: bytes) -> list[int]:
        tokens, payload = unpack_state(
            blob, STATE_MAGIC, self._fingerprint, n_ctx=self._n_ctx, n_vocab=self._n_vocab, what="ONNX Runtime"
        )
        if payload:
            raise KVStateError("corrupt ONNX Runtime state: it carries tokens only")
        # The cache is rebuilt by evaluating the tokens again (see the module docstring). All but
        # the last: the next prefill evaluates that one, as after a llama.cpp state restore.
        self._reset()
        self._extend(tokens[:-1])
        self._pending = tokens[-1:]
        return list(tokens)

    def close(self) -> None:
        self._generator = None
        self._tokens, self._pending, self._live = [], [], False
        self._model = None

    # ---- model steps ------------------------------------------------------------------------

    def _reset(self) -> None:
        og = self._og
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=self._max_length)
        self._generator = og.Generator(self._model, params)
        self._tokens, self._pending, self._live = [], [], False

    def _rewind(self, n: int) -> bool:
        """Drop all but the first ``n`` tokens from the cache; False if it cannot."""
        try:
            self._generator.rewind_to(n)
        except RuntimeError as exc:  # e.g. a sliding-window ring that no longer holds position n
            log.debug("cannot rewind to %d (%s); evaluating from scratch", n, exc)
            return False
        del self._tokens[n:]
        self._live = False
        return True

    def _extend(self, tokens: list[int]) -> None:
        """Evaluate ``tokens``, ``n_batch`` at a time; the logits after the last become live."""
        for i in range(0, len(tokens), self._n_batch):
            chunk = tokens[i : i + self._n_batch]
            self._live = False
            self._generator.append_tokens(np.asarray(chunk, dtype=np.int32))
            self._tokens.extend(chunk)
            self._live = True

    def _last_logits(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        if not self._live:
            raise BackendError("decode needs a prefill first")
        logits: np.ndarray[Any, np.dtype[np.float32]] = self._generator.get_logits()[0, -1]  # [n_vocab]
        return logits


class _Sampler:
    """llama.cpp's sampler chain over NumPy logits, in the llama backend's order. Penalties look at
    the tokens this call generated (the llama backend's sampler sees only those too)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.p = params
        self.history: collections.deque[int] = collections.deque(maxlen=PENALTY_LAST_N)
        self.penalize = params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
        self.bias: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            self.bias = (np.array(ids), np.array([params.logit_bias[i] for i in ids], dtype=np.float32))
        seed = params.seed if params.seed is not None else random.randrange(2**32 - 1)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray[Any, Any]) -> int:
        p = self.p
        if self.bias is not None or (self.penalize and self.history):
            logits = np.array(logits, dtype=np.float32)  # a copy: the runtime's buffer stays as it is
        if self.bias is not None:
            np.add.at(logits, self.bias[0], self.bias[1])
        if self.penalize and self.history:
            counts = collections.Counter(self.history)
            ids = np.fromiter(counts, dtype=np.int64)
            n = np.fromiter(counts.values(), dtype=np.float32)
            seen = logits[ids]
            if p.repetition_penalty != 1:
                seen = np.where(seen <= 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
            logits[ids] = seen - n * p.frequency_penalty - p.presence_penalty
        token = int(np.argmax(logits)) if p.greedy else self._draw(logits)
        self.history.append(token)
        return token

    def _draw(self, logits: np.ndarray[Any, Any]) -> int:
        p = self.p
        ids = None  # candidate ids, when fewer than the vocabulary
        cand = logits.astype(np.float64)
        if 0 < p.top_k < cand.size:
            ids = np.argpartition(-cand, p.top_k - 1)[: p.top_k]
            cand = cand[ids]
        if p.top_p < 1:
            order = np.argsort(-cand, kind="stable")
            cand = cand[order]
            ids = order if ids is None else ids[order]
            probs = _softmax(cand)
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = max(int(np.sum(np.cumsum(probs) - probs < p.top_p)), 1)
            cand, ids = cand[:keep], ids[:keep]
        if p.min_p > 0:
            kept = np.flatnonzero(cand >= cand.max() + math.log(p.min_p))
            cand = cand[kept]
            ids = kept if ids is None else ids[kept]
        cdf = np.cumsum(_softmax(cand / p.temperature))
        pick = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), cand.size - 1)
        return pick if ids is None else int(ids[pick])


def _softmax(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    e = np.exp(x - x.max())
    out: np.ndarray[Any, Any] = e / e.sum()
    return out


# ---- helpers --------------------------------------------------------------------------------
