"""A GGUF's SentencePiece vocabulary as a Hugging Face ``tokenizer.json``, built with ``tokenizers``
alone (no transformers, no torch), tokenizing exactly as llama.cpp does.

llama.cpp's SPM tokenizer first cuts the text at control and user-defined tokens (longest first),
then merges adjacent symbols greedily, always the pair whose merged piece scores highest, and
spells a piece missing from the vocabulary as ``<0xNN>`` byte tokens. A BPE model whose merges are
every split of every vocabulary piece, ranked by that piece's score, with byte fallback and the
control/user-defined tokens as added tokens, does the same; ``tests/test_convert.py`` checks the
two agree token for token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeserve.errors import UserError

# SentencePiece token types as GGUF stores them (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space

#: Token texts that end a turn although the model file may not flag them: llama.cpp treats these
#: as end-of-generation (and as control tokens, which print as nothing), so edgeserve does too.
EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "</s>",
    }
)


@dataclass(frozen=True)
class SpmVocab:
    """The tokenizer part of a GGUF's metadata."""

    tokens: Sequence[str]
    scores: Sequence[float]
    types: Sequence[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    #: Further end-of-generation ids the file names (EOT, EOM).
    extra_eog_ids: tuple[int, ...] = ()
    add_bos: bool = True
    add_space_prefix: bool = False
    chat_template: str | None = None

    def eog_ids(self) -> list[int]:
        ids = {i for i in (self.eos_id, *self.extra_eog_ids) if i is not None}
        ids |= {i for i, t in enumerate(self.tokens) if t in EOG_TEXTS}
        return sorted(ids)

    def special_ids(self) -> set[int]:
        """Control tokens: parsed from text as whole tokens, printed as nothing."""
        return {i for i, ty in enumerate(self.types) if ty in (CONTROL, UNKNOWN)} | set(self.eog_ids())


def build(vocab: SpmVocab) -> Any:
    """The ``tokenizers.Tokenizer`` for ``vocab``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if vocab.add_space_prefix:
        # Llama-2-style vocabularies prepend a space after every special token; not checked
        # against llama.cpp yet, so refused rather than done approximately.
        raise UserError("converting a SentencePiece vocabulary with add_space_prefix is not supported yet")
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    if len(ids) != len(vocab.tokens):
        raise UserError("the GGUF vocabulary has duplicate tokens; it cannot become a tokenizer.json")
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    model = models.BPE(vocab=ids, merges=_merges(vocab, ids), unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    special = vocab.special_ids()
    tok.add_tokens(
        [
            AddedToken(t, special=i in special, normalized=False)
            for i, t in enumerate(vocab.tokens)
            if i in special or vocab.types[i] == USER_DEFINED
        ]
    )
    if vocab.add_bos and vocab.bos_id is not None:
        bos = vocab.tokens[vocab.bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)]
        )
    return tok


def _merges(vocab: SpmVocab, ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every way to build a normal piece from two vocabulary pieces, best-scoring result first."""
    ranked = []
    for piece, pid in ids.items():
        if vocab.types[pid] != NORMAL:
            continue
        score = vocab.scores[pid]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def write(vocab: SpmVocab, folder: Path, *, n_ctx: int) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``folder``."""
    build(vocab).save(str(folder / "tokenizer.json"))

    def text(i: int | None) -> str | None:
        return vocab.tokens[i] if i is not None else None

    names = {
        "bos_token": text(vocab.bos_id),
        "eos_token": text(vocab.eos_id),
        "unk_token": text(vocab.unk_id),
        "pad_token": text(vocab.pad_id),
    }
    names = {k: v for k, v in names.items() if v is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": n_ctx,
    }
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False) + "\n")
