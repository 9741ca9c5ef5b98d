"""``edgeserve bench``: the device report (see ``edgeserve.devicebench`` for what it measures)."""

from __future__ import annotations

import json
import shlex
from typing import Any

import click

from edgeserve._options import build, options_from
from edgeserve.devicebench.runner import BenchSettings
from edgeserve.settings import ModelSettings


@click.command("bench")
@options_from(BenchSettings)
@options_from(ModelSettings, exclude=("backend", "n_ctx"))
def bench(**values: Any) -> None:
    """Measure this device: prefill/decode tok/s, TTFT, peak RSS, KV bytes per token and park/resume
    cost per backend and context, the memory bandwidth, and decode against its bandwidth roofline.
    Writes JSON (and a PNG) and prints a table."""
    from edgeserve.devicebench.render import print_tables, write_png
    from edgeserve.devicebench.runner import Plan, run_report

    command = _command_line(values)
    settings = build(BenchSettings, values)
    plan = Plan(settings, build(ModelSettings, values), command=command)
    report = run_report(plan, say=lambda line: click.echo(line, err=True))
    out = settings.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    click.echo(f"wrote {out}", err=True)
    if settings.png:
        png = out.with_suffix(".png")
        skipped = write_png(report, png)
        click.echo(skipped or f"wrote {png}", err=True)


def _command_line(values: dict[str, Any]) -> str:
    """The command as given (flags left unset are defaults or ``EDGESERVE_*`` variables)."""
    words = ["edgeserve", "bench"]
    for name, value in values.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            words.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            words += [f"--{flag}", str(value)]
    return shlex.join(words)
