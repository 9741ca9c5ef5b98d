"""The one picture the side-by-side benchmarks share: each run as a dot, the median as a bar, one
panel per metric, the two sides next to each other."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def side_by_side(
    rows: Sequence[dict[str, Any]],
    sides: Sequence[tuple[str, str]],
    metrics: Sequence[tuple[str, float, str]],
    title: str,
    path: Path,
    targets: Sequence[float | None] = (),
) -> None:
    """``sides``: (row ``side`` value, axis label); ``metrics``: (row key, scale, axis label);
    ``targets``: a dashed line per metric panel where not None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    lines = [*targets, *[None] * (len(metrics) - len(targets))]
    for ax, (key, scale, label), target in zip(axes, metrics, lines, strict=True):
        for i, (side, _) in enumerate(sides):
            values = [r[key] * scale for r in rows if r["side"] == side and r.get(key) is not None]
            ax.scatter([i] * len(values), values, alpha=0.6)
            if values:
                ax.hlines(statistics.median(values), i - 0.25, i + 0.25, color="black")
        if target is not None:
            ax.axhline(target, color="red", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(sides)), [name for _, name in sides])
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
