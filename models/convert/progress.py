"""Progress of a conversion: stages report ``(stage, done, total)``; the CLI and the backends draw
them as a rich progress bar on stderr, tests pass ``silent``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeAlias

#: ``total == 0``: a stage of unknown length (a spinner).
Report: TypeAlias = Callable[[str, int, int], None]


def silent(stage: str, done: int, total: int) -> None:
    pass


@contextmanager
def rich_bar(title: str) -> Iterator[Report]:
    """A live progress bar on stderr, one line per stage; a new stage completes the earlier ones."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    tasks: dict[str, TaskID] = {}
    with Progress(*columns, console=console) as bar:
        console.print(title)

        def finish_all() -> None:
            for task in tasks.values():
                total = bar.tasks[task].total or 1
                bar.update(task, total=total, completed=total)

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                finish_all()
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        yield report
        finish_all()
