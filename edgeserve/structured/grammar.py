"""Grammars as a logits mask: a model's vocabulary as llguidance sees it, grammars compiled once per
schema (LRU), and the ``Constraint`` each constrained request carries.

Why llguidance (and not XGrammar or outlines-core), as measured on this 2-core x86_64 CPU with
Gemma 3's 262,144-token vocabulary:

- It installs alone: one Rust wheel with no dependencies (NumPy is optional). XGrammar 0.2.8 pulls
  torch, transformers and triton (``pip install --dry-run xgrammar``), a multi-GB install for every
  user of the default backend; outlines-core builds its index from a Hugging Face tokenizer.
- Its tokenizer is built from plain bytes per token id, which every backend gives
  (``Backend.detokenize``): ~0.5 s to read the vocabulary through llama.cpp, ~1 s for llguidance
  to index it, once per model.
- A mask costs tens to hundreds of microseconds (it computes masks lazily over a token trie, with no
  ahead-of-time automaton per schema), so compiling a schema is milliseconds and a fresh schema per
  request stays cheap; the bench (``bench/structured.py``) has the figures.
- Its Lark dialect inlines JSON schemas (``%json {...}``), which is what tool calling needs: free
  text *or* a call whose arguments follow the tool's schema.
- Unsupported schema keywords are errors that name them (``Unimplemented keys: ["not"]``), which is
  what a 400 must say.

The llama backend applies the same mask before its native sampler chain, rather than llama.cpp's
GBNF grammar sampler: one implementation, so every backend behaves identically.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeserve.errors import BackendError, InvalidParameterError

if TYPE_CHECKING:
    import llguidance

#: JSON as the grammar writes it: ``{"a": 1, "b": [2, 3]}``. One space after ``:`` and ``,`` (the
#: spacing models see most in training), and no other whitespace: a free whitespace run lets a small
#: model pad an answer with newlines until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Compiled grammars kept per engine (a template matcher each; requests take deep copies).
CACHE_SIZE = 64


class Vocabulary:
    """A model's tokens for llguidance, built once per loaded model from the backend's own
    ``detokenize`` (so the grammar sees exactly the bytes the text stream will)."""

    def __init__(
        self,
        n_vocab: int,
        eog_token_ids: Sequence[int],
        bos_token_id: int | None,
        detokenize: Callable[[Sequence[int]], bytes],
        tokenize: Callable[[str], list[int]],
    ) -> None:
        import llguidance

        self.n_vocab = n_vocab
        # Special tokens detokenize to b"" in every backend: llguidance never allows an empty
        # token, so a control token (<start_of_turn>) can never appear inside a constrained answer.
        tokens = [detokenize((i,)) for i in range(n_vocab)]
        eog = sorted(eog_token_ids)

        class _Tokenizer:  # what llguidance.TokenizerWrapper reads
            def __init__(self) -> None:
                self.tokens = tokens
                self.eos_token_id = eog[0] if eog else 0
                self.bos_token_id = bos_token_id
                self.special_token_ids: list[int] = []

            def __call__(self, text: str) -> list[int]:
                # llguidance tokenizes forced text (``{"name": ``) to allow only its canonical tokens.
                if not isinstance(text, str):
                    raise TypeError("text only")  # tells TokenizerWrapper to pass str, not bytes
                return tokenize(text)

        self.tokenizer: llguidance.LLTokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Tokenizer()), n_vocab=n_vocab, eos_token=eog or None
        )


class GrammarConstraint:
    """One request's grammar state (``edgeserve.backend.Constraint``): request state like its
    sampler, so a parked request resumes mid-JSON exactly where it stopped.

    The next mask is computed ahead, on the compiler's worker thread, from the moment a token is
    accepted: it overlaps the model's forward pass over that token (llguidance drops the GIL), so
    ``mask`` mostly only applies it. A string with a ``maxLength`` costs a few milliseconds a mask
    on Gemma 3's vocabulary (no precomputed slice fits it), as much as a third of a decode step.
    One thread at a time touches the matcher: the worker from ``accept`` to the next ``mask``,
    the caller otherwise; ``done`` is read once per token, in ``accept``, for the same reason."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int, worker: Executor | None = None) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._worker = worker
        #: One bit per token, little-endian within each 32-bit word (llguidance's layout).
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._done = matcher.is_stopped()
        self._ahead = self._start()

    def _forbidden(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """True for every token the grammar forbids next."""
        m = self._matcher
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)  # drops the GIL
        if m.is_error():
            raise BackendError(f"the output grammar failed: {m.get_error()}")
        allowed = np.unpackbits(self._bits.view(np.uint8), count=self._n_vocab, bitorder="little").view(np.bool_)
        return ~allowed

    def _start(self) -> Future[np.ndarray[Any, np.dtype[np.bool_]]] | None:
        if self._worker is None or self._done:
            return None
        try:
            return self._worker.submit(self._forbidden)
        except RuntimeError:  # the worker was shut down (engine closing): compute in place
            return None

    def _settle(self) -> np.ndarray[Any, np.dtype[np.bool_]] | None:
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.cancelled():  # cancelled: the worker shut down before it ran
            return None
        return ahead.result()

    def mask(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        forbidden = self._settle()
        if forbidden is None:
            forbidden = self._forbidden()
        n = min(logits.shape[-1], self._n_vocab)
        np.copyto(logits[:n], np.float32(-np.inf), where=forbidden[:n])
        logits[n:] = -np.inf  # a row padded past the vocabulary: no token there

    def accept(self, token: int) -> None:
        with contextlib.suppress(BackendError):  # a mask not applied: the next one raises it
            self._settle()
        if not self._matcher.consume_token(token):
            raise BackendError(f"token {token} broke the output grammar: {self._matcher.get_error()}")
        self._done = self._matcher.is_stopped()
        self._ahead = self._start()

    @property
    def done(self) -> bool:
        # Stopped: nothing but an end-of-generation token may follow (a closed JSON value, a call).
        return self._done

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()


class GrammarCompiler:
    """Grammars to template matchers, cached per grammar text (LRU). Thread-safe: requests are
    prepared on callers' threads. The vocabulary is built on first use (about 1.5 s for Gemma 3)."""

    def __init__(self, make_vocabulary: Callable[[], Vocabulary], cache_size: int = CACHE_SIZE) -> None:
        self._make_vocabulary = make_vocabulary
        self._vocabulary: Vocabulary | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self.hits = 0
        self.misses = 0

    @property
    def vocabulary(self) -> Vocabulary:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = self._make_vocabulary()
            return self._vocabulary

    def constraint(self, grammar: str, param: str) -> GrammarConstraint:
        """A fresh constraint for ``grammar`` (llguidance's JSON grammar text); an
        ``InvalidParameterError`` on ``param`` if the grammar engine cannot enforce it."""
        vocabulary = self.vocabulary
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
        if template is None:
            template = self._compile(grammar, vocabulary, param)
            with self._lock:
                self.misses += 1
                self._cache[grammar] = template
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeserve-grammar")
            worker = self._worker
        return GrammarConstraint(template.deep_copy(), vocabulary.n_vocab, worker)

    def close(self) -> None:
        """Stop the mask worker (constraints still alive then compute their masks in place)."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _compile(grammar: str, vocabulary: Vocabulary, param: str) -> llguidance.LLMatcher:
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, vocabulary.tokenizer)
        if failed:
            raise InvalidParameterError(f"{param}: the grammar engine cannot enforce it: {messages[0]}", param=param)
        matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidParameterError(f"{param}: {matcher.get_error()}", param=param)
        return matcher


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """llguidance's grammar text for one JSON schema, written in ``JSON_STYLE``."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), overrides=JSON_STYLE)  # type: ignore[arg-type]


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def inline_schema(schema: dict[str, Any]) -> str:
    """A schema to inline in a Lark grammar (``%json {...}``), written in ``JSON_STYLE``."""
    return json.dumps({**closed(schema), "x-guidance": JSON_STYLE})


#: Keywords whose value is one subschema, or a list / map of them.
_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_LIST = ("prefixItems", "anyOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties
    and says nothing about others (XGrammar's ``strict_mode``, and what OpenAI's strict schemas
    spell out): a small model otherwise invents keys until max_tokens. Every answer still follows
    the caller's schema. ``allOf`` members stay open (closing each would refuse the others' keys)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    for key in _ONE:
        if key in out:
            out[key] = closed(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    return out
