"""Proxy metrics, one registry per app, labelled by policy and predicted class so that a policy's
effect on short and long requests can be read off directly."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edgeserve.server.metrics import LATENCY_BUCKETS

LABELS = ("policy", "length_class")
#: log2(actual / predicted): 0 is a perfect prediction, ±1 a factor of two.
ERROR_BUCKETS = (-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0)


class ProxyMetrics:
    def __init__(self, policy: str, waiting: Callable[[], int], inflight: Callable[[], int]) -> None:
        self.policy = policy
        r = self.registry = CollectorRegistry()
        self.queue_wait = Histogram(
            "edgeserve_proxy_queue_wait_seconds",
            "Arrival to upstream slot.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "edgeserve_proxy_time_to_first_byte_seconds",
            "Arrival to the first byte relayed from upstream (queue wait included).",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "edgeserve_proxy_e2e_request_latency_seconds",
            "Arrival to the end of the relayed response.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("edgeserve_proxy_requests", "Requests by outcome.", (*LABELS, "outcome"), registry=r)
        self.prediction_error = Histogram(
            "edgeserve_proxy_prediction_error_log2",
            "log2(actual / predicted answer tokens), where the upstream reported usage.",
            LABELS,
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            "edgeserve_proxy_upstream_retries",
            "Requests sent upstream a second time, on a new connection, after failing before any byte.",
            registry=r,
        )
        Gauge("edgeserve_proxy_queue_depth", "Requests waiting for a slot.", registry=r).set_function(waiting)
        Gauge("edgeserve_proxy_inflight", "Requests upstream now.", registry=r).set_function(inflight)

    def outcome(self, length_class: str, outcome: str) -> None:
        self.requests.labels(self.policy, length_class, outcome).inc()

    def served(
        self,
        length_class: str,
        *,
        queue_wait_s: float,
        first_byte_s: float | None,
        e2e_s: float,
        predicted: float | None,
        actual: int | None,
    ) -> None:
        labels = (self.policy, length_class)
        self.queue_wait.labels(*labels).observe(queue_wait_s)
        if first_byte_s is not None:
            self.ttft.labels(*labels).observe(first_byte_s)
        self.e2e.labels(*labels).observe(e2e_s)
        if predicted is not None and actual is not None and predicted > 0 and actual > 0:
            self.prediction_error.labels(*labels).observe(math.log2(actual / predicted))

    def render(self) -> bytes:
        return generate_latest(self.registry)
