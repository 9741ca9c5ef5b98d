"""The policy simulator: exact small cases by hand, and the Azure trace loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edgeserve.sim import (
    ServiceProfile,
    SimRequest,
    poisson_arrivals,
    rate_for_utilisation,
    replay_arrivals,
    simulate,
    trace_gaps,
)

PROFILE = ServiceProfile(prefill_tok_s=100.0, decode_tok_s=10.0)  # 10 prompt tokens = 0.1 s, 10 out = 1 s
TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure-llm-inference-2023"


def burst() -> list[SimRequest]:
    return [
        SimRequest("long", 0.0, 10, 100, predicted_tokens=900),
        SimRequest("short", 0.0, 10, 10, predicted_tokens=20),
    ]


def by_id(outcomes: list) -> dict:  # type: ignore[type-arg]
    return {o.request.request_id: o for o in outcomes}


def test_fcfs_by_hand() -> None:
    out = by_id(simulate(burst(), PROFILE, "fcfs"))
    assert out["long"].start == 0.0 and math.isclose(out["long"].end, 10.1)
    assert math.isclose(out["short"].start, 10.1) and math.isclose(out["short"].latency_s, 11.2)
    assert math.isclose(out["short"].ttft_s, 10.1 + 0.1 + 0.1)


def test_sjf_by_hand() -> None:
    out = by_id(simulate(burst(), PROFILE, "sjf"))
    assert out["short"].start == 0.0 and math.isclose(out["short"].latency_s, 1.1)
    assert math.isclose(out["long"].latency_s, 11.2)


def test_idle_gaps_and_aging() -> None:
    reqs = [
        SimRequest("a", 0.0, 10, 10, 10),
        SimRequest("b", 5.0, 10, 10, 10),  # arrives after a finished: server idles
    ]
    out = by_id(simulate(reqs, PROFILE, "sjf"))
    assert out["b"].start == 5.0 and out["b"].queue_wait_s == 0.0
    # Aging: a long job is overtaken by shorts only until it has waited tau.
    reqs = [SimRequest("long", 0.0, 0, 10, 1000)] + [SimRequest(f"s{i}", 0.0, 0, 10, 1) for i in range(10)]
    order = [o.request.request_id for o in simulate(reqs, PROFILE, "sjf", aging_s=2.5)]
    assert order.index("long") == 3  # starts at t=3 s, the first pick after waiting 2.5 s


def test_arrival_processes_hit_the_requested_rate() -> None:
    arrivals = poisson_arrivals(20_000, rate_per_s=4.0, seed=1)
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] / len(arrivals) == pytest.approx(0.25, rel=0.05)
    gaps = [0.1, 0.0, 1.9, 0.0]
    replay = replay_arrivals(gaps, 8, rate_per_s=2.0)
    assert replay[-1] / 8 == pytest.approx(0.5)
    assert rate_for_utilisation(0.5, 2.0) == 0.25


@pytest.mark.skipif(not TRACE.exists(), reason="shared/data is not beside this checkout")
def test_azure_trace_gaps_are_read() -> None:
    gaps = trace_gaps(TRACE / "AzureLLMInferenceTrace_conv.csv")
    assert len(gaps) > 19_000
    assert all(g >= 0 for g in gaps)
    assert 0.1 < sum(gaps) / len(gaps) < 0.3  # ~5.5 requests per second
