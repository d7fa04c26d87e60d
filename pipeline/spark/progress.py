"""Per-micro-batch progress of a streaming query: one log line and Prometheus series.

Spark reports every micro-batch to its query listeners; this listener turns that report
into a log line (rows, rows/s, batch duration, lag, model version) and into series that a
Prometheus server can scrape (:func:`pipeline.metrics.serve`). The log line's lag is the number
of records between the batch's end offsets and the latest offsets the source saw; the exported
lag is measured against Kafka at scrape time (:mod:`pipeline.spark.lag`).

>>> progress_line({"batchId": 3, "numInputRows": 500, "processedRowsPerSecond": 1000.0,
...                "durationMs": {"triggerExecution": 480},
...                "sources": [{"endOffset": '{"e": {"0": 10}}', "latestOffset": '{"e": {"0": 25}}'}]}, 2)
'batch 3: rows=500 rows/s=1000 duration_ms=480 lag=15 version=2'
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pyspark.sql.streaming import StreamingQueryListener
from pyspark.sql.streaming.listener import JStreamingQueryListener

import pipeline.metrics  # noqa: F401  (no *_created series)
from pipeline.spark.lag import QueryLag, source_offsets
from pipeline.spark.offsets import KafkaOffsetReader

log = logging.getLogger(__name__)


def lag(progress: dict) -> int:
    """Records between where the batch ended and the latest offsets, over every source and partition."""
    behind = 0
    for source in progress.get("sources", []):
        end, latest = source_offsets(source.get("endOffset")), source_offsets(source.get("latestOffset"))
        behind += sum(max(0, latest[k] - end.get(k, 0)) for k in latest)
    return behind


def progress_line(progress: dict, version: int | None) -> str:
    return (
        f"batch {progress['batchId']}: rows={progress['numInputRows']} "
        f"rows/s={progress.get('processedRowsPerSecond', 0):.0f} "
        f"duration_ms={progress.get('durationMs', {}).get('triggerExecution', 0)} "
        f"lag={lag(progress)}" + (f" version={version}" if version is not None else "")
    )


class ProgressMetrics:
    """The series of one streaming query, in their own registry (``prefix`` e.g. ``streamfit_predict``):
    a counter and a histogram that no scrape misses a micro-batch of, the query's lag
    (:class:`~pipeline.spark.lag.QueryLag`, measured with ``reader``), the last batch id and model version."""

    def __init__(self, prefix: str, reader: Callable[[], KafkaOffsetReader] | None = None):
        self.registry = registry = CollectorRegistry()
        self.rows = Counter(f"{prefix}_rows", "input rows processed", registry=registry)
        self.batch_duration = Histogram(
            f"{prefix}_batch_duration_seconds",
            "wall time of a micro-batch (Spark's triggerExecution)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.batch_id = Gauge(f"{prefix}_batch_id", "id of the last completed micro-batch", registry=registry)
        self.model_version = Gauge(
            f"{prefix}_model_version", "model version used by the last micro-batch", registry=registry
        )
        self.lag = QueryLag(prefix, reader)
        registry.register(self.lag)

    def update(self, progress: dict, version: int | None) -> None:
        self.rows.inc(progress["numInputRows"])
        self.batch_duration.observe(progress.get("durationMs", {}).get("triggerExecution", 0) / 1000)
        self.batch_id.set(progress["batchId"])
        if version is not None:
            self.model_version.set(version)
        self.lag.update(progress)


class _JsonProgress(JStreamingQueryListener):
    """Hands each progress report over as parsed JSON, in one py4j call: pyspark's own conversion makes
    about 150, each a reflective class lookup in the JVM (jstack: ~10% of the Spark JVM's busy samples
    at 1,000 events/s, two queries)."""

    def onQueryProgress(self, jevent) -> None:
        self.pylistener.report(json.loads(jevent.progress().json()))


class ProgressReporter(StreamingQueryListener):
    """Logs and exports each completed micro-batch of the query named ``query_name`` (once
    ``query_id`` is set, of that query run only: listeners outlive queries in a session);
    ``version_of(batch_id)`` names the model version that batch used."""

    def __init__(self, query_name: str, metrics: ProgressMetrics | QueryLag, version_of: Callable[[int], int | None]):
        self.query_name, self.metrics, self.version_of = query_name, metrics, version_of
        self.query_id: str | None = None
        self._wrapper = None

    @property
    def _jlistener(self):
        """What ``spark.streams.addListener`` registers (pyspark's seam): the JSON hand-over above."""
        if self._wrapper is None:
            from pyspark import SparkContext

            self._wrapper = SparkContext._jvm.PythonStreamingQueryListenerWrapper(_JsonProgress(self))
        return self._wrapper

    def report(self, progress: dict) -> None:
        mine = progress.get("id") == self.query_id if self.query_id else progress.get("name") == self.query_name
        if not mine:
            return
        version = self.version_of(progress["batchId"])
        self.metrics.update(progress, version)
        log.info(progress_line(progress, version))

    def onQueryStarted(self, event) -> None:
        pass

    def onQueryProgress(self, event) -> None:
        self.report(json.loads(event.progress.json))

    def onQueryIdle(self, event) -> None:
        pass

    def onQueryTerminated(self, event) -> None:
        pass
