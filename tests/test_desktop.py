"""examples/desktop_chat.py in a real Qt window (pytest-qt; Qt's offscreen platform, or the X
display when there is one): it loads the default model, streams a reply into the chat pane, Stop
cancels mid-stream, the summariser runs on the same engine, and closing the window leaves no
edgeserve thread alive. A screenshot is saved as a test artefact."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from edgeserve import EngineSettings, FinishReason, GenerationResult, ModelSettings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "desktop_chat.py"
if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before pytest-qt makes the QApplication


def _display_problem() -> str | None:
    """Why no Qt window can be made here, or None. Probed in a child: a platform plugin that
    cannot start aborts the process (qFatal), which no test could catch."""
    probe = "from PySide6.QtWidgets import QApplication, QWidget; a = QApplication([]); QWidget().show()"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return None
    return (
        f"no display could be started (QT_QPA_PLATFORM={os.environ.get('QT_QPA_PLATFORM')}): "
        + (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    )


def test_pyside6_is_an_extra_never_a_base_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((EXAMPLE.parents[1] / "pyproject.toml").read_text())["project"]
    assert not any("pyside" in r.lower() or "pytest-qt" in r.lower() for r in project["dependencies"])
    assert any(r.lower().startswith("pyside6") for r in project["optional-dependencies"]["desktop"])
    assert any("desktop" in r for r in project["optional-dependencies"]["dev"])  # CI installs it


@pytest.fixture(scope="module")
def app_module() -> ModuleType:
    pytest.importorskip(
        "PySide6", reason="the desktop example needs the desktop extra: pip install 'edgeserve[desktop]'"
    )
    pytest.importorskip("pytestqt", reason="the real-window test needs pytest-qt: pip install 'edgeserve[desktop]'")
    problem = _display_problem()
    if problem:
        print(problem)
        pytest.skip(problem)
    spec = importlib.util.spec_from_file_location("desktop_chat", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def edgeserve_threads(before: frozenset[threading.Thread] = frozenset()) -> list[str]:
    """edgeserve's threads started since ``before`` (other tests' engines, and the process-wide MLX
    thread, may be alive in the same session)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("edgeserve") and t not in before]


@pytest.mark.slow
def test_the_desktop_chat_window(app_module: ModuleType, qtbot: Any, tmp_path: Path) -> None:
    before = frozenset(threading.enumerate())
    settings = ModelSettings(model="default", backend="llama", threads=1, n_ctx=1024)
    window = app_module.ChatWindow(
        settings, EngineSettings(policy="fcfs"), {"max_tokens": 32, "temperature": 0, "repetition_penalty": 1.1}
    )
    qtbot.addWidget(window)
    window.show()
    assert window.picker.findData("default") >= 0  # the picker lists `edgeserve models`

    # Loading happens off the UI thread: load() returns at once with the bar busy.
    with qtbot.waitSignal(window.loaded, timeout=120_000):
        window.load("default")
        assert window.bar.maximum() == 0 and window.engine is None
    assert window.chat.run_button.isEnabled()

    # A reply streams into the pane token by token; the status bar shows TTFT and tok/s.
    lengths: list[int] = []
    window.chat.view.textChanged.connect(lambda: lengths.append(len(window.chat.view.toPlainText())))
    with qtbot.waitSignal(window.chat.done, timeout=60_000) as reply:
        window.send("What is the capital of France?")
    result = reply.args[0]
    assert isinstance(result, GenerationResult) and result.text, result
    assert window.chat.view.toPlainText().endswith(f"Model: {result.text.lstrip()}")
    assert window.chat.tokens >= 2 and len(set(lengths)) >= 3  # arrived in pieces, not at the end
    status = window.statusBar().currentMessage()
    assert "TTFT" in status and "tok/s" in status and result.finish_reason.value in status

    # Stop cancels mid-stream; the summariser, queued on the same engine meanwhile, then runs.
    window.sampling = {"max_tokens": 400, "temperature": 0.7, "ignore_eos": True}
    with qtbot.waitSignal(window.chat.done, timeout=60_000) as stopped:
        window.send("Tell me a long story about a lighthouse.")
        qtbot.waitUntil(lambda: window.chat.tokens >= 5, timeout=60_000)
        window.summary.run_button.click()  # waits: the engine runs one request at a time
        assert window.summary.busy
        window.chat.stop_button.click()
    cancelled = stopped.args[0]
    assert cancelled.finish_reason is FinishReason.CANCELLED
    assert 5 <= cancelled.completion_tokens < 400
    assert window.chat.view.toPlainText().endswith("[stopped]")
    qtbot.waitUntil(lambda: not window.summary.busy, timeout=60_000)
    assert window.summary.view.toPlainText().strip()

    shot = tmp_path / "desktop_chat.png"
    assert window.grab().save(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    copy_to = os.environ.get("EDGESERVE_SCREENSHOT")
    if copy_to:
        Path(copy_to).write_bytes(shot.read_bytes())

    # Closing the window closes the engine: its thread and the loader are gone.
    assert edgeserve_threads(before) == ["edgeserve-engine"]
    window.close()
    assert window.engine is None
    assert edgeserve_threads(before) == []


@pytest.mark.slow
def test_a_first_use_conversion_drives_the_progress_bar(app_module: ModuleType, qtbot: Any, tmp_path: Path) -> None:
    """The MLX backend converts the GGUF on first use (~20 s here): the bar follows its stages
    instead of spinning, and the window stays responsive meanwhile."""
    pytest.importorskip("mlx_lm", reason="the MLX backend needs the mlx extra: pip install 'edgeserve[mlx]'")
    settings = ModelSettings(model="default", backend="mlx", threads=1, cache_dir=tmp_path)  # nothing cached
    window = app_module.ChatWindow(settings, EngineSettings(policy="fcfs"))
    qtbot.addWidget(window)
    window.show()
    seen: list[tuple[int, int, str]] = []
    window.bar.valueChanged.connect(lambda v: seen.append((v, window.bar.maximum(), window.bar.format())))
    with qtbot.waitSignal(window.loaded, timeout=240_000):
        window.load("default")
    determinate = [(v, f) for v, top, f in seen if top == 1000 and 0 < v < 1000]
    assert len({v for v, _ in determinate}) >= 3, seen  # moved through the stage, not one jump
    assert any(f.startswith("dequantizing") for _, f in determinate), seen
    assert window.bar.value() == window.bar.maximum() == 1
    assert "on mlx" in window.bar.format()
    window.close()
    assert window.engine is None
    # MLX runs on one process-wide thread that backends/mlx.py keeps for the life of the process
    # (MLX streams are bound to a thread); everything else edgeserve started is gone.
    assert [t for t in edgeserve_threads() if t != "edgeserve-mlx"] == []
