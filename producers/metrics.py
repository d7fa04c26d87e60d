"""The producer's accounting as Prometheus counters (``streamfit_produce_*``), read when Prometheus scrapes.

:class:`~producers.sender.Sender` already counts every message for its summary, so the counters
are that :class:`~producers.sender.Summary` read at scrape time: nothing is added to the send path
(tens of thousands of events a second). Events per second is PromQL's job:
``rate(streamfit_produce_acknowledged_total[1m])``.

>>> from producers.sender import Summary
>>> registry = producer_registry(Summary(sent=5, acknowledged=4, dead_lettered=1))
>>> registry.get_sample_value("streamfit_produce_acknowledged_total")
4.0
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

import pipeline.metrics  # noqa: F401  (no *_created series)
from producers.sender import Summary

COUNTERS = {
    "sent": "messages handed to the Kafka client (events and dead letters)",
    "acknowledged": "messages the broker acknowledged",
    "failed": "messages given up on (their send failed after every resend)",
    "resent": "sends tried again after the client gave up on them (a broker restart)",
    "dead_lettered": "file rows that failed validation, sent to the dead-letter topic",
}


def producer_registry(summary: Summary) -> CollectorRegistry:
    """A registry whose counters read ``summary`` (the running :class:`~producers.sender.Sender`'s)."""
    registry = CollectorRegistry()
    registry.register(_SummaryCounters(summary))
    return registry


class _SummaryCounters:
    def __init__(self, summary: Summary):
        self.summary = summary

    def collect(self) -> Iterator[CounterMetricFamily]:
        for field, doc in COUNTERS.items():
            yield CounterMetricFamily(f"streamfit_produce_{field}", doc, value=float(getattr(self.summary, field)))
