"""``edgeserve convert MODEL --to FORMAT``: convert ahead of time what a backend would convert on
first load. Importing this module pulls in no numeric stack (mlx, torch, transformers): formats are
imported only when one is built."""

from __future__ import annotations

from typing import Any

import click

from edgeserve._options import build, options_from
from edgeserve.errors import EdgeserveError, UserError
from edgeserve.settings import ModelSettings

from . import FORMATS

_MODEL_ONLY = ("model", "backend", "n_ctx", "threads", "n_batch", "gpu_layers", "flash_attn")


@click.command("convert")
@click.argument("model")
@click.option(
    "--to",
    "to",
    type=click.Choice(sorted(FORMATS)),
    required=True,
    help="; ".join(f"{f.name}: {f.description}" for f in FORMATS.values()),
)
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="mlx: MLX's own quantization (bits).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None, help="mlx: quantization group.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="mlx: weight dtype.")
@click.option(
    "--precision", type=click.Choice(["int4", "int8", "fp32"]), default=None, help="onnx: weight precision (int8)."
)
@click.option("--force", is_flag=True, help="Convert again even if a cached conversion exists.")
@options_from(ModelSettings, exclude=_MODEL_ONLY)
def convert(
    model: str,
    to: str,
    quantize: str | None,
    group_size: str | None,
    dtype: str | None,
    precision: str | None,
    force: bool,
    **values: Any,
) -> None:
    """Convert MODEL (a GGUF: path, 'default', Ollama or Hugging Face cache name) to the folder
    format another backend loads, and print that folder. Runs once per model; later calls (and
    backends loading the GGUF) reuse the cached folder."""
    from edgeserve.models import resolve
    from edgeserve.progress import default_sink, enable_log_lines

    from . import convert as run_convert

    settings = build(ModelSettings, values)
    enable_log_lines()
    options = {
        "quantize": int(quantize) if quantize else None,
        "group_size": int(group_size) if group_size else None,
        "dtype": dtype,
        "precision": precision,
    }
    # Mapped here as edgeserve's command group maps them, so the command reads the same on its own.
    try:
        resolved = resolve(model, cache_dir=settings.cache_dir)
        folder = run_convert(
            resolved.path,
            to,
            cache_dir=settings.cache_dir,
            options={k: v for k, v in options.items() if v is not None},
            progress=default_sink(),  # a bar on a terminal, log lines into a pipe or a file
            force=force,
        )
    except UserError as exc:
        raise click.UsageError(str(exc)) from None
    except EdgeserveError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(folder)
