"""Schemathesis fuzz run of the live server over the real model, from its own /openapi.json: valid and
invalid requests for every operation (1,100 cases: 100 per operation and mode), and not one 5xx (and
every answer matches the documented schema). The server runs with ``serve``'s uvicorn options.
Generation lengths are capped so the run fits a few CPU minutes; everything else about a generated
request is left as schemathesis made it.

The operations are driven with ``APIOperation.as_strategy`` and Hypothesis directly rather than
``schemathesis.pytest.from_fixture``, whose lazy loader reads a pytest-internal attribute that pytest 9
removed (``Function._nodeid``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance
from server_fixtures import live_server, wait_idle

from edgeserve.engine import Engine
from edgeserve.server.app import create_app
from edgeserve.settings import ServerSettings

EXAMPLES_PER_OPERATION = 100
MODEL = "default"
MAX_NEW_TOKENS = 4
#: operation × mode → status code → cases
RAN: dict[str, Counter[int]] = {}
UNSATISFIABLE: list[str] = []


@pytest.fixture(scope="module")
def api_schema(engine: Engine) -> Iterator[Any]:
    settings = ServerSettings(max_body_bytes=64 * 1024)
    with live_server(create_app(engine, settings), settings=settings) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def _steer(path: str, body: Any, mode: GenerationMode) -> None:
    """Name the served model in valid requests (a random name only ever meets the 404), and keep
    valid length limits small: the run is about the protocol, not long texts. Invalid values
    (negative, wrong type) are left alone, for the server to refuse."""
    if not isinstance(body, dict):
        return
    if mode is GenerationMode.POSITIVE and "model" in body:
        body["model"] = MODEL
    if path.startswith("/v1/"):
        for key in ("max_tokens", "max_completion_tokens"):
            if _number(body.get(key)) > MAX_NEW_TOKENS:  # JSON integers may come as 3916.0
                body[key] = MAX_NEW_TOKENS
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_NEW_TOKENS
    elif path in ("/api/generate", "/api/chat"):
        if body.get("options") is None:
            body["options"] = {}
        options = body["options"]
        if isinstance(options, dict):
            predict = options.get("num_predict")
            if predict is None or _number(predict) > MAX_NEW_TOKENS or _number(predict) in (-1, -2):
                options["num_predict"] = MAX_NEW_TOKENS


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


@pytest.mark.timeout(1800)  # ~2 min per mode on two idle cores; a busy machine takes several times that
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema: Any, engine: Engine, mode: GenerationMode) -> None:
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET" and not operation.path_parameters:
            continue  # nothing in a parameterless GET can be made invalid
        _fuzz(operation, mode, engine)


def _fuzz(operation: Any, mode: GenerationMode, engine: Engine) -> None:
    label = f"{mode.value} {operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # Hypothesis's choices fixed (schemathesis adds a little randomness of its own)
        phases=(Phase.explicit, Phase.generate),  # no shrinking: each step would run the model again
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        _steer(case.path, case.body, mode)
        response = case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=60)
        RAN.setdefault(label, Counter())[response.status_code] += 1
        wait_idle(engine)

    try:
        run()
    except Unsatisfiable:
        # Some operations have no invalid form (a string path parameter accepts any string).
        assert mode is GenerationMode.NEGATIVE, label
        UNSATISFIABLE.append(label)


def test_fuzz_run_covered_every_operation(capsys: pytest.CaptureFixture[str]) -> None:
    total = sum(sum(c.values()) for c in RAN.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(RAN)} operation × mode pairs ({time.strftime('%X')})")
        for label, statuses in sorted(RAN.items()):
            print(f"  {sum(statuses.values()):4d}  {label}  {dict(sorted(statuses.items()))}")
        for label in UNSATISFIABLE:
            print(f"     -  {label} (no invalid request exists)")
    assert len(RAN) >= 15 and total >= 1000  # issue 19: at least 1,000 cases against serve
    # The valid generation requests reached the model, not just the validators.
    assert RAN["positive POST /v1/chat/completions"][200] > 0 and RAN["positive POST /api/generate"][200] > 0
