"""A Hugging Face folder → an mlx-lm folder.

mlx-lm loads Hugging Face folders as they are, so the float32 default needs no second copy: the
HF folder is the MLX model. Another dtype (bfloat16 halves memory and suits Metal) or MLX's own
affine quantization (4 or 8 bits, per group of weights) writes a folder of its own.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeserve.errors import InvalidParameterError

from .progress import Report

DTYPES = ("float32", "bfloat16", "float16")
BITS = (4, 8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _options(options: Mapping[str, Any]) -> tuple[str, int | None, int]:
    unknown = set(options) - {"dtype", "quantize", "group_size"}
    if unknown:
        raise InvalidParameterError(f"the mlx format does not take {', '.join(sorted(unknown))}", param="to")
    dtype = options.get("dtype") or "float32"
    bits = options.get("quantize")
    group = options.get("group_size") or 64
    if dtype not in DTYPES:
        raise InvalidParameterError(f"dtype must be one of {', '.join(DTYPES)}", param="dtype")
    if bits is not None and int(bits) not in BITS:
        raise InvalidParameterError(f"quantize must be one of {', '.join(map(str, BITS))} (bits)", param="quantize")
    if group not in (32, 64, 128):
        raise InvalidParameterError("group_size must be 32, 64 or 128", param="group_size")
    if bits is None and options.get("group_size") is not None:
        raise InvalidParameterError("group_size applies only with quantize", param="group_size")
    return dtype, None if bits is None else int(bits), int(group)


def folder_name(options: Mapping[str, Any]) -> str | None:
    dtype, bits, group = _options(options)
    if dtype == "float32" and bits is None:
        return None
    return f"mlx-{dtype}" + (f"-q{bits}g{group}" if bits else "")


def build(source: Path, out: Path, options: Mapping[str, Any], report: Report) -> None:
    import mlx.core as mx
    from mlx_lm import utils

    dtype, bits, group = _options(options)
    report("loading", 0, 0)
    model, config = utils.load_model(source, lazy=True)
    if dtype != "float32":
        model.set_dtype(getattr(mx, dtype))
        config["torch_dtype"] = dtype
    if bits is not None:
        report("quantizing", 0, 0)
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints bits per weight
            model, config = utils.quantize_model(model, config, group, bits)
    report("writing", 0, 0)
    utils.save_model(out, model)
    utils.save_config(config, out / "config.json")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
