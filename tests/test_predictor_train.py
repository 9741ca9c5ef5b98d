"""Training and adaptation on a tiny synthetic ShareGPT file (seconds, not the real run)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgeserve.errors import InvalidParameterError
from edgeserve.predictor import AdaptationLog, LengthPredictor
from edgeserve.predictor.adapt import AdaptConfig, adapt, read_log
from edgeserve.predictor.data import iter_sharegpt_records, load_sharegpt, sharegpt_examples, split_by_group
from edgeserve.predictor.train import NoProgress, TrainConfig, prepare

pytest.importorskip("xgboost")
pytest.importorskip("onnxmltools")

from edgeserve.predictor.cli import predictor

TOPICS = ["tides", "rome", "python", "coffee", "chess", "jazz", "volcanoes", "taxes"]


def synthetic_sharegpt(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Conversations whose answer length follows the wording: 'briefly' short, 'essay' long."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            topic = rng.choice(TOPICS)
            if rng.random() < 0.5:
                q, a = f"Briefly, what is {topic}?", "It is " + "x " * rng.randint(3, 30)
            else:
                q, a = f"Write a long essay about {topic} in detail.", "Para. " * rng.randint(300, 900)
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": f"c{i}_0", "conversations": turns})
    text = json.dumps(records, indent=1)
    # Cut the file mid-record, as the packaged one is.
    path.write_text(text[: len(text) - 200], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sharegpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_sharegpt(tmp_path_factory.mktemp("sharegpt") / "tiny.json")


def test_parser_keeps_complete_records_of_a_truncated_file(sharegpt: Path) -> None:
    records = list(iter_sharegpt_records(sharegpt.read_text()))
    assert len(records) == 159  # the last one is cut off
    examples = load_sharegpt(sharegpt)
    assert all(e.messages[-1]["role"] == "user" and e.answer for e in examples)


def test_pairs_carry_history_and_split_by_conversation() -> None:
    record = {
        "id": "abc_1",
        "conversations": [
            {"from": "gpt", "value": "(answer to a turn in part 0)"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ],
    }
    pairs = list(sharegpt_examples(iter([record, {**record, "id": "abc_2"}, {**record, "id": "xyz_0"}])))
    assert [p.answer for p in pairs[:2]] == ["a1", "a2"]
    assert [m["content"] for m in pairs[1].messages] == ["(answer to a turn in part 0)", "q1", "a1", "q2"]
    assert {p.group for p in pairs} == {"abc", "xyz"}
    for seed in range(5):
        sides = split_by_group(pairs, test_fraction=0.3, valid_fraction=0.3, seed=seed)
        groups = [{p.group for p in side} for side in sides]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])


def tiny_config(**overrides: Any) -> TrainConfig:
    return TrainConfig(tokenizer="approx", n_trees=20, min_groups=3, vocab_size=20, nthread=1, **overrides)


def test_train_is_deterministic_and_onnx_matches_xgboost(sharegpt: Path) -> None:
    from edgeserve.predictor.train import train

    first = train(tiny_config(), sharegpt=sharegpt)
    second = train(tiny_config(), sharegpt=sharegpt)
    assert first.onnx_bytes == second.onnx_bytes
    assert first.meta == second.meta
    data = prepare(tiny_config(), NoProgress(), sharegpt)
    loaded = LengthPredictor(first.onnx_bytes, first.spec, LengthPredictor.load().calibration, first.meta)
    np.testing.assert_allclose(loaded.scores(data.test.x), first.model.predict(data.test.x), rtol=1e-5, atol=1e-5)
    # The toy rule is learnable: an essay request ranks above a brief one.
    assert (
        loaded.predict("Briefly, what is jazz?").score
        < loaded.predict("Write a long essay about jazz in detail.").score
    )


def test_cli_train_writes_a_loadable_artefact(sharegpt: Path, tmp_path: Path) -> None:
    args = ["train", "--sharegpt", str(sharegpt), "--tokenizer", "approx", "--out", str(tmp_path / "lp")]
    result = CliRunner().invoke(predictor, args)
    assert result.exit_code == 0, result.output
    assert "model identical to the shipped artefact: no" in result.output
    assert LengthPredictor.load(tmp_path / "lp.onnx").predict("hi").expected_tokens >= 0


def test_adaptation_log_stores_features_not_prompts(tmp_path: Path) -> None:
    base = LengthPredictor.load()
    log = AdaptationLog(tmp_path / "log.jsonl", base.spec)
    log.record("What is the secret plan?", 12)
    log.record(base.features([{"role": "user", "content": "Tell me a story"}]), 640)
    with pytest.raises(InvalidParameterError):
        log.record("", 5)
    with pytest.raises(InvalidParameterError):
        log.record("fine", -1)
    with pytest.raises(InvalidParameterError):
        log.record(np.zeros(3, dtype=np.float32), 5)
    text = (tmp_path / "log.jsonl").read_text()
    assert "secret" not in text
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write("not json\n")
        f.write(json.dumps({"v": 1, "spec": "other", "x": {}, "tokens": 3}) + "\n")
    x, tokens, skipped = read_log(tmp_path / "log.jsonl", base.spec)
    assert tokens.tolist() == [12.0, 640.0]
    assert skipped == 2
    np.testing.assert_array_equal(x[1], base.features([{"role": "user", "content": "Tell me a story"}]))
    prompts = AdaptationLog(tmp_path / "with.jsonl", base.spec, store_prompts=True)
    prompts.record("keep me", 3)
    assert json.loads((tmp_path / "with.jsonl").read_text())["prompt"] == "keep me"


def test_adapt_moves_predictions_toward_the_logged_lengths(sharegpt: Path, tmp_path: Path) -> None:
    from edgeserve.predictor.export import write_artefact
    from edgeserve.predictor.train import train

    trained = train(tiny_config(), sharegpt=sharegpt)
    write_artefact(tmp_path / "base", trained.onnx_bytes, trained.meta)
    base = LengthPredictor.load(tmp_path / "base")
    # The served model answers "briefly" questions at length: the log says so 60 times.
    log = AdaptationLog(tmp_path / "log.jsonl", base.spec)
    for topic in TOPICS * 8:
        log.record(f"Briefly, what is {topic}?", 900)
    with pytest.raises(InvalidParameterError):
        adapt(base, *read_log(tmp_path / "log.jsonl", base.spec)[:2], AdaptConfig(min_records=1000))
    prepared = prepare(tiny_config(), NoProgress(), sharegpt, spec=base.spec)
    x, tokens, _ = read_log(tmp_path / "log.jsonl", base.spec)
    result = adapt(base, x, tokens, AdaptConfig(), prepared=prepared)
    assert result.meta["adaptation"]["records"] == 64
    write_artefact(tmp_path / "adapted", result.onnx_bytes, result.meta)
    adapted = LengthPredictor.load(tmp_path / "adapted")
    before = base.predict("Briefly, what is chess?").expected_tokens
    after = adapted.predict("Briefly, what is chess?").expected_tokens
    assert after > 2 * before
