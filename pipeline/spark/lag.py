"""A streaming query's consumer lag, in records and in seconds, measured when Prometheus scrapes.

The query's position is where its last completed micro-batch ended (the end offsets of its
progress report). Lag in records is what the topic holds past that position now; lag in seconds
is how long ago the oldest of those records was written (its Kafka timestamp), 0 when none waits.
Measured at scrape time, not per micro-batch, a query that stalls shows its lag growing instead of
the last figure it reported, and a pipeline nobody scrapes pays nothing.

>>> position({"sources": [{"endOffset": '{"events": {"0": 10, "1": 4}}'}]})
{('events', 0): 10, ('events', 1): 4}
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

from kafka import TopicPartition
from kafka.errors import KafkaError
from prometheus_client.core import GaugeMetricFamily

from pipeline.kafka import KafkaUnavailable
from pipeline.spark.offsets import DRAIN_RECORDS, KafkaOffsetReader, OffsetError

log = logging.getLogger(__name__)

Position = dict[tuple[str, int], int]
LAG_TIMEOUT_S = 5.0
"""How long a scrape waits for Kafka (Prometheus gives up on a scrape after 10 s by default)."""


def position(progress: dict) -> Position:
    """The end offsets of a progress report's sources, by (topic, partition)."""
    return {
        tp: o for source in progress.get("sources", []) for tp, o in source_offsets(source.get("endOffset")).items()
    }


def source_offsets(value: str | dict | None) -> Position:
    """One source's offsets in a progress report (JSON text or parsed), by (topic, partition)."""
    doc = json.loads(value) if isinstance(value, str) else value or {}
    return {(t, int(p)): int(o) for t, parts in doc.items() if isinstance(parts, dict) for p, o in parts.items()}


class QueryLag:
    """A Prometheus collector: ``<prefix>_lag_records`` and ``<prefix>_lag_seconds`` of one query.

    :meth:`update` takes each progress report; ``reader()`` opens the Kafka client the lag is
    measured with (once, again after a failure). Without a reader, or before the first micro-batch,
    or while Kafka does not answer, the series have no sample rather than a stale one."""

    def __init__(self, prefix: str, reader: Callable[[], KafkaOffsetReader] | None = None):
        self.prefix, self._open = prefix, reader
        self._reader: KafkaOffsetReader | None = None
        self._position: Position | None = None
        self._lock = threading.Lock()  # one scrape at a time uses the Kafka client

    def update(self, progress: dict, version: int | None = None) -> None:
        self._position = position(progress)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        records = GaugeMetricFamily(
            f"{self.prefix}_lag_records", "records in the topic past the end of the query's last micro-batch"
        )
        seconds = GaugeMetricFamily(
            f"{self.prefix}_lag_seconds",
            "age of the oldest record past the end of the query's last micro-batch (0: none waits)",
        )
        measured = self.measure()
        if measured is not None:
            records.add_metric([], measured[0])
            seconds.add_metric([], measured[1])
        yield records
        yield seconds

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def measure(self) -> tuple[int, float] | None:
        """Records and seconds the query is behind now; None before its first micro-batch, without a
        reader, or when Kafka does not answer."""
        at = self._position
        if at is None or self._open is None:
            return None
        with self._lock:
            try:
                if self._reader is None:
                    self._reader = self._open()
                return lag(self._reader, at)
            except (KafkaError, KafkaUnavailable, OffsetError, OSError) as exc:  # KafkaTlsError too
                log.warning("%s lag not measured: %s", self.prefix, exc)
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
                return None


def lag(reader: KafkaOffsetReader, at: Position) -> tuple[int, float]:
    """Records past ``at`` in the reader's topics now, and the age in seconds of the oldest of them."""
    latest = {(t, int(p)): o for t, parts in reader.latest().items() for p, o in parts.items()}
    waiting = {tp: at.get(tp, 0) for tp, end in latest.items() if end > at.get(tp, 0)}
    records = sum(latest[tp] - offset for tp, offset in waiting.items())
    stamps = first_timestamps(reader, waiting)
    return records, max(0.0, time.time() - min(stamps) / 1000) if stamps else 0.0


def first_timestamps(reader: KafkaOffsetReader, at: Position) -> list[int]:
    """The Kafka timestamps (ms) of the records at offsets ``at``, as many as arrive within the reader's timeout."""
    consumer, found = reader.consumer, dict[TopicPartition, int]()
    partitions = [TopicPartition(t, p) for t, p in at]
    consumer.assign(partitions)
    for tp in partitions:
        consumer.seek(tp, at[(tp.topic, tp.partition)])
    deadline = time.monotonic() + reader.timeout_s
    try:
        while len(found) < len(partitions) and time.monotonic() < deadline:
            # not pause(): kafka-python 3.0 keeps a paused partition's fetched data past assign([]) and then
            # never fetches that partition again, so the next latest() waited its whole timeout
            for tp, batch in consumer.poll(timeout_ms=100, max_records=DRAIN_RECORDS).items():
                if batch and tp not in found:
                    found[tp] = batch[0].timestamp
    finally:
        consumer.assign([])
    return list(found.values())
