"""GGUF → a Hugging Face-format folder: ``config.json``, float32 ``model.safetensors``, tokenizer
files. The common ground other runtimes load (mlx-lm reads it as is; ONNX Runtime GenAI's model
builder takes it as its input).

Weights are dequantized with the ``gguf`` package and kept in float32, so the folder holds exactly
the values llama.cpp computes with; they stream to disk one tensor at a time (memory stays at the
size of the largest tensor, not the model).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import InvalidParameterError, UserError

from . import archs, tokenizer
from .progress import Report

#: Metadata arrays read on their own (large, and not config).
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def folder_name(options: Mapping[str, Any]) -> str:
    if options:
        raise InvalidParameterError(f"the hf format takes no options (got {', '.join(options)})", param="to")
    return "hf"


def build(gguf_path: Path, out: Path, options: Mapping[str, Any], report: Report) -> None:
    import gguf

    report("reading GGUF", 0, 0)
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in _VOCAB_KEYS}
    arch = archs.get(str(meta.get("general.architecture", "")))
    vocab = _vocab(reader, meta)
    tensors = {arch.hf_name(t.name): t for t in reader.tensors}
    config = arch.config(meta, len(vocab.tokens))
    config.update(
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eog_ids(),
        pad_token_id=vocab.pad_id,
        torch_dtype="float32",
    )

    def produce(name: str) -> np.ndarray[Any, Any]:
        t = tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        return arch.fix(name, np.asarray(data, dtype=np.float32))

    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in tensors.items()}
    write_safetensors(out / "model.safetensors", shapes, produce, report)
    report("tokenizer", 0, 1)
    tokenizer.write(vocab, out, n_ctx=int(config["max_position_embeddings"]))
    report("tokenizer", 1, 1)
    generation = {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.eog_ids(), "pad_token_id": vocab.pad_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _vocab(reader: Any, meta: dict[str, Any]) -> tokenizer.SpmVocab:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise UserError(f"converting a GGUF with a {kind!r} tokenizer is not supported yet (SentencePiece only)")

    def ids(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None else None

    return tokenizer.SpmVocab(
        tokens=reader.fields["tokenizer.ggml.tokens"].contents(),
        scores=[float(s) for s in reader.fields["tokenizer.ggml.scores"].contents()],
        types=[int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()],
        bos_id=ids("bos_token_id"),
        eos_id=ids("eos_token_id"),
        unk_id=ids("unknown_token_id"),
        pad_id=ids("padding_token_id"),
        extra_eog_ids=tuple(i for i in (ids("eot_token_id"), ids("eom_token_id")) if i is not None),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        chat_template=meta.get("tokenizer.chat_template") or None,
    )


def write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    produce: Callable[[str], np.ndarray[Any, Any]],
    report: Report,
) -> None:
    """A float32 safetensors file written tensor by tensor: the header first (shapes are known up
    front), then each tensor as ``produce(name)`` makes it."""
    names = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    # Reported in bytes written: tensors differ 1000-fold in size (the embedding is most of it).
    report("dequantizing", 0, offset, "B")
    written = 0
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name in names:
            array = np.ascontiguousarray(produce(name), dtype="<f4")
            if array.shape != shapes[name]:
                raise UserError(f"tensor {name} dequantized to {array.shape}, expected {shapes[name]}")
            f.write(array.tobytes())
            written += array.nbytes
            report("dequantizing", written, offset, "B")
