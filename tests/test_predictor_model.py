"""The shipped length predictor: loads, orders obvious cases, stays fast; metrics are exact."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgeserve.errors import InvalidParameterError, ModelNotFoundError
from edgeserve.predictor import FEATURE_SPEC_VERSION, LengthPredictor
from edgeserve.predictor import metrics as m
from edgeserve.predictor.model import artefact_paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return LengthPredictor.load()


def test_shipped_artefact_is_small_and_described() -> None:
    onnx_path, json_path = artefact_paths(ROOT / "models" / "length_predictor")
    assert onnx_path.stat().st_size < 5_000_000
    meta = json.loads(json_path.read_text())
    assert meta["features"]["version"] == FEATURE_SPEC_VERSION
    assert meta["training_data"]["pairs"] > 50_000
    assert {"short_long_accuracy", "kendall_tau"} <= set(meta["metrics"]["test"])


def test_obvious_short_ranks_below_obvious_long(predictor: LengthPredictor) -> None:
    short = predictor.predict("What is the capital of France? Answer in one word.")
    long = predictor.predict(
        "Write a detailed 3000-word essay on the history of the Roman Empire, with an introduction, "
        "ten sections with headings, and a conclusion."
    )
    assert short.score < long.score
    assert short.expected_tokens < long.expected_tokens
    assert short.length_class == "short"
    assert long.length_class in ("medium", "long")


def test_every_message_shape_predicts(predictor: LengthPredictor) -> None:
    shapes: list[object] = [
        "hi",
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]}],
        [
            {"role": "user", "content": "Write a poem"},
            {"role": "assistant", "content": "Roses are red..."},
            {"role": "user", "content": "Another one, longer"},
        ],
    ]
    for shape in shapes:
        p = predictor.predict(shape)  # type: ignore[arg-type]
        assert p.expected_tokens > 0
        assert p.length_class in ("short", "medium", "long")
        assert set(p.to_json()) == {"expected_tokens", "class"}


def test_batch_matches_single(predictor: LengthPredictor) -> None:
    prompts = ["hi", "Explain quantum computing", "List 20 fruit"]
    single = [predictor.predict(p).score for p in prompts]
    batch = [p.score for p in predictor.predict_many(prompts)]
    np.testing.assert_allclose(single, batch, rtol=1e-6)


def test_empty_prompt_is_a_clear_error(predictor: LengthPredictor) -> None:
    with pytest.raises(InvalidParameterError, match="empty"):
        predictor.predict("")


def test_missing_or_broken_artefact_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        LengthPredictor.load(tmp_path / "nothing")
    onnx_path, json_path = artefact_paths(ROOT / "models" / "length_predictor")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    (tmp_path / "bad.json").write_bytes(json_path.read_bytes())
    with pytest.raises(ModelNotFoundError, match="loadable"):
        LengthPredictor.load(tmp_path / "bad")
    (tmp_path / "meta.onnx").write_bytes(onnx_path.read_bytes())
    (tmp_path / "meta.json").write_text('{"features": {}}')
    with pytest.raises(ModelNotFoundError, match="metadata"):
        LengthPredictor.load(tmp_path / "meta.json")
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(ModelNotFoundError, match="not JSON"):
        LengthPredictor.load(tmp_path / "meta")


def test_predict_is_fast(predictor: LengthPredictor) -> None:
    prompt = [{"role": "user", "content": "Can you explain how transformers work, step by step?"}]
    for _ in range(200):
        predictor.predict(prompt)
    times = []
    for _ in range(1000):
        start = time.perf_counter()
        predictor.predict(prompt)
        times.append(time.perf_counter() - start)
    # Generous bound for a loaded CI machine; bench/predictor_eval.py measures the real figure.
    assert float(np.median(times)) < 0.5e-3


def _brute_pairs(s: np.ndarray, t: np.ndarray, ok: object) -> float:
    good = total = 0.0
    for i, j in itertools.permutations(range(len(t)), 2):
        if ok(t[i], t[j]):  # type: ignore[operator]
            total += 1
            good += 1.0 if s[i] < s[j] else (0.5 if s[i] == s[j] else 0.0)
    return good / total


def test_pair_metrics_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(1, 2000, 120).astype(float)
    s = np.round(np.log(t) + rng.normal(0, 1, 120), 1)  # rounding makes ties
    assert m.ratio_pair_accuracy(s, t) == pytest.approx(_brute_pairs(s, t, lambda a, b: 2 * a <= b))
    assert m.short_long_accuracy(s, t) == pytest.approx(_brute_pairs(s, t, lambda a, b: a < 200 and b >= 800))
    assert m.short_long_accuracy(np.zeros(120), t) == pytest.approx(0.5)


def test_kendall_tau_b_with_ties() -> None:
    x = np.array([1, 2, 2, 3, 4, 4, 5], dtype=float)
    y = np.array([1, 3, 2, 2, 5, 4, 4], dtype=float)
    concordant = discordant = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sign = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
        concordant += sign > 0
        discordant += sign < 0
    n0 = len(x) * (len(x) - 1) / 2
    ties_x = sum(x[i] == x[j] for i, j in itertools.combinations(range(len(x)), 2))
    ties_y = sum(y[i] == y[j] for i, j in itertools.combinations(range(len(y)), 2))
    expected = (concordant - discordant) / np.sqrt((n0 - ties_x) * (n0 - ties_y))
    assert m.kendall_tau(x, y) == pytest.approx(expected)
    assert m.kendall_tau(x, x) == pytest.approx(1.0)


def test_class_is_the_bucket_of_expected_tokens(predictor: LengthPredictor) -> None:
    for score in np.linspace(0.0, 9.0, 181):
        p = predictor.from_score(float(score))
        bucket = m.CLASSES[m.length_class(p.expected_tokens)]
        # At a boundary itself float rounding may fall either way; everywhere else they agree.
        if min(abs(p.expected_tokens - m.SHORT_MAX), abs(p.expected_tokens - m.LONG_MIN)) > 1e-6:
            assert p.length_class == bucket
