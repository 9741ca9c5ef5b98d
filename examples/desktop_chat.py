"""A desktop chat window on the edgeserve library (PySide6): a model picker with a load progress
bar, a streaming chat pane with Stop, a second pane that summarises the conversation on the same
engine, and TTFT and tok/s in the status bar.

    pip install 'edgeserve[desktop]'
    python examples/desktop_chat.py [--model default] [--threads 2]

The UI thread never waits on the model. Everything edgeserve calls back (load progress, tokens,
the final result) runs on edgeserve's threads and is turned into Qt signals; a signal emitted on
another thread reaches its slot through the receiver's event queue (``QueuedConnection``), so the
widgets are only ever touched by the UI thread.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from edgeserve import Engine, EngineSettings, ErrorEvent, FinalEvent, GenerationResult, ModelSettings, TokenEvent
from edgeserve.models import list_models
from edgeserve.progress import ProgressEvent
from edgeserve.types import StreamEvent

#: Explicit, because a slot that is a plain function has no thread of its own for Qt to compare.
QUEUED = Qt.ConnectionType.QueuedConnection
CHAT_PREAMBLE = "A conversation between a user and a helpful assistant."


# ---- the adapter: edgeserve callbacks → Qt signals ----------------------------------------------


class LoadSignals(QObject):
    """``Engine.from_settings(progress=signals.progress.emit)`` on a worker thread."""

    progress = Signal(object)  # ProgressEvent: a conversion's stages, the load's start and end
    loaded = Signal(object)  # Engine
    failed = Signal(str)


class RequestSignals(QObject):
    """``engine.submit(..., on_event=signals.on_event)``: one request's stream as signals."""

    token = Signal(str)
    finished = Signal(object)  # GenerationResult (finish_reason says stop, length or cancelled)
    failed = Signal(str)

    def on_event(self, event: StreamEvent) -> None:  # runs on the engine's thread
        if isinstance(event, TokenEvent):
            self.token.emit(event.text)
        elif isinstance(event, FinalEvent):
            self.finished.emit(event.result)
        elif isinstance(event, ErrorEvent):
            self.failed.emit(f"{type(event.error).__name__}: {event.error}")


# ---- the window ---------------------------------------------------------------------------------


class StreamPane(QWidget):
    """A text pane that streams one request at a time into itself; ``stop()`` cancels it."""

    done = Signal(object)  # GenerationResult, or an error message (str)

    def __init__(self, title: str, button: str, strip_first: bool = False) -> None:
        super().__init__()
        self.strip_first = strip_first  # the first token's leading space, after a "Model: " label
        self.view = QPlainTextEdit(readOnly=True)
        self.run_button, self.stop_button = QPushButton(button), QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.tokens = 0
        self._handle: Any = None
        self._signals: RequestSignals | None = None  # kept alive until the request ends
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel(f"<b>{title}</b>"))
        layout.addWidget(self.view)
        self.controls = QHBoxLayout()
        self.controls.addWidget(self.run_button)
        self.controls.addWidget(self.stop_button)
        layout.addLayout(self.controls)

    @property
    def busy(self) -> bool:
        return self._handle is not None

    def start(self, engine: Engine, **request: Any) -> None:
        signals = RequestSignals()
        signals.token.connect(self._token, QUEUED)
        signals.finished.connect(self._finished, QUEUED)
        signals.failed.connect(self._failed, QUEUED)
        self._signals, self.tokens = signals, 0
        self._handle = engine.submit(on_event=signals.on_event, **request)
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()  # ends within one decode step; a FinalEvent (cancelled) follows

    def append(self, text: str) -> None:
        cursor = self.view.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        cursor.insertText(text)
        self.view.setTextCursor(cursor)

    def _token(self, text: str) -> None:
        self.tokens += 1
        self.append(text.lstrip() if self.tokens == 1 and self.strip_first else text)

    def _finished(self, result: GenerationResult) -> None:
        self._end()
        self.done.emit(result)

    def _failed(self, message: str) -> None:
        self._end()
        self.append(f"\n[error: {message}]")
        self.done.emit(message)

    def _end(self) -> None:
        self._handle = self._signals = None
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)


class ChatWindow(QMainWindow):
    loaded = Signal()

    def __init__(
        self,
        settings: ModelSettings | None = None,
        engine_settings: EngineSettings | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.setWindowTitle("edgeserve desktop chat")
        self.settings = settings or ModelSettings()
        self.engine_settings = engine_settings or EngineSettings()
        self.sampling = sampling or {"max_tokens": 200, "temperature": 0.7, "repetition_penalty": 1.1}
        self.engine: Engine | None = None
        self.history: list[dict[str, str]] = []
        self._loader: threading.Thread | None = None
        self._load_signals = LoadSignals()
        self._load_signals.progress.connect(self._progress, QUEUED)
        self._load_signals.loaded.connect(self._loaded, QUEUED)
        self._load_signals.failed.connect(self._load_failed, QUEUED)
        self._build()

    def _build(self) -> None:
        self.picker = QComboBox()
        for entry in list_models(self.settings.cache_dir):
            size = f" ({entry.size_bytes / 1e6:.0f} MB)" if entry.size_bytes else ""
            self.picker.addItem(f"{entry.name}{size}", entry.name)
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(lambda: self.load(self.picker.currentData()))
        self.bar = QProgressBar()
        self.bar.setFormat("no model")
        top = QHBoxLayout()
        for widget, stretch in ((QLabel("Model:"), 0), (self.picker, 1), (self.load_button, 0), (self.bar, 2)):
            top.addWidget(widget, stretch)
        self.chat = StreamPane("Chat", "Send", strip_first=True)
        self.input = QLineEdit(placeholderText="Say something and press Enter")
        self.chat.controls.insertWidget(0, self.input, 1)
        self.input.returnPressed.connect(lambda: self.send(self.input.text()))
        self.chat.run_button.clicked.connect(lambda: self.send(self.input.text()))
        self.chat.done.connect(self._chat_done)
        self.summary = StreamPane("Summary (same engine)", "Summarise")
        self.summary.run_button.clicked.connect(self.summarise)
        self.summary.done.connect(self._show_figures)
        for pane in (self.chat, self.summary):
            pane.run_button.setEnabled(False)
        split = QSplitter()
        split.addWidget(self.chat)
        split.addWidget(self.summary)
        split.setSizes([600, 400])
        root = QWidget()
        layout = QVBoxLayout(root)
        layout.addLayout(top)
        layout.addWidget(split, 1)
        self.setCentralWidget(root)
        self.statusBar().showMessage("pick a model and press Load")
        self.resize(960, 560)

    # ---- loading ----------------------------------------------------------------------------

    def load(self, name: str) -> None:
        """Load ``name`` on a worker thread (converting it first if its backend needs that);
        the engine it replaces is closed there too, so its memory is freed before the new load."""
        if self._loader is not None and self._loader.is_alive():
            return
        old, self.engine = self.engine, None
        for pane in (self.chat, self.summary):
            pane.stop()
            pane.run_button.setEnabled(False)
        self.load_button.setEnabled(False)
        self.bar.setRange(0, 0)  # busy until the first event with a length
        self.bar.setFormat(f"loading {name}")
        self.statusBar().showMessage(f"loading {name}…")
        settings = self.settings.model_copy(update={"model": name})
        signals = self._load_signals

        def work() -> None:
            try:
                if old is not None:
                    old.close()
                engine = Engine.from_settings(settings, self.engine_settings, progress=signals.progress.emit)
            except Exception as exc:  # shown in the window; the app stays usable
                signals.failed.emit(f"{type(exc).__name__}: {exc}")
                return
            self.engine = engine  # set here too, so a window closed mid-load still closes it
            signals.loaded.emit(engine)

        self._loader = threading.Thread(target=work, name="edgeserve-desktop-load", daemon=True)
        self._loader.start()

    def _progress(self, event: ProgressEvent) -> None:
        fraction = event.fraction
        if event.kind == "step" and fraction is not None:
            self.bar.setRange(0, 1000)
            self.bar.setValue(round(fraction * 1000))
            self.bar.setFormat(f"{event.stage}: %p%")
        elif event.kind in ("start", "step"):
            self.bar.setRange(0, 0)
            self.bar.setFormat(event.stage or event.task)
        self.statusBar().showMessage(f"{event.task}: {event.stage or event.kind} ({event.elapsed:.1f} s)")

    def _loaded(self, engine: Engine) -> None:
        self.bar.setRange(0, 1)
        self.bar.setValue(1)
        self.bar.setFormat(f"{engine.capabilities.model} on {engine.capabilities.backend}")
        self.load_button.setEnabled(True)
        for pane in (self.chat, self.summary):
            pane.run_button.setEnabled(True)
        self.statusBar().showMessage("ready")
        self.loaded.emit()

    def _load_failed(self, message: str) -> None:
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setFormat("load failed")
        self.load_button.setEnabled(True)
        self.statusBar().showMessage(message)

    # ---- the two panes ----------------------------------------------------------------------

    def send(self, text: str) -> None:
        if not text.strip() or self.engine is None or self.chat.busy:
            return
        self.input.clear()
        self.history.append({"role": "user", "content": text})
        shown = self.chat.view.toPlainText()
        self.chat.append(("" if not shown else "\n" if shown.endswith("\n") else "\n\n") + f"You: {text}\nModel: ")
        if self.engine.capabilities.chat_template:
            self.chat.start(self.engine, messages=list(self.history), **self.sampling)
        else:  # a base model (the default one): it continues a transcript far better than a chat template
            sampling = {**self.sampling, "stop": ("\nUser:",)}
            self.chat.start(self.engine, prompt=transcript(self.history) + "\nAssistant:", **sampling)

    def summarise(self) -> None:
        if self.engine is None or self.summary.busy or not self.history:
            return
        lead = "In one sentence, the user asked about"
        prompt = transcript(self.history, "Conversation:") + f"\n\n{lead}"
        self.summary.view.clear()
        self.summary.append(lead)
        self.summary.start(self.engine, prompt=prompt, max_tokens=60, temperature=0, stop=("\n",))

    def _chat_done(self, result: GenerationResult | str) -> None:
        if isinstance(result, GenerationResult):
            self.history.append({"role": "assistant", "content": result.text.strip()})
            if result.finish_reason.value == "cancelled":
                self.chat.append(" [stopped]")
        self._show_figures(result)

    def _show_figures(self, result: GenerationResult | str) -> None:
        if isinstance(result, str):
            self.statusBar().showMessage(result)
            return
        ttft = f"TTFT {result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else "TTFT –"
        rate = f"{result.decode_tok_s:.1f} tok/s" if result.decode_tok_s else "– tok/s"
        self.statusBar().showMessage(
            f"{ttft} · {rate} · {result.completion_tokens} tokens · {result.finish_reason.value}"
        )

    # ---- closing ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop both panes, wait for a load in progress, close the engine (joins its thread)."""
        for pane in (self.chat, self.summary):
            pane.stop()
        if self._loader is not None:
            self._loader.join()
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def closeEvent(self, event: QCloseEvent) -> None:
        self.shutdown()
        super().closeEvent(event)


def transcript(history: list[dict[str, str]], title: str = CHAT_PREAMBLE) -> str:
    lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in history]
    return title + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="A name from `edgeserve models`, or a path.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
    args = parser.parse_args(argv)
    app = QApplication(sys.argv[:1])
    settings = ModelSettings() if args.threads is None else ModelSettings(threads=args.threads)
    window = ChatWindow(settings)
    index = window.picker.findData(args.model)
    if index >= 0:
        window.picker.setCurrentIndex(index)
    window.show()
    window.load(args.model)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
