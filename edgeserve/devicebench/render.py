"""The report for people: a rich table on the terminal and a PNG (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MB = 1e6


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: the whole table, not 80 columns of it
        console = Console(width=160)
    device, bw = report["device"], report["memory_bandwidth"]
    reads = ", ".join(f"{n} thread{'s' if n != '1' else ''} {v} GB/s" for n, v in bw["read_gbs"].items())
    console.print(f"[bold]{device['cpu']}[/] ({device['physical_cores']} cores): memory read bandwidth {reads}")
    table = Table(
        "backend", "context", "prefill tok/s", "TTFT ms", "decode tok/s", "roofline tok/s", "% roofline",
        "KV B/token", "park ms", "restore ms", "peak RSS MB",
        title=f"edgeserve bench: {report['settings']['model']}, threads {report['settings']['threads']}",
    )  # fmt: skip
    for name, b in report["backends"].items():
        if b["status"] != "ok":
            table.add_row(name, "-", b["status"], b.get("reason") or "", *["-"] * 7)
            continue
        for row in b["contexts"]:
            table.add_row(
                name,
                str(row["context"]),
                _f(row["prefill_tok_s"], "{:.0f}"),
                _f(row["ttft_ms"], "{:.0f}"),
                _f(row["decode_tok_s"]),
                _f(row["roofline_tok_s"]),
                _f(row["roofline_pct"], "{:.0f}%"),
                _f(row["kv_bytes_per_token"], "{:,.0f}"),
                _f(row["park_ms"]),
                _f(row["restore_ms"]),
                _f(b["peak_rss_bytes"] / MB, "{:.0f}"),
            )
    console.print(table)
    for name, b in report["backends"].items():
        for note in (b.get("bandwidth_note"), b.get("kv_note")):
            if note:
                console.print(f"{name}: {note}")
        if b.get("breakdown"):
            console.print(_breakdown_table(name, b["breakdown"]))


def _breakdown_table(name: str, breakdown: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        "threads", "step ms", "lm_head ms", "rest ms", "greedy sample ms", "lm_head share",
        "lm_head GB/s", "rest GB/s", "ceiling GB/s",
        title=f"{name}: one decode step at context {breakdown['context']}",
    )  # fmt: skip
    for n, r in breakdown["by_threads"].items():
        table.add_row(
            n,
            _f(r["step_ms"], "{:.2f}"),
            _f(r["lm_head_ms"], "{:.2f}"),
            _f(r["rest_ms"], "{:.2f}"),
            _f(r["sample_greedy_ms"], "{:.2f}"),
            _f(r["lm_head_share"] and 100 * r["lm_head_share"], "{:.0f}%"),
            _f(r["lm_head_gbs"]),
            _f(r["rest_gbs"]),
            _f(r["ceiling_gbs"]),
        )
    return table


def write_png(report: dict[str, Any], path: Path) -> str | None:
    """Prefill, decode (with its roofline dashed) and park/restore against context, one line per
    backend. Returns why no PNG was written, or None."""
    try:
        import matplotlib
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'edgeserve[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (prefill, decode, park) = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, b in report["backends"].items():
        if b["status"] != "ok":
            continue
        rows = b["contexts"]
        x = [r["context"] for r in rows]
        prefill.plot(x, [r["prefill_tok_s"] for r in rows], marker="o", label=name)
        (line,) = decode.plot(x, [r["decode_tok_s"] for r in rows], marker="o", label=name)
        if all(r["roofline_tok_s"] for r in rows):
            roof = [r["roofline_tok_s"] for r in rows]
            decode.plot(x, roof, linestyle="--", color=line.get_color(), label=f"{name} roofline")
        color = line.get_color()
        park.plot(x, [r["park_ms"] for r in rows], marker="o", color=color, label=f"{name} park")
        park.plot(x, [r["restore_ms"] for r in rows], marker="x", linestyle=":", color=color, label=f"{name} restore")
    for ax, label in ((prefill, "prefill tok/s"), (decode, "decode tok/s"), (park, "park / restore ms (log)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    prefill.set_ylim(bottom=0)
    decode.set_ylim(bottom=0)
    park.set_yscale("log")  # a memory copy (ms) and a token replay (s) on one axis
    device = report["device"]
    fig.suptitle(
        f"edgeserve bench on {device['cpu']} ({device['physical_cores']} cores), threads "
        f"{report['settings']['threads']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
