"""Shared fixtures. Real-model tests use the embedded default model (Gemma 3 270M, llama.cpp),
loaded once per session: it is small enough (253 MB) to run the whole suite on two CPU cores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.engine import Engine
from edgeserve.settings import EngineSettings, ModelSettings


@pytest.fixture(scope="session")
def model_settings() -> ModelSettings:
    return ModelSettings(model="default", backend="llama", n_ctx=2048)


@pytest.fixture(scope="session")
def default_model_path(model_settings: ModelSettings) -> Path:
    from edgeserve.models import resolve

    return resolve("default", cache_dir=model_settings.cache_dir).path


@pytest.fixture(scope="session")
def engine(model_settings: ModelSettings, default_model_path: Path) -> Iterator[Engine]:
    """One sequence at a time (``--parallel 1``): the tests that use it pin queueing order."""
    serial = model_settings.model_copy(update={"parallel": 1})
    with Engine.from_settings(serial, EngineSettings(max_queue=8)) as eng:
        yield eng
