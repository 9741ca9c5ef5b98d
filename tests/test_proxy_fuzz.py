"""Schemathesis fuzz run of the proxy in front of a live upstream (``edgeserve serve`` on the real
model in its own process, test_proxy.py's ``upstream``): the operations are read from the
upstream's /openapi.json, which the proxy passes through, and every case is sent to the proxy. Valid
and invalid requests for every operation (100 per operation and mode, over 1,000 cases), and not one
5xx: the upstream stays alive all along, so a 502 or 504 would be the proxy's own fault. Answers
from the routes the proxy passes through (not its own /health, /metrics, /queue) must still match
the upstream's documented schema.

Generation is capped at a few tokens (test_server_fuzz.py's ``_steer``): the run is about the
protocol, and it has to fit CI's minutes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance
from server_fixtures import live_server, wait_for
from test_proxy import upstream  # noqa: F401  (the fixture: a real upstream process)
from test_server_fuzz import _steer

from edgeserve.predictor import LengthPredictor
from edgeserve.proxy.app import create_proxy_app
from edgeserve.settings import ProxySettings

EXAMPLES_PER_OPERATION = 100
#: The proxy answers these itself, in its own shapes (the upstream's schema does not describe them).
PROXY_OWN = frozenset({"/health", "/metrics", "/queue"})

#: operation × mode → status code → cases
Ran = dict[str, Counter[int]]


@pytest.fixture(scope="module")
def ran() -> Ran:
    return {}


@pytest.fixture(scope="module")
def fuzzed_proxy(upstream: str) -> Iterator[tuple[str, Any]]:  # noqa: F811
    """The proxy's URL and the upstream's schema. ``edgeserve proxy``'s defaults (SJF with the length
    predictor, one request upstream at a time), a small body limit as in test_server_fuzz.py."""
    proxy_settings = ProxySettings(upstream=upstream, max_body_bytes=64 * 1024)
    app = create_proxy_app(proxy_settings, predictor=LengthPredictor.load())
    with live_server(app, lifespan="on") as url:
        yield url, schemathesis.openapi.from_url(f"{upstream}/openapi.json")


@pytest.mark.timeout(1800)  # ~1 min per mode on two idle cores; a busy machine takes several times that
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_through_proxy(fuzzed_proxy: tuple[str, Any], ran: Ran, mode: GenerationMode) -> None:
    url, api_schema = fuzzed_proxy
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET" and not operation.path_parameters:
            continue  # nothing in a parameterless GET can be made invalid
        _fuzz(url, operation, mode, ran)


def _fuzz(url: str, operation: Any, mode: GenerationMode, ran: Ran) -> None:
    label = f"{mode.value} {operation.method.upper()} {operation.path}"
    checks = [not_a_server_error]
    if operation.path not in PROXY_OWN:
        checks.append(response_schema_conformance)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: each step would run the model again
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        _steer(case.path, case.body, mode)
        response = case.call_and_validate(base_url=url, checks=checks, timeout=60)
        ran.setdefault(label, Counter())[response.status_code] += 1
        # The next case finds the slot free (a case is answered whole before the next one is sent).
        wait_for(lambda: httpx.get(f"{url}/queue").json()["inflight"] == 0, what="the proxy's slot to free")

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, label  # a string path parameter accepts any string


def test_proxy_fuzz_run_covered_every_operation(ran: Ran, capsys: pytest.CaptureFixture[str]) -> None:
    total = sum(sum(c.values()) for c in ran.values())
    with capsys.disabled():
        print(f"\nschemathesis via proxy: {total} cases over {len(ran)} operation × mode pairs ({time.strftime('%X')})")
        for label, statuses in sorted(ran.items()):
            print(f"  {sum(statuses.values()):4d}  {label}  {dict(sorted(statuses.items()))}")
    assert total >= 1000  # issue 19: at least 1,000 cases against the proxy
    assert not any(status >= 500 for statuses in ran.values() for status in statuses)
    # The valid generation requests went through the proxy to the model, not just to validators.
    assert ran["positive POST /v1/chat/completions"][200] > 0 and ran["positive POST /api/generate"][200] > 0
