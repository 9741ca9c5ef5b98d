"""Progress of long tasks (model conversion, model load) as typed events, and where they go.

A task emits ``ProgressEvent``s: one ``start``, any number of ``step``s (a stage and how far it
is), then one ``done`` or ``failed``. Anything that takes a ``ProgressCallback`` receives them; three
sinks are provided:

- ``RichSink``: a live bar per stage on stderr, for terminals;
- ``LogSink``: a few log lines (start, the first line of each stage, 25/50/75 % of a counted stage,
  done or failed), with sizes and times, for service managers, containers and log files;
- the app's own callback (a Qt progress bar, say), called on the thread that runs the task.

``default_sink()`` picks the bar or the log lines by whether stderr is a terminal;
``sinks(callback)`` is what a library entry point uses: the app's callback plus the log lines,
or the default when the app passed none.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, TypeAlias

__all__ = [
    "LogSink",
    "ProgressCallback",
    "ProgressEvent",
    "RichSink",
    "Task",
    "default_sink",
    "enable_log_lines",
    "format_size",
    "loading",
    "sinks",
    "size_on_disk",
    "tee",
    "track",
]

log = logging.getLogger("edgeserve.progress")

EventKind: TypeAlias = Literal["start", "step", "done", "failed"]


@dataclass(frozen=True)
class ProgressEvent:
    """One report from a task.

    ``total == 0`` means a stage of unknown length (draw a spinner). ``unit`` is ``"B"`` when
    ``done``/``total`` count bytes, else a plural noun (``"tensors"``, ``"layers"``) or ``""``.
    ``elapsed`` is seconds since the task started; ``message`` is a line a person can read.
    """

    task: str
    kind: EventKind
    stage: str = ""
    done: int = 0
    total: int = 0
    unit: str = ""
    message: str = ""
    elapsed: float = 0.0

    @property
    def fraction(self) -> float | None:
        """How far the stage is, 0..1, or None when its length is unknown."""
        if self.kind == "done":
            return 1.0
        return min(1.0, self.done / self.total) if self.total > 0 else None


#: Called on the thread that runs the task; must not raise (an exception aborts the task).
ProgressCallback: TypeAlias = Callable[[ProgressEvent], None]


# ---- emitting ---------------------------------------------------------------------------------


@dataclass
class Task:
    """The emitting side of one task: ``step`` reports a stage; ``track`` sends start and the end.

    ``step`` has the shape of the converters' ``report(stage, done, total)`` (plus a unit), so a
    bound ``task.step`` is what a format module reports through.
    """

    name: str
    callback: ProgressCallback
    clock: Callable[[], float] = time.monotonic
    #: What the ``done`` event says: set it inside ``track``'s block to what was made.
    done_message: str = ""
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def emit(
        self, kind: EventKind, stage: str = "", done: int = 0, total: int = 0, unit: str = "", message: str = ""
    ) -> None:
        elapsed = self.clock() - self.started
        self.callback(ProgressEvent(self.name, kind, stage, done, total, unit, message, elapsed))

    def step(self, stage: str, done: int, total: int, unit: str = "") -> None:
        self.emit("step", stage, done, total, unit)


@contextmanager
def track(
    callback: ProgressCallback, name: str, message: str = "", clock: Callable[[], float] = time.monotonic
) -> Iterator[Task]:
    """Emit ``start`` now and ``done`` (or ``failed``, then re-raise) when the block ends."""
    task = Task(name, callback, clock)
    task.emit("start", message=message)
    try:
        yield task
    except BaseException as exc:
        task.emit("failed", message=f"{type(exc).__name__}: {exc}")
        raise
    task.emit("done", message=task.done_message)


@contextmanager
def loading(callback: ProgressCallback | None, model: str, path: Path | None = None) -> Iterator[Task]:
    """Start/done events around a model load (``Engine.from_settings`` wraps ``load_backend`` in it):
    the start says the file's size, the done how long the load took. They go to the callback and
    the log lines; with no callback, to the log lines off a terminal and nowhere on one (a load has
    no stages to draw; a conversion inside it draws its own bar)."""
    size = size_on_disk(path) if path is not None else 0
    where = f" from {path} ({format_size(size)})" if path is not None else ""
    sink = tee(callback, LogSink()) if callback is not None else _load_default()
    with track(sink, f"load {model}", f"loading {model}{where}") as task:
        yield task


def _load_default() -> ProgressCallback:
    return LogSink() if not _is_terminal(sys.stderr) else _ignore


def _ignore(event: ProgressEvent) -> None:
    pass


def tee(*callbacks: ProgressCallback) -> ProgressCallback:
    """One callback that calls each in turn."""

    def call(event: ProgressEvent) -> None:
        for callback in callbacks:
            callback(event)

    return call


def default_sink() -> ProgressCallback:
    """A rich bar when stderr is a terminal, log lines otherwise (service managers, Docker, files)."""
    return RichSink() if _is_terminal(sys.stderr) else LogSink()


def sinks(callback: ProgressCallback | None) -> ProgressCallback:
    """Where a library entry point sends its events: the app's callback plus the log lines (the
    app's logging config decides if they show), or ``default_sink()`` when the app passed none."""
    if callback is None:
        return default_sink()
    return tee(callback, LogSink())


def enable_log_lines() -> None:
    """Let the progress lines through for a command whose progress is its point (``convert``, or
    any CLI command that may convert): ``edgeserve.progress`` speaks at INFO even when the rest of
    logging is at WARNING, and gets a stderr handler when nothing configured logging at all."""
    log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# ---- log lines --------------------------------------------------------------------------------


@dataclass
class LogSink:
    """Progress as a few INFO lines on ``edgeserve.progress``: the start, the first report of each
    stage, each quarter of a counted stage, and the end with its time. A stage of 18 layers gives
    at most 4 lines however often it reports."""

    logger: logging.Logger = field(default_factory=lambda: log)
    marks: tuple[float, ...] = (0.25, 0.5, 0.75)
    _seen: dict[tuple[str, str], float] = field(default_factory=dict, init=False)

    def __call__(self, event: ProgressEvent) -> None:
        line = self._line(event)
        if line is not None:
            level = logging.WARNING if event.kind == "failed" else logging.INFO
            self.logger.log(level, "%s: %s", event.task, line)

    def _line(self, event: ProgressEvent) -> str | None:
        at = f"{event.elapsed:.1f} s"
        if event.kind == "start":
            return f"started: {event.message}" if event.message else "started"
        if event.kind == "done":
            return f"done in {at}" + (f": {event.message}" if event.message else "")
        if event.kind == "failed":
            return f"failed after {at}: {event.message}"
        key = (event.task, event.stage)
        fraction = event.fraction
        if key not in self._seen:
            self._seen[key] = fraction or 0.0
            return f"{event.stage}{_amount(event, total_only=event.done == 0)} (at {at})"
        last = self._seen[key]
        # A stage's end is not a milestone: the next stage's line, or the task's end, says it.
        crossed = [m for m in self.marks if last < m <= (fraction or 0.0) < 1.0]
        if not crossed:
            return None
        self._seen[key] = crossed[-1]
        return f"{event.stage}: {crossed[-1]:.0%}{_amount(event)} (at {at})"


def _amount(event: ProgressEvent, total_only: bool = False) -> str:
    """ ", 671 MB of 1.1 GB", ", 9 of 18 layers"; a stage's first line gives its total alone."""
    if event.total <= 0 or (total_only and not event.unit):
        return ""
    if event.unit == "B":
        total = format_size(event.total)
        return f", {total}" if total_only else f", {format_size(event.done)} of {total}"
    noun = f" {event.unit}" if event.unit else ""
    return f", {event.total}{noun}" if total_only else f", {event.done} of {event.total}{noun}"


def format_size(n: int) -> str:
    """Bytes the way a person reads them: 253 MB, 1.1 GB (decimal units, as disks are sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


def size_on_disk(path: Path) -> int:
    """A file's size, or the sum over a folder's files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# ---- the terminal bar -------------------------------------------------------------------------


@dataclass
class RichSink:
    """A live bar on stderr, one row per stage; it opens at the first ``start`` and closes when
    every task it saw has ended (a load that converts first nests a task inside another)."""

    _bar: Any = field(default=None, init=False)
    _rows: dict[tuple[str, str], Any] = field(default_factory=dict, init=False)
    _open: int = field(default=0, init=False)

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "start":
            self._start(event)
        elif event.kind == "step" and self._bar is not None:
            self._step(event)
        elif event.kind in ("done", "failed") and self._bar is not None:
            self._end(event)

    def _start(self, event: ProgressEvent) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            columns = (
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[amount]}"),
            )
            self._bar = Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True, highlight=False))
            self._bar.start()
        self._open += 1
        self._bar.console.print(f"{event.task}: {event.message}" if event.message else event.task, markup=False)

    def _step(self, event: ProgressEvent) -> None:
        key = (event.task, event.stage)
        if key not in self._rows:
            self._finish_rows(event.task)
            self._rows[key] = self._bar.add_task(event.stage, total=event.total or None, amount="")
        amount = _amount(event).removeprefix(", ")
        self._bar.update(self._rows[key], completed=event.done, total=event.total or None, amount=amount)

    def _finish_rows(self, task: str) -> None:
        """A new stage of a task completes its earlier ones (stages run one after another)."""
        for (name, _), row in self._rows.items():
            if name == task:
                total = self._bar.tasks[row].total or 1
                self._bar.update(row, total=total, completed=total)

    def _end(self, event: ProgressEvent) -> None:
        if event.kind == "done":
            self._finish_rows(event.task)
        line = f"{event.task}: {event.kind} in {event.elapsed:.1f} s" + (f": {event.message}" if event.message else "")
        self._bar.console.print(line, markup=False)
        self._open -= 1
        if self._open <= 0:
            self._bar.stop()
            self._bar, self._rows, self._open = None, {}, 0
