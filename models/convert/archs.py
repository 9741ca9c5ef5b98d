"""What each GGUF architecture is in Hugging Face terms: the config.json it becomes and the name
(and fix-up) of every tensor. One entry per architecture, looked up by ``general.architecture``.

Only architectures whose converted output was checked against llama.cpp are listed; adding one
is adding an ``Arch`` (and a test that its logits agree with llama.cpp's).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from edgeserve.errors import UserError

if TYPE_CHECKING:  # numpy is imported where tensors are converted, not by `supported()`
    import numpy as np

Meta = Mapping[str, Any]


@dataclass(frozen=True)
class Arch:
    name: str
    #: GGUF metadata (and the vocabulary size) → config.json.
    config: Callable[[Meta, int], dict[str, Any]]
    #: GGUF tensor name (``blk.3.attn_q``, no ``.weight``) → HF name, for per-block tensors.
    block_tensors: Mapping[str, str]
    global_tensors: Mapping[str, str]
    #: (HF name, float32 array) → the array as Hugging Face stores it.
    fix: Callable[[str, np.ndarray[Any, Any]], np.ndarray[Any, Any]]

    def hf_name(self, gguf_name: str) -> str:
        base, _, suffix = gguf_name.rpartition(".")
        if m := re.fullmatch(r"blk\.(\d+)\.(.+)", base):
            hf = self.block_tensors.get(m.group(2))
            if hf is not None:
                return f"model.layers.{m.group(1)}.{hf}.{suffix}"
        elif base in self.global_tensors:
            return f"{self.global_tensors[base]}.{suffix}"
        raise UserError(f"{self.name}: the GGUF tensor {gguf_name!r} has no Hugging Face counterpart here")


# ---- Gemma 3 ----------------------------------------------------------------------------------


def _gemma3_config(meta: Meta, n_vocab: int) -> dict[str, Any]:
    a = "gemma3"
    n_layer = int(meta[f"{a}.block_count"])
    hidden = int(meta[f"{a}.embedding_length"])
    n_head = int(meta[f"{a}.attention.head_count"])
    head_dim = int(meta.get(f"{a}.attention.key_length", hidden // n_head))
    # Neither is in the GGUF; llama.cpp hard-codes both for Gemma 3 (as does the HF config).
    pattern, local_base = 6, 10_000.0
    rope_scaling = None
    if meta.get(f"{a}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta[f"{a}.rope.scaling.factor"])}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(meta[f"{a}.feed_forward_length"]),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(f"{a}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta[f"{a}.attention.layer_norm_rms_epsilon"]),
        "vocab_size": n_vocab,
        "max_position_embeddings": int(meta[f"{a}.context_length"]),
        # Flat rope settings (not transformers 5's nested rope_parameters): every reader of
        # Gemma 3 configs understands these, ONNX Runtime GenAI's model builder included.
        "rope_theta": float(meta.get(f"{a}.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": local_base,
        "rope_scaling": rope_scaling,
        "sliding_window": int(meta[f"{a}.attention.sliding_window"]),
        "sliding_window_pattern": pattern,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)],
        # Gemma 3 scales queries by head_dim**-0.5, except the 27B (62 layers): hidden / heads.
        "query_pre_attn_scalar": hidden // n_head if n_layer == 62 else head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def _gemma_fix(name: str, w: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's converter stores 1 + weight.
    return w - w.dtype.type(1) if name.endswith("norm.weight") else w


GEMMA3 = Arch(
    name="gemma3",
    config=_gemma3_config,
    block_tensors={
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    global_tensors={"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    fix=_gemma_fix,
)

ARCHS: dict[str, Arch] = {a.name: a for a in (GEMMA3,)}


def get(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise UserError(
            f"converting a {name!r} GGUF is not supported (supported: {', '.join(sorted(ARCHS))}); "
            "use the llama backend for it"
        ) from None


def supported(gguf_path: Path) -> bool:
    """Whether ``gguf_path`` is a GGUF this converter can turn into an HF/MLX folder (read from the
    file header in well under a millisecond; ``gguf.GGUFReader`` parses the whole vocabulary)."""
    return gguf_architecture(gguf_path) in ARCHS


# Byte sizes of GGUF scalar value types (gguf.GGUFValueType), by type id; 8 is a string, 9 an array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file, or None if it is not one (or does not say)."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return None
            _version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            for _ in range(n_kv):
                key = _string(f)
                (kind,) = struct.unpack("<I", f.read(4))
                if key == "general.architecture" and kind == 8:
                    return _string(f)
                skip_gguf_value(f, kind)
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return None


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8")


def skip_gguf_value(f: BinaryIO, kind: int) -> None:
    """Move past one GGUF metadata value of type ``kind`` without decoding it (arrays included)."""
    if kind == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif kind == 9:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _SCALAR_SIZES:
            f.seek(count * _SCALAR_SIZES[item], 1)
        else:
            for _ in range(count):
                skip_gguf_value(f, item)
    elif kind in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[kind], 1)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")
