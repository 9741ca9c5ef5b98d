"""Prometheus metrics, one registry per app (never the global one: two apps in one process, as in
tests, must not share or collide).

Latency histograms are fed from the engine's own timings (``GenerationResult``), so they measure
the request from admission, not the HTTP layer's view of it. Every request is counted once in
``edgeserve_requests_total`` by outcome: the finish reason, ``error``, or ``cancelled`` (the client
left before the end) for requests the engine took; for refused ones (``refused``, fed by
``boundary.ErrorBoundary``) a name per status: ``invalid`` (400), ``not_found`` (404), ``queue_full``
(429), ``error`` (5xx) and the others in ``REFUSALS``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from edgeserve.engine import Engine
from edgeserve.handoff.session import HandoffReport
from edgeserve.types import GenerationResult

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PER_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
#: Outcome of a request refused with this status before the engine took it.
REFUSALS = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    429: "queue_full",
}


class ServerMetrics:
    def __init__(self, engine: Engine, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        labels = ("model", "endpoint")
        r = self.registry
        self.ttft = Histogram(
            "edgeserve_time_to_first_token_seconds",
            "Admission to first token (queue wait and prefill included).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "edgeserve_time_per_output_token_seconds",
            "Mean seconds per generated token after the first.",
            labels,
            buckets=PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "edgeserve_queue_wait_seconds", "Admission to start of work.", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "edgeserve_e2e_request_latency_seconds",
            "Admission to the last token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("edgeserve_prompt_tokens", "Prompt tokens of ended requests.", labels, registry=r)
        self.generation_tokens = Counter("edgeserve_generation_tokens", "Tokens generated.", labels, registry=r)
        self.requests = Counter("edgeserve_requests", "Requests by outcome.", (*labels, "outcome"), registry=r)
        # srpt: what preemption cost, summed over ended requests (GenerationResult's fields).
        self.preemptions = Counter("edgeserve_preemptions", "Times a request was displaced (srpt).", labels, registry=r)
        self.parked_bytes = Counter("edgeserve_parked_bytes", "KV bytes parked to host memory.", labels, registry=r)
        self.park_s = Counter("edgeserve_park_seconds", "Seconds spent parking KV state.", labels, registry=r)
        self.resume_s = Counter("edgeserve_resume_seconds", "Seconds restoring parked KV state.", labels, registry=r)
        depth = Gauge("edgeserve_queue_depth", "Requests waiting for the engine.", ("model",), registry=r)
        depth.labels(model).set_function(lambda: engine.queue_depth)
        running = Gauge("edgeserve_requests_running", "Requests in the running batch now.", ("model",), registry=r)
        running.labels(model).set_function(lambda: engine.running)
        width = Gauge(
            "edgeserve_batch_width",
            "The widest batch the step times allow now (--parallel); under sjf/srpt the present work may narrow it.",
            ("model",),
            registry=r,
        )
        width.labels(model).set_function(lambda: engine.parallel)
        r.register(_StepSeconds(engine, model))
        kv = Gauge("edgeserve_kv_budget_bytes", "KV cache memory reserved for open sequences.", ("model",), registry=r)
        kv.labels(model).set(engine.capabilities.kv_bytes)
        # Created on the first handoff report: a server without a cloud exports none of them.
        self._handoff: tuple[Counter, Histogram, Counter, Counter, Counter] | None = None

    def handoff(self, report: HandoffReport) -> None:
        """A request the cloud-device handoff planned (``edgeserve.handoff``): its route, and its
        predicted against its actual time to first token."""
        m, route = self.model, report.route
        if self._handoff is None:
            r = self.registry
            self._handoff = (
                Counter("edgeserve_handoff_requests", "Requests by planned route.", ("model", "route"), registry=r),
                Histogram(
                    "edgeserve_handoff_ttft_seconds",
                    "Time to first token, as the planner predicted it and as it was.",
                    ("model", "route", "kind"),
                    buckets=LATENCY_BUCKETS,
                    registry=r,
                ),
                Counter("edgeserve_handoff_cloud_tokens", "Tokens the cloud sent.", ("model",), registry=r),
                Counter(
                    "edgeserve_handoff_kv_bytes", "KV state bytes received from the cloud.", ("model",), registry=r
                ),
                Counter("edgeserve_handoff_cloud_errors", "Requests whose cloud part failed.", ("model",), registry=r),
            )
        requests, ttft, cloud_tokens, kv_bytes, errors = self._handoff
        requests.labels(m, route).inc()
        ttft.labels(m, route, "predicted").observe(report.predicted_ttft_s)
        if report.ttft_s is not None:
            ttft.labels(m, route, "actual").observe(report.ttft_s)
        cloud_tokens.labels(m).inc(report.cloud_tokens)
        kv_bytes.labels(m).inc(report.kv_wire_bytes)
        if report.cloud_error is not None:
            errors.labels(m).inc()

    def finished(self, endpoint: str, result: GenerationResult) -> None:
        """A request that reached its end (its finish reason is the outcome)."""
        m, e = self.model, endpoint
        self.requests.labels(m, e, result.finish_reason.value).inc()
        self.prompt_tokens.labels(m, e).inc(result.prompt_tokens)
        self.generation_tokens.labels(m, e).inc(result.completion_tokens)
        self.queue_wait.labels(m, e).observe(result.queue_wait_s)
        self.e2e.labels(m, e).observe(result.total_s)
        self.preemptions.labels(m, e).inc(result.preemptions)
        self.parked_bytes.labels(m, e).inc(result.parked_bytes)
        self.park_s.labels(m, e).inc(result.park_s)
        self.resume_s.labels(m, e).inc(result.resume_s)
        if result.ttft_s is not None:
            self.ttft.labels(m, e).observe(result.ttft_s)
        if result.decode_tok_s:
            self.tpot.labels(m, e).observe(1.0 / result.decode_tok_s)

    def ended_early(self, endpoint: str, outcome: str, generated_tokens: int = 0) -> None:
        """A request with no result: refused, failed, or abandoned by its client."""
        self.requests.labels(self.model, endpoint, outcome).inc()
        if generated_tokens:
            self.generation_tokens.labels(self.model, endpoint).inc(generated_tokens)

    def refused(self, endpoint: str, status: int) -> None:
        """A request answered ``status`` (>= 400) without the engine running it."""
        outcome = REFUSALS.get(status) or ("error" if status >= 500 else "rejected")
        self.requests.labels(self.model, endpoint, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StepSeconds:
    """``edgeserve_decode_step_seconds{width}``: the measured decode step time per batch width, the
    figures the automatic ``--parallel`` is chosen from (one sample per width seen so far)."""

    def __init__(self, engine: Engine, model: str) -> None:
        self._engine, self._model = engine, model

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "edgeserve_decode_step_seconds",
            "Seconds per batched decode step by width (running average; automatic --parallel follows it).",
            labels=["model", "width"],
        )
        for width, seconds in self._engine.step_seconds().items():
            family.add_metric([self._model, str(width)], seconds)
        yield family
