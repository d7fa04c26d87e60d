"""Prometheus metrics of one server, and the ASGI middleware that times every request.

Each app has its own registry (several apps can live in one process, as in the tests),
with the process collector added so ``/metrics`` also shows memory and CPU. Requests are
labelled by route template (``/v1/models/{model}:predict``), never by raw path, and by method
from a fixed set, so label cardinality stays fixed whatever clients send: an unknown path
counts under ``<unmatched>``, an unknown method (``PURGE``, ``FOO``) under ``other``.

>>> method_label("get"), method_label("PURGE")
('GET', 'other')
"""

from __future__ import annotations

import time
from functools import partial

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pipeline.metrics  # noqa: F401  (no *_created series)

UNMATCHED = "<unmatched>"
"""The route label of requests no route matched: unknown paths, and bodies refused before routing (413)."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
"""Methods labelled as themselves; any other is ``other``."""


LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
"""Request latency histograms' buckets, half a millisecond to five seconds (HTTP and per model version)."""


class Metrics:
    """Every figure ``/metrics`` shows; the serving parts update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        # every metric lives in this app's own registry
        counter = partial(Counter, registry=registry)
        gauge = partial(Gauge, registry=registry)
        histogram = partial(Histogram, registry=registry)
        labels = ["route", "method", "status"]
        self.requests = counter("streamfit_http_requests", "HTTP requests answered", labels)
        self.latency = histogram(
            "streamfit_http_request_duration_seconds",
            "time to answer a request",
            labels,
            buckets=LATENCY_BUCKETS_S,
        )
        self.batch_rows = histogram(
            "streamfit_batch_rows",
            "rows per forward pass (coalesced requests)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096),
        )
        self.batch_requests = histogram(
            "streamfit_batch_requests",
            "requests coalesced into one forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.inference = histogram(
            "streamfit_inference_duration_seconds",
            "one forward pass on the inference thread",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
        )
        self.version = gauge("streamfit_model_version", "the version being served", ["model"])
        self.swaps = counter("streamfit_model_swaps", "completed swaps to another version", ["model"])
        self.swap_failures = counter(
            "streamfit_model_swap_failures", "versions that could not be loaded; the previous one stayed", ["model"]
        )
        self.swap_duration = histogram(
            "streamfit_model_swap_duration_seconds",
            "read, load and warm a version, then replace the served reference",
            ["model"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
        )
        self.bundles = gauge(
            "streamfit_model_bundles",
            "model instances in memory: serving, draining in-flight requests, or kept spare for the next swap",
            ["model"],
        )
        self.queued_rows = gauge(
            "streamfit_batch_queue_rows", "rows waiting for a forward pass (at most max_queued_rows)"
        )
        self.overloaded = counter(
            "streamfit_requests_overloaded",
            "predict requests refused with 503 because max_queued_rows rows were already waiting",
            ["model"],
        )
        self.version_loads = counter(
            "streamfit_model_version_loads",
            "versions loaded to answer beside the served one (/versions/V, /labels/L, canary, shadow)",
            ["model"],
        )
        answered = ["model", "version"]
        self.version_requests = counter(
            "streamfit_model_requests", "prediction requests by the version that answered", answered
        )
        self.version_errors = counter(
            "streamfit_model_request_errors",
            "prediction requests that leased a version but got no answer from it (4xx, 503, failure)",
            answered,
        )
        self.version_latency = histogram(
            "streamfit_model_request_duration_seconds",
            "time from a prediction request's arrival to its answer, by the version that answered",
            answered,
            buckets=LATENCY_BUCKETS_S,
        )
        self.shadow_rows = counter(
            "streamfit_shadow_rows", "rows the champion answered that the candidate also scored", answered
        )
        self.shadow_agreeing_rows = counter(
            "streamfit_shadow_agreeing_rows",
            "shadowed rows where candidate and champion chose the same class",
            answered,
        )
        self.shadow_agreement = gauge(
            "streamfit_shadow_agreement_ratio", "share of shadowed rows where the candidate agrees", answered
        )
        self.shadow_difference = gauge(
            "streamfit_shadow_distribution_difference_ratio",
            "total variation distance between the champion's and the candidate's mean class probabilities "
            "over the shadowed rows (0: the same distribution, 1: disjoint)",
            answered,
        )
        self.shadow_dropped = counter(
            "streamfit_shadow_dropped_rows",
            "rows not shadowed because shadow_queued_rows rows already waited for the candidate",
            ["model"],
        )
        self.updates_connected = gauge(
            "streamfit_model_updates_connected",
            "1 while following model-updates on Kafka, 0 while only polling the registry",
        )

    def forget(self, model: str, version: int) -> None:
        """Drop the series of a version no longer loaded, so they do not pile up over thousands of swaps."""
        for metric in (
            self.version_requests,
            self.version_errors,
            self.version_latency,
            self.shadow_rows,
            self.shadow_agreeing_rows,
            self.shadow_agreement,
            self.shadow_difference,
        ):
            try:
                metric.remove(model, str(version))
            except KeyError:  # never observed
                pass

    def observe_batch(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts and times each HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            labels = (getattr(route, "path", UNMATCHED), method_label(scope["method"]), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)


def method_label(method: str) -> str:
    method = method.upper()
    return method if method in METHODS else "other"
