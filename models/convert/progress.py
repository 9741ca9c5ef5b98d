"""How a format module reports its stages: ``report(stage, done, total, unit)``.

``convert`` hands each module the ``step`` of an ``edgeserve.progress.Task``, which turns the calls
into ``ProgressEvent``s for the bar, the log lines or the app's callback; tests pass ``silent``.
"""

from __future__ import annotations

from typing import Protocol


class Report(Protocol):
    """``total == 0``: a stage of unknown length (a spinner). ``unit``: ``"B"`` for bytes, else a
    plural noun (``"layers"``) or ``""``."""

    def __call__(self, stage: str, done: int, total: int, unit: str = "") -> None: ...


def silent(stage: str, done: int, total: int, unit: str = "") -> None:
    pass
