"""The ``edgeserve`` command. Thin: flags → settings → engine; output formatting only."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click

from edgeserve._options import build, dataclass_from, options_from, options_from_dataclass
from edgeserve._startup import configure_logging
from edgeserve.errors import EdgeserveError, InvalidParameterError, UserError
from edgeserve.settings import CloudSettings, EngineSettings, ModelSettings
from edgeserve.types import FinalEvent, GenerationResult, Message, SamplingParams


class _Group(click.Group):
    """Turns edgeserve's own errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.UsageError(str(exc)) from None
        except EdgeserveError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(package_name="edgeserve")
@click.option("-v", "--verbose", count=True, help="More logging (-v: info, -vv: debug, backend logs included).")
def main(verbose: int) -> None:
    """Run LLMs on your own hardware."""
    # serve and proxy configure it again with their --log-level (the more verbose of the two wins).
    configure_logging()


#: Flags for every SamplingParams field, generated from the dataclass (type, default, help text).
sampling_options = options_from_dataclass(SamplingParams)


def _sampling(values: dict[str, Any]) -> SamplingParams:
    try:
        return dataclass_from(SamplingParams, values)
    except InvalidParameterError as exc:  # name the flag the user typed
        flag = f"--{exc.param.replace('_', '-')}: " if exc.param else ""
        raise click.UsageError(f"{flag}{exc}") from None


@contextmanager
def _engine(values: dict[str, Any]) -> Iterator[Any]:
    from edgeserve.engine import Engine

    model_settings = build(ModelSettings, values)
    # run and chat have one request at a time: admission settings (queue, policy, aging, predictor)
    # are the servers' and have no flags here; EDGESERVE_* variables still apply.
    engine_settings = build(EngineSettings, values)
    cloud = build(CloudSettings, values)  # --cloud: the cloud answers first, the device takes over
    with _status(f"loading {model_settings.model} ..."):
        engine = Engine.from_settings(model_settings, engine_settings, cloud=cloud)
    with engine:
        yield engine


@contextmanager
def _status(message: str) -> Iterator[None]:
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


def _stats(result: GenerationResult) -> str:
    ttft = f"{result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else "-"
    rate = f"{result.decode_tok_s:.1f} tok/s" if result.decode_tok_s else "-"
    return (
        f"[{result.prompt_tokens} prompt + {result.completion_tokens} tokens, TTFT {ttft}, {rate}, "
        f"finish: {result.finish_reason.value}]"
    )


def _end_line() -> None:
    # Flushed so that the stats line on stderr lands after the text, also when stdout is a pipe.
    sys.stdout.write("\n")
    sys.stdout.flush()


def _print_stream(events: Iterator[Any]) -> GenerationResult:
    from rich.console import Console

    from edgeserve.handoff import CloudTokenEvent

    console = Console(highlight=False)
    result: GenerationResult | None = None
    for event in events:
        if isinstance(event, FinalEvent):
            result = event.result
        elif isinstance(event, CloudTokenEvent) and console.is_terminal:  # the cloud's tokens, dimmed
            console.print(event.text, style="dim", end="", markup=False, soft_wrap=True)
        else:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    assert result is not None
    return result


@main.command()
@click.argument("prompt")
@click.option("--chat", "as_chat", is_flag=True, help="Send the prompt as a user message through the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object instead of streaming.")
@sampling_options
@options_from(ModelSettings)
@options_from(CloudSettings)
def run(prompt: str, as_chat: bool, as_json: bool, **values: Any) -> None:
    """Complete PROMPT once, streaming the text to stdout (stats go to stderr)."""
    params = _sampling(values)
    with _engine(values) as engine:
        kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]} if as_chat else {"prompt": prompt}
        if as_json:
            result = engine.submit(params=params, **kwargs).result()
            click.echo(json.dumps({**asdict(result), "finish_reason": result.finish_reason.value}))
            return
        result = _print_stream(engine.stream(params=params, **kwargs))
    _end_line()
    click.echo(_stats(result), err=True)


@main.command()
@click.option("--system", default=None, help="System prompt.")
@sampling_options
@options_from(ModelSettings)
@options_from(CloudSettings)
def chat(system: str | None, **values: Any) -> None:
    """Interactive multi-turn chat. /reset clears the conversation, /exit leaves. Reads stdin when it
    is not a terminal, one message per line."""
    params = _sampling(values)
    interactive = sys.stdin.isatty()
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    with _engine(values) as engine:
        if interactive:
            click.echo("edgeserve chat: /reset clears the conversation, /exit leaves.", err=True)
        while True:
            try:
                line = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(start)
                click.echo("[conversation cleared]", err=True)
                continue
            history.append({"role": "user", "content": text})
            try:
                result = _print_stream(engine.stream(messages=history, params=params))
            except KeyboardInterrupt:  # stop this answer, keep the session
                history.pop()
                click.echo("\n[interrupted]", err=True)
                continue
            except UserError as exc:  # e.g. the conversation outgrew the context: say so, keep the session
                history.pop()
                click.echo(f"[{exc} — /reset starts over]", err=True)
                continue
            history.append({"role": "assistant", "content": result.text})
            _end_line()
            click.echo(f"{_stats(result)} [template: {result.chat_template}]", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@click.option(
    "--clean",
    is_flag=True,
    help="Delete the conversion cache (MLX/ONNX folders converted from GGUFs; rebuilt on next use).",
)
@options_from(ModelSettings, exclude=("model", "backend", "n_ctx", "threads", "n_batch", "gpu_layers", "flash_attn"))
def models(as_json: bool, clean: bool, **values: Any) -> None:
    """List the models found on this machine (nothing is downloaded), conversions included."""
    from edgeserve.models import list_models
    from edgeserve.progress import format_size

    settings = build(ModelSettings, values)
    if clean:
        from edgeserve.models.cache import clean_conversions, conversions_dir

        removed, freed = clean_conversions(settings.cache_dir)
        where = conversions_dir(settings.cache_dir)
        click.echo(f"removed {_count(removed, 'converted folder')} ({format_size(freed)}) from {where}")
        return
    entries = list_models(settings.cache_dir)
    if as_json:
        for e in entries:
            click.echo(json.dumps({**asdict(e), "path": str(e.path) if e.path else None}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "source", "size", "path", "note")
    for e in entries:
        size = format_size(e.size_bytes) if e.size_bytes else "-"
        table.add_row(e.name, e.source, size, str(e.path or "-"), e.note)
    Console().print(table)
    converted = [e.size_bytes or 0 for e in entries if e.source == "converted"]
    if converted:
        size = f"{_count(len(converted), 'folder')}, {format_size(sum(converted))}"
        click.echo(f"conversion cache: {size} ('edgeserve models --clean' deletes it)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(as_json: bool) -> None:
    """Hardware, installed backends, and which backend would be chosen."""
    from importlib.metadata import version

    from edgeserve.backend import REGISTRY
    from edgeserve.hardware import choose_backend, installed_backends, onnx_execution_providers, onnx_provider, probe
    from edgeserve.kernels import describe as describe_kernels

    hw = probe()
    installed = installed_backends()
    compiled = onnx_execution_providers()
    report: dict[str, Any] = {
        "edgeserve": version("edgeserve"),
        "python": sys.version.split()[0],
        "hardware": {**asdict(hw), "apple_silicon": hw.apple_silicon},
        "backends": {
            name: {
                "installed": installed[name],
                "extra": f"edgeserve[{spec.extra}]",
                "description": spec.description,
            }
            for name, spec in REGISTRY.items()
        },
        "chosen_backend": choose_backend(hw),
        "onnx_providers_compiled_in": compiled,
        "onnx_provider": onnx_provider(hw, compiled),
        "kernels": describe_kernels(cuda=hw.cuda, metal=hw.metal),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    gib = 1 << 30
    click.echo(f"edgeserve {report['edgeserve']} on Python {report['python']}")
    click.echo(f"system:   {hw.system} {hw.machine}")
    click.echo(f"cpu:      {hw.physical_cores} physical / {hw.logical_cores} logical cores")
    click.echo(f"memory:   {hw.memory_bytes / gib:.1f} GiB ({hw.available_bytes / gib:.1f} GiB available)")
    click.echo(f"cuda:     {'yes' if hw.cuda else 'no'}")
    click.echo(f"metal:    {'yes' if hw.metal else 'no'}")
    for name, spec in REGISTRY.items():
        state = "installed" if installed[name] else f"not installed (pip install 'edgeserve[{spec.extra}]')"
        click.echo(f"backend:  {name:<6} {spec.description}: {state}")
    if report["onnx_provider"]:
        click.echo(f"onnx:     runs on {report['onnx_provider']} (providers compiled in: {', '.join(compiled)})")
    click.echo(f"chosen:   {report['chosen_backend']}")
    click.echo("kernels:  " + ", ".join(f"{name}={impl}" for name, impl in report["kernels"].items()))


def _register() -> None:
    # Feature commands live beside their features; each module keeps its heavy imports inside the
    # command bodies, so registering them costs only the click objects.
    from edgeserve.models.convert.cli import convert
    from edgeserve.predictor.cli import predict_command, predictor
    from edgeserve.proxy.cli import proxy
    from edgeserve.server.cli import serve

    for command in (serve, proxy, convert, predict_command, predictor):
        main.add_command(command)
    from edgeserve.devicebench.cli import bench

    main.add_command(bench)


_register()
