"""An embedded engine gives back what it took: ``Engine.close()`` joins its thread and frees the
model, so a desktop app's memory returns near where it was and a second engine can start.

Measured in a child process, so that nothing else this test session loaded moves the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

CHILD = r"""
import ctypes, ctypes.util, gc, json, threading
import psutil
from edgeserve import Engine, EngineSettings, ModelSettings
import edgeserve.backends.llama  # imported before the baseline: the code is not what close frees

settings = ModelSettings(model="default", backend="llama", threads=1)
proc = psutil.Process()

def rss():
    gc.collect()
    return proc.memory_info().rss

def edgeserve_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("edgeserve")]

figures = {"before_load": rss()}
engine = Engine.from_settings(settings, EngineSettings(policy="fcfs"))
first = engine.generate("The capital of France is", max_tokens=16, temperature=0).text
figures["after_load"] = rss()
figures["threads_while_open"] = edgeserve_threads()
engine.close()
del engine
figures["after_close"] = rss()
figures["threads_after_close"] = edgeserve_threads()
# glibc keeps freed heap pages in its arenas for reuse; malloc_trim hands them to the OS, which
# shows what close() really released rather than what the allocator kept.
libc = ctypes.util.find_library("c")
if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
    ctypes.CDLL(libc).malloc_trim(0)
figures["after_close_trimmed"] = rss()
with Engine.from_settings(settings, EngineSettings(policy="fcfs")) as second:
    figures["second_engine_text"] = second.generate("The capital of France is", max_tokens=16, temperature=0).text
figures["first_engine_text"] = first
figures["after_second_close"] = rss()
figures["threads_at_end"] = edgeserve_threads()
print(json.dumps(figures))
"""


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = {k: round(v / 1e6) for k, v in result.items() if isinstance(v, int)}
    print(f"RSS MB: {mb}")  # the figures issue 14 asks for (pytest -s shows them)
    return result


@pytest.mark.slow
def test_close_joins_the_engine_thread(figures: dict[str, Any]) -> None:
    assert figures["threads_while_open"] == ["edgeserve-engine"]
    assert figures["threads_after_close"] == []
    assert figures["threads_at_end"] == []


@pytest.mark.slow
def test_close_frees_the_model(figures: dict[str, Any]) -> None:
    base, loaded = figures["before_load"], figures["after_load"]
    grown = loaded - base
    assert grown > 200e6  # the model and its context really were in memory (~390 MB here)
    # What the process still holds after close, with the allocator's free pages returned: near
    # the baseline (measured: +3 MB of +393 MB).
    assert figures["after_close_trimmed"] - base < 0.15 * grown
    # Untrimmed, glibc keeps some freed pages (measured +56 to +87 MB), but the model is gone.
    assert figures["after_close"] - base < 0.4 * grown


@pytest.mark.slow
def test_a_second_engine_starts_after_close_and_memory_does_not_ratchet(figures: dict[str, Any]) -> None:
    assert figures["second_engine_text"] == figures["first_engine_text"] != ""
    grown = figures["after_load"] - figures["before_load"]
    assert figures["after_second_close"] - figures["before_load"] < 0.4 * grown
