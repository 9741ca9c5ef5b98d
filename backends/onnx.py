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
- Sampling: ``edgeserve.sampling``, llama.cpp's chain on the logits in NumPy, so every
  ``SamplingParams`` field means what it means on the llama backend. onnxruntime-genai's own
  search cannot bias logits, has no min-p and no presence/frequency penalty, and penalizes the
  prompt too.

Sequences and KV state: one generator per open sequence (up to ``MAX_SEQUENCES``).
onnxruntime-genai 0.18 can read its cache (``get_output("present.N.key")``) but offers no way to
load one into a generator. So parking carries the *tokens* and how they were batched (and the
model's fingerprint), not the keys and values, and restoring evaluates them again in the same
batches: the same tokens through the same kernels at the same batch shapes give the same cache,
so a resumed sequence continues exactly. Small and portable across machines and execution
providers, but a restore costs a prefill (and a replay of every generated token, one at a time)
instead of a memory copy; the engine keeps sequences open rather than parked while slots allow.

A ``.gguf`` model is converted on first use to a cached folder (``edgeserve convert MODEL --to
onnx`` does the same ahead of time); a folder model (one with ``genai_config.json``) loads as is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeserve.backend import SeqId, Step
from edgeserve.errors import BackendError, KVStateError, ModelNotFoundError
from edgeserve.sampling import Sampler
from edgeserve.settings import ModelSettings
from edgeserve.types import Capabilities, ResolvedModel, SamplingParams

if TYPE_CHECKING:
    from edgeserve.progress import ProgressCallback

from ._common import Sequences, common_prefix, converted_folder, pack_state, unpack_state
from ._hf import FolderTokenizer, read_json

log = logging.getLogger(__name__)

STATE_MAGIC = b"EDGESERVE-ONNX-TOKENS2\n"
#: Sequences open at once, one generator each. Each holds a cache for the whole context
#: (cache_slack below), so this bounds the backend's memory.
MAX_SEQUENCES = 2
#: Execution providers in order of preference, as onnxruntime-genai names them, each with the
#: check that says this install can run it.
_PROVIDERS = (("cuda", "is_cuda_available"), ("dml", "is_dml_available"), ("webgpu", "is_webgpu_available"))


def load(model: ResolvedModel, settings: ModelSettings, progress: ProgressCallback | None = None) -> OnnxBackend:
    return OnnxBackend(model, model_folder(model, settings, progress), settings)


def execution_providers() -> list[str]:
    """Execution providers this onnxruntime-genai install can run, best first (``cpu`` always)."""
    import onnxruntime_genai as og  # type: ignore[import-untyped]

    return [name for name, check in _PROVIDERS if getattr(og, check, lambda: False)()] + ["cpu"]


def model_folder(model: ResolvedModel, settings: ModelSettings, progress: ProgressCallback | None = None) -> Path:
    return converted_folder(model, settings, "onnx", progress)


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
            max_sequences=MAX_SEQUENCES,
        )
        self._fingerprint = {
            "architecture": architecture,
            "n_vocab": self._n_vocab,
            "n_layers": int(decoder.get("num_hidden_layers", 0)),
            "hidden_size": int(decoder.get("hidden_size", 0)),
        }
        #: Open sequences (one generator each), and what the last released one left behind: the
        #: prefix cache for the next open.
        self._seqs: Sequences[_Seq] = Sequences(MAX_SEQUENCES)

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
        self._seqs.check_free(seq)
        state = self._seqs.take_residue()
        keep = 0
        if reuse and state is not None:
            # The prompt's last token is always evaluated by the first decode step.
            keep = min(common_prefix(state.tokens, prompt), len(prompt) - 1)
            if keep < len(state.tokens) and not state.rewind(keep):
                keep = 0
        self._seqs.open[seq] = state if keep and state is not None else self._new_seq()
        return keep

    def prefill(self, seq: SeqId, tokens: Sequence[int]) -> None:
        state = self._seqs.get(seq)
        tokens = list(tokens)
        for i in range(0, len(tokens), self._n_batch):
            state.append(tokens[i : i + self._n_batch])

    def decode(self, steps: Sequence[Step]) -> list[int]:
        out = []
        for step in steps:  # one generator per sequence: steps run one after another
            state = self._seqs.get(step.seq)
            # Always alone: a prompt evaluated from scratch and the same prompt served from the
            # cache then take the same path (int8/int4 MatMulNBits kernels quantize activations
            # differently for one row than for many; logits differ by up to ~0.4).
            state.append([step.token])
            logits = state.generator.get_logits()[0, -1]  # [n_vocab]
            if step.constraint is not None:
                logits = np.array(logits, dtype=np.float32)  # a writable copy
                step.constraint.mask(logits)
            out.append(step.sampler(logits))  # type: ignore[operator]
        return out

    def park(self, seq: SeqId) -> bytes:
        state = self._seqs.get(seq)
        del self._seqs.open[seq]
        # The tokens and how they were batched: replaying the same batches gives the same cache.
        blob = pack_state(STATE_MAGIC, self._fingerprint, state.tokens, json.dumps(state.batches).encode())
        self._seqs.residue = state  # still a valid prefix cache until another open takes it
        return blob

    def restore(self, seq: SeqId, blob: bytes) -> list[int]:
        self._seqs.check_free(seq)
        tokens, payload = unpack_state(
            blob, STATE_MAGIC, self._fingerprint, n_ctx=self._n_ctx, n_vocab=self._n_vocab, what="ONNX Runtime"
        )
        batches = _batches(payload, len(tokens))
        state = self._new_seq()
        done = 0
        for size in batches:  # see the module docstring: the cache is rebuilt by evaluating again
            state.append(tokens[done : done + size])
            done += size
        self._seqs.open[seq] = state
        return list(tokens)

    def release(self, seq: SeqId) -> None:
        self._seqs.release(seq)

    def close(self) -> None:
        self._seqs.clear()
        self._model = None

    # ---- sequences --------------------------------------------------------------------------

    def _new_seq(self) -> _Seq:
        og = self._og
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=self._max_length)
        return _Seq(og.Generator(self._model, params))


class _Seq:
    """One generator. Invariant: ``tokens`` lists exactly the tokens whose keys and values are in
    the generator, and ``batches`` how many went in with each ``append_tokens`` call."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.tokens: list[int] = []
        self.batches: list[int] = []

    def append(self, tokens: list[int]) -> None:
        if tokens:
            self.generator.append_tokens(np.asarray(tokens, dtype=np.int32))
            self.tokens.extend(tokens)
            self.batches.append(len(tokens))

    def rewind(self, n: int) -> bool:
        """Drop all but the first ``n`` tokens from the cache; False if it cannot."""
        try:
            self.generator.rewind_to(n)
        except RuntimeError as exc:  # e.g. a sliding-window ring that no longer holds position n
            log.debug("cannot rewind to %d (%s); evaluating from scratch", n, exc)
            return False
        del self.tokens[n:]
        kept, total = [], 0
        for size in self.batches:
            if total >= n:
                break
            kept.append(min(size, n - total))
            total += kept[-1]
        self.batches = kept
        return True


def _batches(payload: bytes, n_tokens: int) -> list[int]:
    try:
        batches = json.loads(payload) if payload else [n_tokens]
    except ValueError:
        batches = None
    if (
        not isinstance(batches, list)
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batches)
        or sum(batches) != n_tokens
    ):
        raise KVStateError("corrupt ONNX Runtime state: its batches do not cover its tokens")
    return batches
