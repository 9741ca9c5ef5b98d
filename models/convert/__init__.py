"""Model conversion: a GGUF becomes the folder another runtime loads, once per model, cached.

    GGUF ──hf──▶ Hugging Face folder (config.json, float32 model.safetensors, tokenizer.json)
                   └──mlx──▶ mlx-lm folder: the HF folder itself, or re-typed / MLX-quantized
                   └──onnx──▶ ONNX Runtime GenAI folder, built by its model builder (int8/int4/fp32)

A format is a registry entry naming its module, which is imported only when that format is asked
for (importing this package pulls in no numeric stack). Each module offers
``folder_name(options) -> str | None`` (None: the source folder serves as is) and
``build(source, out, options, report)``; ``report(stage, done, total, unit)`` becomes progress
events (``edgeserve.progress``). Outputs live under
``<cache_dir>/converted/<sha256 of the GGUF>-v<CONVERT_VERSION>/<folder>/``; a folder is built in a
temporary sibling and renamed into place with a stamp, so an interrupted conversion leaves nothing
that looks finished.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeserve.errors import BackendNotInstalledError, InvalidParameterError, ModelNotFoundError
from edgeserve.progress import ProgressCallback, ProgressEvent, format_size, size_on_disk, track

from .progress import Report

__all__ = ["CONVERT_VERSION", "FORMATS", "Format", "convert", "get_format", "source_digest"]

log = logging.getLogger(__name__)

#: Part of every cache key: bumping it rebuilds every converted folder.
CONVERT_VERSION = 1
STAMP = "edgeserve-convert.json"

Options = Mapping[str, Any]


class FormatModule(Protocol):
    def folder_name(self, options: Options) -> str | None: ...

    def build(self, source: Path, out: Path, options: Options, report: Report) -> None: ...


@dataclass(frozen=True)
class Format:
    name: str
    module: str
    #: The import that must succeed to build it, and the extra that brings it.
    requires: str
    extra: str
    #: The format it is built from; None: from the GGUF itself.
    source: str | None
    description: str


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "hf",
            "edgeserve.models.convert.hf",
            "tokenizers",
            "mlx",
            None,
            "Hugging Face folder: config.json, float32 safetensors, tokenizer.json",
        ),
        Format("mlx", "edgeserve.models.convert.mlx", "mlx_lm", "mlx", "hf", "mlx-lm folder, optionally MLX-quantized"),
        Format(
            "onnx",
            "edgeserve.models.convert.onnx",
            "onnxruntime_genai",
            "onnx",
            "hf",
            "ONNX Runtime GenAI folder, built by its model builder (int8 default; int4, fp32)",
        ),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise InvalidParameterError(
            f"unknown format {name!r}; choose one of: {', '.join(sorted(FORMATS))}", param="to"
        ) from None


def convert(
    gguf: Path,
    to: str,
    *,
    cache_dir: Path,
    options: Options | None = None,
    progress: ProgressCallback | None = None,
    force: bool = False,
    keep_intermediate: bool = False,
) -> Path:
    """The folder of ``gguf`` in format ``to``, converting (and caching) on first use.

    Each format actually built is a task on ``progress`` (start, its stages, done with its size and
    time; see ``edgeserve.progress``); nothing is sent for one found in the cache. ``force`` rebuilds the
    requested format (not the ones it is built from). A source folder that this call built only to
    build ``to`` from (the float32 ``hf`` folder under an ONNX or a re-typed MLX model: 4 bytes per
    parameter, 1.1 GB for Gemma 3 270M) is deleted once ``to`` is finished, unless
    ``keep_intermediate``. One that was cached before stays: something may load it (the float32
    MLX model is the ``hf`` folder itself).
    """
    built: list[Path] = []
    report = progress or _ignore
    out = _convert(gguf, to, cache_dir=cache_dir, options=options, progress=report, force=force, built=built)
    for folder in built:
        if folder != out and not keep_intermediate:
            log.info("removing the intermediate %s (%s)", folder, format_size(size_on_disk(folder)))
            shutil.rmtree(folder, ignore_errors=True)
    return out


def _convert(
    gguf: Path,
    to: str,
    *,
    cache_dir: Path,
    options: Options | None,
    progress: ProgressCallback,
    force: bool,
    built: list[Path],
) -> Path:
    fmt = get_format(to)
    options = dict(options or {})
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is not a GGUF file; only GGUF models are converted")
    if importlib.util.find_spec(fmt.requires) is None:
        raise BackendNotInstalledError(
            f"converting to {fmt.name} needs {fmt.requires}: pip install 'edgeserve[{fmt.extra}]'"
        )
    module: FormatModule = importlib.import_module(fmt.module)
    name = module.folder_name(options)  # validates the options before any work
    source = (
        gguf
        if fmt.source is None
        else _convert(gguf, fmt.source, cache_dir=cache_dir, options=None, progress=progress, force=False, built=built)
    )
    if name is None:
        return source
    root = cache_dir / "converted" / f"{source_digest(gguf, cache_dir)[:16]}-v{CONVERT_VERSION}"
    out = root / name
    if (out / STAMP).is_file() and not force:
        return out
    what = f"from {source.name} ({format_size(size_on_disk(source))}), once; cached in {out}"
    with track(progress, f"convert {gguf.name} to {fmt.name}", what) as task:
        _build(module, source, out, options, task.step, {"format": fmt.name, "source": str(gguf)})
        task.done_message = f"{format_size(size_on_disk(out))} in {out}"
    built.append(out)
    return out


def _build(module: FormatModule, source: Path, out: Path, options: Options, report: Report, stamp: Options) -> None:
    """Build into a temporary sibling of ``out`` and rename it into place with its stamp."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        module.build(source, tmp, options, report)
        stamp = {**stamp, "options": dict(options), "version": CONVERT_VERSION}
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        if out.exists():  # forced, or a stale half-folder from an older layout
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError:
        if (out / STAMP).is_file():  # another process finished the same conversion first
            return
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ignore(event: ProgressEvent) -> None:
    pass


def source_digest(path: Path, cache_dir: Path) -> str:
    """sha256 of a model file, remembered per (path, size, mtime) so it is read once."""
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    memo = cache_dir / "converted" / ".digests" / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest + "\n")
    return digest
