"""Length-predictor features: every request shape, one feature function for training and serving."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from edgeserve.errors import InvalidParameterError
from edgeserve.predictor import FeatureSpec, LengthPredictor, feature_row, to_request
from edgeserve.predictor.data import Example
from edgeserve.predictor.features import DENSE_NAMES, N_DENSE, feature_names
from edgeserve.predictor.train import NoProgress, build_dataset

SPEC = FeatureSpec(vocab=("essay", "^write", "write an", "briefly", "hi"))


def value(row: np.ndarray, name: str) -> float:
    return float(row[feature_names(SPEC).index(name)])


@pytest.fixture(scope="module")
def shipped() -> LengthPredictor:
    return LengthPredictor.load()


def test_training_and_serving_rows_are_identical(shipped: LengthPredictor) -> None:
    conversations: list[tuple[dict[str, Any], ...]] = [
        ({"role": "user", "content": "Write an essay about tides, in detail."},),
        (
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3? Explain in 3 sentences."},
        ),
        ({"role": "user", "content": "```python\nprint('x')\n```\nWhy does this fail? " * 300},),
    ]
    examples = [Example(group=str(i), messages=m, answer="", output_tokens=10) for i, m in enumerate(conversations)]
    trained = build_dataset(examples, shipped.spec, NoProgress(), "t").x
    for i, messages in enumerate(conversations):
        served = shipped.features(list(messages))
        np.testing.assert_array_equal(trained[i], served)
        # And the predict path reads the same row.
        shipped.predict(list(messages))
        np.testing.assert_array_equal(shipped._row[0], served)


def test_string_and_message_shapes_give_the_same_row() -> None:
    text = "Write an essay on tides in 500 words."
    shapes: list[Any] = [
        text,
        [{"role": "user", "content": text}],
        [{"role": "user", "content": [{"type": "text", "text": text}]}],
        ({"role": "user", "content": [{"type": "text", "text": text}]},),
    ]
    rows = [feature_row(shape, SPEC) for shape in shapes]
    for row in rows[1:]:
        np.testing.assert_array_equal(rows[0], row)


def test_content_arrays_join_text_parts_and_count_media() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this picture."},
            ],
        }
    ]
    request = to_request(messages)
    assert request.last_user == "Describe\nthis picture."
    assert request.media_parts == 1
    # An image with no text is still something to answer.
    assert (
        to_request([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]).media_parts == 1
    )


def test_multi_turn_history_and_system_prompt() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in under 50 words."},
        {"role": "user", "content": "Tell me about Rome."},
        {"role": "assistant", "content": "x" * 1000},
        {"role": "tool", "content": "ignored"},
        {"role": "user", "content": "continue"},
    ]
    request = to_request(messages)
    assert request.last_user == "continue"
    assert (request.user_turns, request.assistant_turns) == (2, 1)
    assert request.prev_assistant_chars == 1000
    assert request.history_user_chars == len("Tell me about Rome.")
    assert request.system == "Be brief.\nAnswer in under 50 words."
    row = feature_row(messages, SPEC)
    assert value(row, "has_system") == 1.0
    assert value(row, "system_cue_brief") >= 1.0
    assert value(row, "user_turns") == 2.0
    assert value(row, "cue_continue") == 1.0
    assert value(row, "log_prev_answer_chars") == pytest.approx(np.log1p(1000))


def test_requested_amounts_and_cues() -> None:
    row = feature_row("Write a 500-word essay, then list 5 ideas.", SPEC)
    assert value(row, "ask_words") == pytest.approx(np.log1p(500))
    assert value(row, "ask_items") == pytest.approx(np.log1p(5))
    assert value(row, "ask_is_ceiling") == 0.0
    assert value(row, "verb_write") == 1.0
    assert value(row, "term:essay") == 1.0
    assert value(row, "term:^write") == 1.0
    assert value(row, "term:write an") == 0.0  # "write a", not "write an"
    ceiling = feature_row("Summarize it in no more than 50 words", SPEC)
    assert value(ceiling, "ask_is_ceiling") == 1.0
    # "in detail" is one cue, not "detail" plus something else.
    assert value(feature_row("Explain it in detail", SPEC), "cue_long") == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   \n",
        [],
        [{"role": "system", "content": "You are helpful."}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [42]}],
        ["not a message"],
        b"bytes",
        42,
    ],
)
def test_empty_or_malformed_requests_raise_invalid_parameter(bad: Any) -> None:
    with pytest.raises(InvalidParameterError):
        feature_row(bad, SPEC)


def test_row_layout_and_names() -> None:
    assert len(feature_names(SPEC)) == SPEC.n_features == N_DENSE + len(SPEC.vocab)
    assert len(set(DENSE_NAMES)) == N_DENSE
    assert FeatureSpec.from_json(SPEC.to_json()) == SPEC


def test_cost_is_bounded_for_huge_prompts() -> None:
    huge = "word " * 400_000 + "Summarize briefly."
    row = feature_row(huge, SPEC)  # warm
    start = time.perf_counter()
    row = feature_row(huge, SPEC)
    assert time.perf_counter() - start < 0.05
    assert value(row, "cue_brief") == 1.0  # the tail of the prompt is read


def test_vocabulary_hits_match_the_terms_selection_counted(shipped: LengthPredictor) -> None:
    # Vocabulary selection counts request_terms(); featurize must light up exactly those columns.
    from edgeserve.predictor.features import request_terms

    for prompt in [
        "How to write a function in python that can you continue",
        "hi there, can you help me write a story?",
        "Thank you! Continue writing please, and write code for the api.",
    ]:
        row = shipped.features(prompt)
        lit = {i for i in np.flatnonzero(row[N_DENSE:]) + N_DENSE}
        expected = {shipped.spec.columns[t] for t in request_terms(to_request(prompt)) if t in shipped.spec.columns}
        assert lit == expected
        assert expected  # the prompts do use vocabulary terms


def test_lexical_prior_sums_the_weights_of_the_terms_training_used(shipped: LengthPredictor) -> None:
    from edgeserve.predictor.features import request_terms

    spec = shipped.spec
    assert len(spec.prior) > 1000
    for prompt in ["Write a story about a dragon, a dragon!", "hi", "Translate to French: good morning"]:
        terms = request_terms(to_request(prompt))
        expected = spec.prior_intercept + sum(spec.prior.get(t, 0.0) for t in terms)
        row = shipped.features(prompt)
        assert float(row[DENSE_NAMES.index("lexical_prior")]) == pytest.approx(expected, abs=1e-5)


def test_any_string_is_predicted_lone_surrogates_included(shipped: LengthPredictor) -> None:
    """Issue 19, defect 3: the predictor takes any str, as JSON can deliver it ("\\ud800" decodes to a
    lone surrogate, which UTF-8 refuses); such text reads as U+FFFD, as a UTF-8 decoder shows it."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgeserve.predictor.tokens import approx_tokens

    # Every code point, surrogates included (hypothesis leaves those out of text() by default).
    any_text = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=200)

    @settings(max_examples=300, deadline=None)
    @given(any_text, st.sampled_from(["string", "chat", "parts"]))
    def check(text: str, shape: str) -> None:
        prompt: Any = {
            "string": "x " + text,
            "chat": [{"role": "system", "content": text}, {"role": "user", "content": "x " + text}],
            "parts": [{"role": "user", "content": [{"type": "text", "text": "x " + text}]}],
        }[shape]
        assert shipped.predict(prompt).expected_tokens > 0
        assert approx_tokens(text) >= 1

    check()
    lone = shipped.features("a\ud800 b\udfff")
    np.testing.assert_array_equal(lone, shipped.features("a\ufffd b\ufffd"))
