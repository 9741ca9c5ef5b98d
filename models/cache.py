"""What conversions left in the cache, and cleaning it.

Every converted folder lives at ``<cache_dir>/converted/<digest>-v<version>/<folder>/`` with a
stamp (``edgeserve-convert.json``: format, source GGUF, options). A folder without a stamp is an
interrupted build (``.<folder>.tmp-<pid>``), and one under an older version is never loaded
again; both are listed so that cleaning can be judged, and both go with ``clean_conversions``.
Everything here can be rebuilt from its GGUF, so cleaning loses only the time to convert again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from edgeserve.progress import size_on_disk

from .convert import CONVERT_VERSION, STAMP
from .resolve import ModelEntry

#: How a converted folder is loaded, by its stamp's format.
_BACKEND = {"hf": "mlx", "mlx": "mlx", "onnx": "onnx"}


def conversions_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "converted"


def conversion_entries(cache_dir: Path) -> list[ModelEntry]:
    """One entry per folder under the conversion cache, loadable or not (the note says which)."""
    root = conversions_dir(cache_dir)
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir() and p.parent.name != ".digests"):
        entries.append(_entry(folder))
    return entries


def _builder_pid(folder: Path) -> int | None:
    """The process building into ``folder`` (``.<name>.tmp-<pid>``) if it is still running."""
    head, sep, pid = folder.name.rpartition(".tmp-")
    if not (sep and head.startswith(".") and pid.isdigit()):
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, someone else's
        pass
    return int(pid)


def _entry(folder: Path) -> ModelEntry:
    size = size_on_disk(folder)
    stamp = folder / STAMP
    if not stamp.is_file():
        pid = _builder_pid(folder)
        note = f"being built by process {pid}" if pid else "interrupted conversion: clean removes it"
        return ModelEntry(f"({folder.name})", "converted", folder, size, note)
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return ModelEntry(f"({folder.name})", "converted", folder, size, "unreadable stamp: clean removes it")
    fmt = str(info.get("format", "?"))
    source = Path(str(info.get("source", "?")))
    name = folder.name  # the path column says whose: <cache>/converted/<digest of the GGUF>/<name>
    if info.get("version") != CONVERT_VERSION:
        return ModelEntry(name, "converted", folder, size, "older converter version, never loaded: clean removes it")
    backend = _BACKEND.get(fmt)
    note = f"from {source.name}" + (f"; --model PATH --backend {backend}" if backend else "")
    return ModelEntry(name, "converted", folder, size, note)


def clean_conversions(cache_dir: Path) -> tuple[int, int]:
    """Delete every converted folder but those a running conversion is building; returns (folders
    removed, bytes freed). A model whose conversion is gone is converted again on its next
    ``--backend mlx|onnx`` load. Servers that loaded a folder keep their copy in memory."""
    root = conversions_dir(cache_dir)
    if not root.is_dir():
        return 0, 0
    removed = freed = 0
    for folder in [p for p in root.glob("*/*") if p.is_dir() and p.parent.name != ".digests"]:
        if _builder_pid(folder) is not None:
            continue
        freed += size_on_disk(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    for digest_dir in root.glob("*"):  # the emptied <digest>-v<n> folders
        if digest_dir.is_dir() and digest_dir.name != ".digests" and not any(digest_dir.iterdir()):
            digest_dir.rmdir()
    return removed, freed
