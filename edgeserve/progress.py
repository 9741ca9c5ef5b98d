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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = ["ProgressCallback", "ProgressEvent"]

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
