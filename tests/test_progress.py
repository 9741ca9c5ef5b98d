"""Progress events (edgeserve.progress) and their three sinks: the log lines, the terminal bar, an
app's callback; and a real ``edgeserve convert`` whose stderr is a pipe, not a terminal."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from edgeserve import progress as pg
from edgeserve.models import convert as conv
from edgeserve.progress import LogSink, ProgressEvent, RichSink, track


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_task_sends_start_steps_and_done_with_elapsed_time() -> None:
    seen: list[ProgressEvent] = []
    clock = FakeClock()
    with track(seen.append, "convert m.gguf to hf", "from m.gguf", clock=clock) as task:
        clock.now += 2.0
        task.step("dequantizing", 50, 100, "B")
        clock.now += 1.5
        task.done_message = "1.1 GB in /x"
    assert [e.kind for e in seen] == ["start", "step", "done"]
    assert seen[1] == ProgressEvent("convert m.gguf to hf", "step", "dequantizing", 50, 100, "B", "", 2.0)
    assert seen[1].fraction == 0.5
    assert seen[2].elapsed == 3.5 and seen[2].message == "1.1 GB in /x" and seen[2].fraction == 1.0


def test_a_failing_task_says_failed_and_the_error_still_propagates() -> None:
    seen: list[ProgressEvent] = []
    with pytest.raises(OSError, match="disk full"), track(seen.append, "t") as task:
        task.step("writing", 0, 0)
        raise OSError("disk full")
    assert [e.kind for e in seen] == ["start", "step", "failed"]
    assert seen[-1].message == "OSError: disk full"
    assert seen[1].fraction is None  # unknown length


def test_log_lines_are_few_and_carry_sizes_and_times(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeserve.progress")
    sink, clock = LogSink(), FakeClock()
    with track(sink, "convert m.gguf to onnx", "from hf (1.1 GB)", clock=clock) as task:
        for layer in range(1, 19):  # 18 reports of one counted stage
            clock.now += 0.5
            task.step("making the graph", layer, 18)
        for i in range(1, 200):  # a stage of unknown length reports once
            task.step("quantizing weights", i, 0, "tensors")
        total = 1_100_000_000
        for done in (0, 300_000_000, 600_000_000, total):
            task.step("writing", done, total, "B")
        task.done_message = "270 MB in /cache/onnx"
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "convert m.gguf to onnx: started: from hf (1.1 GB)"
    graph = [line for line in said if "making the graph" in line]
    # The first report, then 25, 50 and 75 % (the 100 % is said by the next stage): 4 of 18.
    assert len(graph) == 4, graph
    assert graph[1] == "convert m.gguf to onnx: making the graph: 25%, 5 of 18 (at 2.5 s)"
    assert sum("quantizing weights" in line for line in said) == 1
    assert "convert m.gguf to onnx: writing, 1.1 GB (at 9.0 s)" in said
    assert "convert m.gguf to onnx: writing: 50%, 600 MB of 1.1 GB (at 9.0 s)" in said
    assert said[-1] == "convert m.gguf to onnx: done in 9.0 s: 270 MB in /cache/onnx"


def test_failure_is_a_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeserve.progress")
    with pytest.raises(ValueError), track(LogSink(), "load m"):
        raise ValueError("bad magic")
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert (
        failed[0].getMessage().startswith("load m: failed after ") and "ValueError: bad magic" in failed[0].getMessage()
    )


def test_sizes_read_as_people_read_them() -> None:
    assert [pg.format_size(n) for n in (512, 2_000, 253_000_000, 1_100_000_000, 12_400_000_000)] == [
        "512 B",
        "2.0 kB",
        "253 MB",
        "1.1 GB",
        "12 GB",
    ]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_default_sink_is_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert isinstance(pg.default_sink(), LogSink)
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert isinstance(pg.default_sink(), RichSink)


def test_an_apps_callback_gets_every_event_and_the_log_lines_still_come(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeserve.progress")
    seen: list[ProgressEvent] = []
    with track(pg.sinks(seen.append), "load m") as task:
        task.step("reading", 1, 2)
    assert [e.kind for e in seen] == ["start", "step", "done"]
    said = [r.getMessage() for r in caplog.records]
    assert said == ["load m: started", "load m: reading, 1 of 2 (at 0.0 s)", "load m: done in 0.0 s"]


def test_the_rich_bar_draws_nested_tasks_and_closes_when_the_outer_one_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", stream)
    sink = RichSink()
    with track(sink, "load m", "loading m"):
        with track(sink, "convert m to hf", "converting m") as inner:
            inner.step("dequantizing", 10, 20, "B")
            inner.step("tokenizer", 0, 1)
        assert sink._bar is not None  # the outer task still runs
    assert sink._bar is None
    text = stream.getvalue()
    assert "loading m" in text and "converting m" in text and "convert m to hf: done" in text


def test_a_load_sends_start_and_done_with_the_file_size(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 2_500_000)
    seen: list[ProgressEvent] = []
    with pg.loading(seen.append, "m", model):
        pass
    assert [e.kind for e in seen] == ["start", "done"]
    assert seen[0].task == "load m" and seen[0].message == f"loading m from {model} (2.5 MB)"


def test_convert_reports_what_it_builds_and_nothing_for_a_cached_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF" + bytes(64))

    def build(src: Path, out: Path, options: Any, report: Any) -> None:
        report("writing", 0, 3, "B")
        (out / "weights").write_bytes(b"abc")
        report("writing", 3, 3, "B")

    module = types.SimpleNamespace(folder_name=lambda options: "fake", build=build)
    monkeypatch.setitem(sys.modules, "fake_format", module)
    monkeypatch.setitem(conv.FORMATS, "fake", conv.Format("fake", "fake_format", "json", "x", None, "test"))
    seen: list[ProgressEvent] = []
    out = conv.convert(source, "fake", cache_dir=tmp_path, progress=seen.append)
    assert [(e.kind, e.stage, e.done) for e in seen] == [
        ("start", "", 0),
        ("step", "writing", 0),
        ("step", "writing", 3),
        ("done", "", 0),
    ]
    assert seen[0].task == "convert tiny.gguf to fake" and "(68 B)" in seen[0].message
    size = pg.size_on_disk(out)  # the weights and the stamp
    assert seen[-1].message == f"{size} B in {out}"
    seen.clear()
    assert conv.convert(source, "fake", cache_dir=tmp_path, progress=seen.append) == out
    assert seen == []


# ---- a real conversion in a child process whose stderr is a pipe ------------------------------


@pytest.mark.slow
def test_convert_into_a_pipe_prints_progress_log_lines(tmp_path: Path) -> None:
    """Issue 13: under a service manager, in Docker or into a file, the first conversion used to
    say nothing for most of a minute. Off a terminal it now logs its start, a few milestones and
    its end, with sizes and times; no bar escape codes."""
    pytest.importorskip("tokenizers", reason="the converter needs the mlx extra: pip install 'edgeserve[mlx]'")
    from edgeserve.models import resolve
    from edgeserve.settings import ModelSettings

    gguf = resolve("default", cache_dir=ModelSettings(model="default", backend="llama").cache_dir).path
    edgeserve = Path(sys.executable).with_name("edgeserve")
    cmd = [str(edgeserve), "convert", str(gguf), "--to", "mlx", "--cache-dir", str(tmp_path)]
    env = {**os.environ, "TERM": "xterm-256color"}  # a terminal type, but stderr is still a pipe
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip())
    assert (folder / "model.safetensors").is_file()
    lines = [line for line in proc.stderr.splitlines() if "edgeserve.progress" in line]
    task = f"convert {gguf.name} to hf"
    assert lines[0] == f"INFO edgeserve.progress: {task}: started: from {gguf.name} (253 MB), once; cached in {folder}"
    milestones = [line for line in lines if re.search(r"dequantizing: \d+%, \d+ MB of 1\.1 GB \(at \d+\.\d s\)$", line)]
    assert milestones, proc.stderr
    assert re.fullmatch(rf"INFO edgeserve\.progress: {task}: done in \d+\.\d s: 1\.1 GB in {folder}", lines[-1])
    assert 3 <= len(lines) <= 12, lines  # a few lines, not one per tensor
    assert "\x1b[" not in proc.stderr  # no bar drawn into a pipe
