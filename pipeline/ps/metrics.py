"""A parameter-server shard's Prometheus metrics (``streamfit_ps_*``).

What the server already counts for ``stats()`` (commits by outcome, bytes, open connections, the
update counter) is read when Prometheus scrapes, so nothing is counted twice; what only a
dashboard needs (pulls, refusals, staleness, how long checkpoints and publications take) is
counted here as it happens. Rates are PromQL's job: ``rate(streamfit_ps_commits_total[1m])``.

>>> metrics = ServerMetrics(lambda: {"counter": 2, "commits": {"applied": 2, "pending": 0, "skipped": 1},
...                                  "bytes_in": 10, "bytes_out": 20, "connections": 1})
>>> metrics.refused.labels("auth").inc()
>>> [metrics.registry.get_sample_value(name, labels) for name, labels in
...  [("streamfit_ps_commits_total", {}), ("streamfit_ps_replayed_commits_total", {}),
...   ("streamfit_ps_refused_frames_total", {"reason": "auth"})]]
[2.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

import pipeline.metrics  # noqa: F401  (no *_created series)

REFUSALS = (
    "protocol",
    "too_large",
    "version",
    "auth",
    "frame_timeout",
    "truncated",
    "rejected",
    "busy",
    "internal",
    "encoding",
)
"""Why a frame gets an error reply and usually a closed connection: the protocol errors' codes,
``truncated`` (the peer closed mid-frame), ``rejected`` (a commit's content or metadata), ``busy``
(``ps_max_connections`` reached), ``internal`` (a bug) and ``encoding`` (a HELLO asking for an
encoding the server does not speak)."""

PERIODIC = ("checkpoint", "publish")
"""The shard's periodic actions whose duration and failures are measured."""

T = TypeVar("T")


class ServerMetrics:
    """The registry ``streamfit ps`` serves on ``ps_metrics_port``; ``figures()`` returns the
    server's ``stats()`` (read at scrape time)."""

    def __init__(self, figures: Callable[[], dict[str, Any]]):
        self.registry = registry = CollectorRegistry()
        registry.register(_ServerFigures(figures))
        counter = partial(Counter, registry=registry)
        self.pulls = counter("streamfit_ps_pulls", "pulls answered (weights sent)")
        self.refused = counter(
            "streamfit_ps_refused_frames", "frames (or connections, busy) refused with an error reply", ["reason"]
        )
        for reason in REFUSALS:
            self.refused.labels(reason)
        self.staleness = Histogram(
            "streamfit_ps_commit_staleness",
            "updates applied between a worker's pull and its accepted commit",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.durations = {
            name: Histogram(
                f"streamfit_ps_{name}_duration_seconds",
                f"time one {name} took (failed ones included)",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=registry,
            )
            for name in PERIODIC
        }
        self.failures = {name: counter(f"streamfit_ps_{name}_failures", f"{name}s that failed") for name in PERIODIC}

    def timed(self, name: str, action: Callable[[], T]) -> Callable[[], T]:
        """``action`` measured as periodic action ``name``: its duration and, if it raises, a failure."""
        duration, failures = self.durations[name], self.failures[name]

        def run() -> T:
            with duration.time(), failures.count_exceptions():
                return action()

        return run


class _ServerFigures:
    """The figures ``stats()`` already keeps, as counters and gauges at scrape time."""

    def __init__(self, figures: Callable[[], dict[str, Any]]):
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        stats = self.figures()
        commits = stats["commits"]
        for name, doc, value in (
            (
                "streamfit_ps_updates",
                "updates applied to the center variable (the counter's moves)",
                commits["applied"],
            ),
            (
                "streamfit_ps_commits",
                "commits accepted (applied, or pending a synchronous round)",
                commits["applied"] + commits["pending"],
            ),
            (
                "streamfit_ps_replayed_commits",
                "commits skipped: their tag was already applied (a replayed micro-batch)",
                commits["skipped"],
            ),
            ("streamfit_ps_received_bytes", "bytes of frames received", stats["bytes_in"]),
            ("streamfit_ps_sent_bytes", "bytes of frames sent", stats["bytes_out"]),
        ):
            yield CounterMetricFamily(name, doc, value=float(value))
        yield GaugeMetricFamily("streamfit_ps_connections", "connections open", value=float(stats["connections"]))
        yield GaugeMetricFamily(
            "streamfit_ps_update_counter",
            "the center variable's update counter (kept across restarts)",
            value=float(stats["counter"]),
        )
