"""A Hugging Face folder → an ONNX Runtime GenAI model folder, built by onnxruntime-genai's own
model builder (``onnxruntime_genai.models.builder``), offline.

The builder cannot read this project's GGUFs itself (float GGUFs only, no Gemma 3), so it reads the
``hf`` folder (float32 weights dequantized from the GGUF). It runs in a child process: it imports
torch and transformers (hundreds of MB, never needed at serve time), prints freely, and appends to
``sys.path``; a child keeps all of that out of the process that asked for the conversion, and its
output lines drive the progress bar.

Two adjustments make it work here:

- transformers 5 reads Gemma 3's rope settings into a nested ``rope_parameters`` dict
  (``{"full_attention": {...}, "sliding_attention": {...}}``); the builder expects the flat
  ``{"rope_type": ...}`` form plus ``rope_local_base_freq`` (``KeyError: 'rope_type'`` otherwise),
  so the loaded config is flattened before the graph is made.
- ``prune_lm_head``: prefill computes the logits of its last token only. The output layer
  (640 × 262,144 for Gemma 3 270M) is the costliest matmul of a small model, and the unpruned graph
  returns [tokens, vocabulary] float32 logits (1 GiB per 1,000 prompt tokens) only to drop them.

Precisions: ``fp32`` keeps the dequantized GGUF weights exactly (what llama.cpp computes with);
``int4`` re-quantizes them with the builder's round-to-nearest 4-bit blocks, a second rounding on
top of the GGUF's own: 4.5x smaller and faster on a CPU, but further from llama.cpp (see
``tests/test_onnx.py`` for the measured agreement of each).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeserve.errors import BackendError, BackendNotInstalledError, InvalidParameterError

from .progress import Report

PRECISIONS = ("int4", "int8", "fp32")
DEFAULT_PRECISION = "int8"
#: Execution providers the builder targets, by the name onnxruntime-genai gives them.
BUILD_TARGETS = ("cpu", "cuda", "dml")
#: Files copied from the HF folder over the builder's: its tokenizer_config.json is re-saved by
#: transformers, which drops ``add_bos_token`` and the chat template.
HF_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
)
#: What the builder needs besides onnxruntime-genai (none of them declared by it).
BUILDER_NEEDS = ("torch", "transformers", "onnx_ir")


def _options(options: Mapping[str, Any]) -> tuple[str, str]:
    unknown = set(options) - {"precision", "target"}
    if unknown:
        raise InvalidParameterError(f"the onnx format does not take {', '.join(sorted(unknown))}", param="to")
    precision = options.get("precision") or DEFAULT_PRECISION
    target = options.get("target") or default_target()
    if precision not in PRECISIONS:
        raise InvalidParameterError(f"precision must be one of {', '.join(PRECISIONS)}", param="precision")
    if target not in BUILD_TARGETS:
        raise InvalidParameterError(f"target must be one of {', '.join(BUILD_TARGETS)}", param="target")
    return precision, target


def default_target() -> str:
    """The execution provider to build for: the GPU one this onnxruntime-genai install can run
    (the CUDA or DirectML package), else the CPU."""
    import onnxruntime_genai as og  # type: ignore[import-untyped]

    if og.is_cuda_available():
        return "cuda"
    if og.is_dml_available():
        return "dml"
    return "cpu"


def folder_name(options: Mapping[str, Any]) -> str:
    precision, target = _options(options)
    return f"onnx-{precision}-{target}"


def build(source: Path, out: Path, options: Mapping[str, Any], report: Report) -> None:
    precision, target = _options(options)
    missing = [m for m in BUILDER_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendNotInstalledError(
            f"building an ONNX model needs {', '.join(missing)}: pip install 'edgeserve[onnx]'"
        )
    cache = out / ".builder-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    cmd = [sys.executable, "-m", __name__, str(source), str(out), precision, target, str(cache)]
    report("starting the model builder", 0, 0)
    tail: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
    ) as proc:
        assert proc.stdout is not None
        _follow(proc.stdout, report, tail, _layer_count(source))
        code = proc.wait()
    if code != 0:
        raise BackendError(f"onnxruntime-genai's model builder failed ({code}):\n" + "\n".join(tail[-20:]))
    shutil.rmtree(cache, ignore_errors=True)
    for name in HF_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)


def _layer_count(source: Path) -> int:
    config = json.loads((source / "config.json").read_text())
    return int(config.get("num_hidden_layers", 0))


_LAYER = re.compile(r"Reading (?:decoder )?layer (\d+)")


def _follow(lines: Any, report: Report, tail: list[str], n_layers: int) -> None:
    """Turn the builder's output into progress stages; keep the last lines for an error message."""
    quantized = 0
    for raw in lines:
        for line in raw.replace("\r", "\n").splitlines():
            tail.append(line)
            del tail[:-50]
            if m := _LAYER.search(line):
                report("making the graph", int(m.group(1)) + 1, n_layers)
            elif "complete quantization of" in line:
                quantized += 1
                report("quantizing weights", quantized, 0)
            elif line.startswith("Saving GenAI config"):
                report("writing the model", 0, 0)


# ---- the child process ----------------------------------------------------------------------


def _flatten_rope(config: Any) -> None:
    """transformers 5's per-layer-type rope settings → the flat form the builder reads."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "full_attention" not in params:
        return
    full = dict(params["full_attention"])
    local = params.get("sliding_attention", full)
    config.rope_parameters = full
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = local["rope_theta"]


def _run_builder(source: str, out: str, precision: str, target: str, cache: str) -> None:
    from onnxruntime_genai.models import builder  # type: ignore[import-untyped]

    extra = ["prune_lm_head=true"]
    options = builder.parse_extra_options(None, source, out, precision, target, cache, extra)
    _flatten_rope(options["hf_details"]["hf_config"])
    builder.create_model(None, source, out, precision, target, cache, **options)


if __name__ == "__main__":
    _run_builder(*sys.argv[1:6])
