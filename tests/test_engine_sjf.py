"""SJF admission inside the engine, on the real model and the shipped length predictor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve import Engine, EngineSettings, FinishReason, ModelSettings, SamplingParams

SHORT = "What is 2+2? Answer with one number."
LONG = "Write a detailed 2000-word essay on the history of the Roman Empire, with sections and examples."


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[tuple[Engine, Path]]:
    log = tmp_path_factory.mktemp("adapt") / "lengths.jsonl"
    settings = EngineSettings(policy="sjf", adapt_log=log, max_queue=8)
    with Engine.from_settings(ModelSettings(model="default", backend="llama", n_ctx=1024), settings) as engine:
        yield engine, log


def test_short_request_overtakes_a_long_one_queued_before_it(engine: Engine) -> None:
    assert engine.settings.policy == "sjf"
    blocker = engine.submit("Go on:", SamplingParams(max_tokens=40, ignore_eos=True))
    long = engine.submit(messages=[{"role": "user", "content": LONG}], params=SamplingParams(max_tokens=4))
    short = engine.submit(messages=[{"role": "user", "content": SHORT}], params=SamplingParams(max_tokens=4))
    views = {v.request_id: v for v in engine.snapshot()}
    assert views[short.request_id].position < views[long.request_id].position
    r_long, r_short = long.result(), short.result()
    blocker.result()
    assert r_short.predicted_tokens is not None and r_long.predicted_tokens is not None
    assert r_short.predicted_tokens < r_long.predicted_tokens
    assert r_short.queue_wait_s < r_long.queue_wait_s  # ran first although it arrived later


def test_token_prompts_wait_as_unknown_length(engine: Engine) -> None:
    h = engine.submit(engine.tokenize("Hello"), SamplingParams(max_tokens=2))
    assert h.result().predicted_tokens is None


def test_natural_ends_are_recorded_for_adaptation_without_prompt_text(recorded: tuple[Engine, Path]) -> None:
    engine, log = recorded
    stopped = engine.generate("1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=24, temperature=0, stop=[" 10"])
    assert stopped.finish_reason is FinishReason.STOP
    capped = engine.generate("1, 2, 3,", max_tokens=3, temperature=0, ignore_eos=True)
    assert capped.finish_reason is FinishReason.LENGTH  # censored length: not recorded
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["tokens"] for entry in lines] == [stopped.completion_tokens]
    assert "prompt" not in lines[0] and "1, 2, 3" not in log.read_text()


def test_aging_is_derived_from_measured_short_requests(recorded: tuple[Engine, Path]) -> None:
    from edgeserve.scheduler import INITIAL_AGING_S

    engine, _ = recorded
    results = [engine.generate("1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=24, temperature=0, stop=[" 10"]) for _ in range(2)]
    assert all(r.finish_reason is FinishReason.STOP for r in results)
    # aging = factor x the running estimate of short requests' service time (AgingTracker, unit-tested
    # in test_scheduler), which this engine has now measured.
    tracker = engine._aging
    assert tracker is not None and tracker.estimate_s is not None and tracker.estimate_s > 0
    assert engine.aging_s != INITIAL_AGING_S
    assert engine.aging_s == pytest.approx(engine.settings.aging_factor * tracker.estimate_s)


def test_a_missing_predictor_artefact_is_a_clear_error_before_loading_the_model(tmp_path: Path) -> None:
    from edgeserve import ModelNotFoundError

    settings = EngineSettings(predictor=tmp_path / "adapted")
    with pytest.raises(ModelNotFoundError, match="no length predictor"):
        Engine.from_settings(ModelSettings(model="default", backend="llama"), settings)
