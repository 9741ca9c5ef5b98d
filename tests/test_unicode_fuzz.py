"""Hypothesis over every place arbitrary text goes: the wire models, chat rendering, the length
predictor, the real tokenizer, the engine, and the live server, with any Unicode, template markers
and lone UTF-16 surrogates (``"\\ud800"``: valid as a JSON escape, never a character).

What must hold for any text: the server answers 200 or a 4xx, never a 5xx; rendering keeps user
text apart from the template's markers (no forged turns); the predictor takes any string; the
tokenizer reads a template marker in user text as plain text, and gives the text back unchanged.
"""

from __future__ import annotations

import http.client
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fixtures import live_server, wait_idle

from edgeserve import chat
from edgeserve.engine import Engine
from edgeserve.errors import InvalidParameterError, UserError
from edgeserve.predictor import LengthPredictor
from edgeserve.server import openai_wire
from edgeserve.server.app import create_app
from edgeserve.settings import ServerSettings
from edgeserve.types import Capabilities, SamplingParams

MARKERS = (
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "\ue000",  # the private-use marks chat.render itself uses around content
    "\ue001",
    "{{ messages }}",
    "{% raw %}",
    "\n\n",
    "User:",
)
#: Any text: ordinary Unicode, template markers, and lone surrogates (rare in ``st.text``: drawn apart).
ANY_TEXT = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from(MARKERS), st.characters(categories=["Cs"])), max_size=8
).map("".join)
#: Text a UTF-8 encoder takes (no surrogates).
UNICODE_TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(MARKERS)), max_size=8).map("".join)
ROLE = st.sampled_from(sorted(chat.ROLES))
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLE, "content": ANY_TEXT}), min_size=1, max_size=5)
QUICK = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SURROGATES = openai_wire.SURROGATE


def _caps(architecture: str, template: str | None = None) -> Capabilities:
    return Capabilities(
        backend="test",
        model="test",
        n_ctx=4096,
        n_vocab=1000,
        eog_token_ids=frozenset({1}),
        bos_token_id=2,
        chat_template=template,
        bos_token="<bos>",
        eos_token="<eos>",
        architecture=architecture,
    )


CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
FORMATS = {
    # format → (capabilities, the marker that opens a turn, turns that open one for these messages)
    "gemma": (_caps("gemma3"), "<start_of_turn>", lambda turns: sum(t.role != "system" for t in turns) + 1),
    "chatml": (_caps("qwen2"), "<|im_start|>", lambda turns: len(turns) + 1),
    "jinja": (_caps("llama", CHATML_JINJA), "<|im_start|>", lambda turns: len(turns) + 1),
}


# ---- chat rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_rendering_keeps_user_text_apart_from_the_template(fmt: str) -> None:
    caps, opener, expected_turns = FORMATS[fmt]

    @given(messages=MESSAGES)
    @QUICK
    def check(messages: list[dict[str, Any]]) -> None:
        rendered = chat.render(messages, caps)
        assert "".join(text for text, _ in rendered.parts) == rendered.prompt
        turns = chat.normalize(messages)
        if fmt == "gemma":
            # Gemma has no system turn: system text joins the first user turn, and without one it
            # is dropped, as in Gemma's own template.
            has_user = any(t.role not in ("system", "assistant") for t in turns)
            turns = [t for t in turns if t.role != "system" or has_user]
        contents = [t.content.strip() if fmt == "gemma" else t.content for t in turns]
        user_parts = [text for text, special in rendered.parts if not special]
        assert sorted(user_parts) == sorted(c for c in contents if c)  # every content, once, as plain text
        # Only the template opens turns: a user who writes the marker forges none.
        template_text = "".join(text for text, special in rendered.parts if special)
        assert template_text.count(opener) == expected_turns(turns)

    check()


# ---- the length predictor -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return LengthPredictor.load()


@given(prompt=ANY_TEXT, messages=MESSAGES)
@QUICK
def test_the_predictor_takes_any_string(
    predictor: LengthPredictor, prompt: str, messages: list[dict[str, Any]]
) -> None:
    for request in (prompt, messages):
        try:
            prediction = predictor.predict(request)
        except InvalidParameterError:  # only for a request with no text at all
            assert not prompt.strip() if request is prompt else True
            continue
        assert math.isfinite(prediction.expected_tokens) and prediction.expected_tokens >= 0
        assert np.isfinite(predictor.features(request)).all()
    # A lone surrogate reads as U+FFFD, as a UTF-8 decoder shows broken text.
    if SURROGATES.search(prompt) and prompt.strip():
        cleaned = SURROGATES.sub("\ufffd", prompt)
        np.testing.assert_array_equal(predictor.features(prompt), predictor.features(cleaned))


# ---- the wire models ------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@given(extra=st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=4), content=ANY_TEXT)
@QUICK
def test_wire_validation_names_bad_text_and_nothing_else_escapes(extra: dict[str, Any], content: str) -> None:
    # What the server decodes: JSON pairs a high and a low surrogate that stand side by side.
    wire = json.dumps({**extra, "model": "m", "messages": [{"role": "user", "content": content}]})
    has_surrogate = openai_wire.settle_json(json.loads(wire)) is not None
    try:
        openai_wire.ChatCompletionRequest.model_validate(json.loads(wire))
    except ValueError as exc:  # pydantic's ValidationError
        errors = exc.errors()  # type: ignore[attr-defined]
        assert any(e["type"] == "invalid_unicode" for e in errors) == has_surrogate
        "; ".join(e["msg"] for e in errors).encode("utf-8")  # the messages themselves are writable
    else:
        assert not has_surrogate


# ---- the real tokenizer and the engine ------------------------------------------------------------


@given(text=UNICODE_TEXT)
@settings(max_examples=300, deadline=None)
def test_user_text_tokenizes_as_plain_text_and_round_trips(engine: Engine, text: str) -> None:
    backend = engine.backend
    special = {2, 1, 105, 106}  # <bos>, <eos>, <start_of_turn>, <end_of_turn> (Gemma 3)
    tokens = backend.tokenize(text, add_bos=False, special=False)
    assert all(0 <= t < engine.capabilities.n_vocab for t in tokens)
    assert not special & set(tokens)
    assert backend.detokenize(tokens) == text.encode("utf-8")


@given(prompt=ANY_TEXT.filter(lambda s: SURROGATES.search(s) is not None and s.strip() != ""))
@settings(max_examples=20, deadline=None)
def test_the_engine_refuses_text_that_is_not_unicode(engine: Engine, prompt: str) -> None:
    for request in ({"prompt": prompt}, {"messages": [{"role": "user", "content": prompt}]}):
        with pytest.raises(UserError):
            engine.submit(**request, params=SamplingParams(max_tokens=1)).result()


# ---- the live server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[http.client.HTTPConnection]:
    settings_ = ServerSettings()
    with live_server(create_app(engine, settings_), settings=settings_) as url:
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
        yield conn
        conn.close()


ROUTES = {
    "/v1/chat/completions": lambda text: {"model": "default", "messages": [{"role": "user", "content": text}]},
    "/v1/completions": lambda text: {"model": "default", "prompt": text},
    "/api/chat": lambda text: {"model": "default", "messages": [{"role": "user", "content": text}], "stream": False},
    "/api/generate": lambda text: {"model": "default", "prompt": text, "stream": False},
}


@given(route=st.sampled_from(sorted(ROUTES)), text=ANY_TEXT)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_server_answers_any_text_without_a_5xx(
    server: http.client.HTTPConnection, engine: Engine, route: str, text: str
) -> None:
    body = ROUTES[route](text)
    if route.startswith("/v1/"):
        body["max_tokens"] = 1
    else:
        body["options"] = {"num_predict": 1}
    # One keep-alive connection for the whole run: any error that closed it would show here.
    server.request("POST", route, body=json.dumps(body), headers={"content-type": "application/json"})
    response = server.getresponse()
    answer = json.loads(response.read())
    assert response.status < 500, answer
    if SURROGATES.search(json.loads(json.dumps(text))):  # a high and a low surrogate side by side pair up
        assert response.status == 400 and "surrogate" in json.dumps(answer)
    elif text.strip() and response.status != 200:
        # Text with content is served; a 400 here can only be an empty prompt (after stripping).
        pytest.fail(f"{route} refused {text!r}: {answer}")
    wait_idle(engine)
