"""SJF admission inside the engine, on the real model and the shipped length predictor."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve import Engine, EngineSettings, FinalEvent, FinishReason, ModelSettings, SamplingParams, TokenEvent

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
    while not engine.busy:  # the blocker holds the engine, so the next two wait
        time.sleep(0.001)
    # The same max_tokens for both: only the predicted lengths tell them apart (a cap below the
    # prediction would bound the cost by itself).
    params = SamplingParams(max_tokens=300)
    long = engine.submit(messages=[{"role": "user", "content": LONG}], params=params)
    short = engine.submit(messages=[{"role": "user", "content": SHORT}], params=params)
    views = {v.request_id: v for v in engine.snapshot()}
    assert views[short.request_id].position < views[long.request_id].position
    assert short.predicted_tokens is not None and long.predicted_tokens is not None
    assert short.predicted_tokens < long.predicted_tokens
    long.cancel()
    short.cancel()
    blocker.result()


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
    tracker = engine._aging  # the engine's derived-aging state (not part of the API)
    assert tracker is not None and tracker.estimate_s is not None and tracker.estimate_s > 0
    assert engine.aging_s != INITIAL_AGING_S
    assert engine.aging_s == pytest.approx(engine.settings.aging_factor * tracker.estimate_s)


def test_a_missing_predictor_artefact_is_a_clear_error_before_loading_the_model(tmp_path: Path) -> None:
    from edgeserve import ModelNotFoundError

    settings = EngineSettings(predictor=tmp_path / "adapted")
    with pytest.raises(ModelNotFoundError, match="no length predictor"):
        Engine.from_settings(ModelSettings(model="default", backend="llama"), settings)


def test_srpt_preempts_a_long_request_on_the_real_model_and_resumes_it_exactly(default_model_path: Path) -> None:
    """With one sequence slot (``--parallel 1``) the long request's KV state is parked to host
    memory while the short one runs, restored after, and its seeded text is the text it gives alone."""
    settings = EngineSettings(policy="srpt", preempt_quantum_s=0.0, aging_s=600.0, max_queue=8)
    model = ModelSettings(model="default", backend="llama", n_ctx=1024, threads=1, parallel=1)
    params = SamplingParams(max_tokens=48, temperature=0.9, seed=5, ignore_eos=True)
    with Engine.from_settings(model, settings) as engine:
        solo = engine.generate("Once upon a time", params)
        handle = engine.submit("Once upon a time", params, predicted_tokens=1000)
        events = iter(handle)
        next(e for e in events if isinstance(e, TokenEvent))
        short = engine.generate("The capital of France is", max_tokens=4, temperature=0, predicted_tokens=4)
        final = next(e for e in events if isinstance(e, FinalEvent)).result
    assert final.text == solo.text
    assert final.preemptions == 1 and final.parked_bytes > 0 and final.resume_s > 0
    assert short.total_s < final.total_s and short.completion_tokens == 4
