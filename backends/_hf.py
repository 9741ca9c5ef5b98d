"""A Hugging Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``, as edgeserve's
converter writes them) read the way llama.cpp reads a GGUF vocabulary. Shared by the MLX and ONNX
Runtime backends, whose models come from the same conversion and must tokenize and print exactly as
the llama backend does."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeserve.errors import ModelNotFoundError, UserError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class FolderTokenizer:
    def __init__(self, folder: Path, n_vocab: int, *, backend: str, allow_byte_level: bool = True) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{folder} has no tokenizer.json; convert the model with `edgeserve convert`")
        self._tokenizer = Tokenizer.from_file(str(path))
        self._path = path
        self._plain: Any = None
        self._plain_lock = threading.Lock()
        self.config = read_json(folder / "tokenizer_config.json")
        self.vocab: dict[str, int] = self._tokenizer.get_vocab()
        self.pieces = _token_pieces(self._tokenizer, n_vocab, backend, allow_byte_level)
        self.bos_text = token_text(self.config.get("bos_token")) or ""
        self.eos_text = token_text(self.config.get("eos_token")) or ""
        self.chat_template: str | None = self.config.get("chat_template") or None

    def adds_bos(self, default: bool) -> bool:
        return bool(self.config.get("add_bos_token", default))

    def eog_ids(self, eos_token_id: object) -> frozenset[int]:
        """The model config's EOS id(s) plus the tokenizer's EOS token."""
        ids: list[Any] = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        eog = {int(i) for i in ids if i is not None}
        if self.eos_text in self.vocab:
            eog.add(self.vocab[self.eos_text])
        return frozenset(eog)

    def tokenize(self, text: str, bos: int | None, *, special: bool = True) -> list[int]:
        """With ``special=False``, special-token text is tokenized as plain text (user content)."""
        tokenizer = self._tokenizer if special else self._plain_tokenizer()
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False).ids
        return [bos, *ids] if bos is not None else ids

    def _plain_tokenizer(self) -> Any:
        # A second instance, not a toggled flag: callers tokenize from many threads at once.
        with self._plain_lock:
            if self._plain is None:
                from tokenizers import Tokenizer

                plain = Tokenizer.from_file(str(self._path))
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        pieces = self.pieces
        return b"".join(pieces[t] if 0 <= t < len(pieces) else b"" for t in tokens)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def token_text(value: object) -> str | None:
    """``tokenizer_config.json`` writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_pieces(tokenizer: Any, n_vocab: int, backend: str, allow_byte_level: bool) -> list[bytes]:
    """Each token's bytes as llama.cpp prints it: special tokens as nothing, ``<0xNN>`` as that byte,
    SentencePiece's ``▁`` as a space; byte-level BPE vocabularies mapped back to bytes where allowed."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    if byte_level and not allow_byte_level:
        raise UserError(f"the {backend} backend reads SentencePiece tokenizers only (this one is byte-level BPE)")
    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    pieces = [b""] * n_vocab
    for text, i in tokenizer.get_vocab().items():
        if i >= n_vocab or text in special:
            continue
        if byte_level and all(c in unicode_to_byte for c in text):
            pieces[i] = bytes(unicode_to_byte[c] for c in text)
        elif byte_level:
            pieces[i] = text.encode()
        elif m := _BYTE_PIECE.fullmatch(text):
            pieces[i] = bytes([int(m.group(1), 16)])
        else:
            pieces[i] = text.replace("\u2581", " ").encode()
    return pieces


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
