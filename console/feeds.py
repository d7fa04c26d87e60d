"""The latest records of a few topics, tailed in a background thread, for the console's pages.

Each topic keeps its newest ``keep`` records (read from that far back at start, then as they
arrive), with the Kafka timestamp of each: a ``model-updates`` record's own ``created_at`` is
when the version was made, not when its alias moved. While Kafka cannot be reached, :attr:`problem`
says so and the thread retries; the records already read stay.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
from kafka import TopicPartition
from kafka.errors import KafkaError

from pipeline.errors import StreamfitError
from pipeline.kafka import consumer

log = logging.getLogger(__name__)

RETRY_S = 2.0
IDLE_S = 0.5
"""A read that found nothing waits this long: asked for records it does not have, a broker may answer at once
(noida-db does, ignoring the fetch's max wait), and a poll waiting on the broker would then spin a core."""
"""Seconds between attempts to reach Kafka again."""


@dataclass(frozen=True)
class Record:
    """One record: its JSON value (None when the value is not JSON), where it is and when Kafka stored it (ms)."""

    topic: str
    partition: int
    offset: int
    at: int
    value: dict | None


class TopicFeed:
    """Tails ``keep`` (topic: records to keep) from the cluster ``bootstrap()`` names (called again after
    a failure, so an embedded broker that restarts on another port is found)."""

    def __init__(
        self,
        bootstrap: Callable[[], str],
        keep: Mapping[str, int],
        timeout_s: float = 5.0,
        properties: Mapping[str, str] | None = None,
    ):
        self.bootstrap, self.keep, self.timeout_s, self.properties = bootstrap, dict(keep), timeout_s, properties
        self.records: dict[str, deque[Record]] = {topic: deque(maxlen=n) for topic, n in self.keep.items()}
        self.problem: str | None = "Kafka: not reached yet"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="console-feed", daemon=True)

    def start(self) -> TopicFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 5)

    def latest(self, topic: str) -> list[Record]:
        """The kept records of ``topic``, oldest first."""
        with self._lock:
            return list(self.records[topic])

    def _run(self) -> None:
        while not self._stop.is_set():
            reader = None
            try:
                reader = self._open()
                self.problem = None
                while not self._stop.is_set():
                    if not self._read(reader):
                        self._stop.wait(IDLE_S)
            except (KafkaError, StreamfitError, OSError) as exc:  # KafkaUnavailable, KafkaTlsError too
                problem = f"Kafka: {exc}"
                if problem != self.problem:  # once per outage, not every retry
                    log.warning("console: %s", problem)
                self.problem = problem
            finally:
                if reader is not None:
                    reader.close()
            self._stop.wait(RETRY_S)

    def _open(self):
        reader = consumer(self.bootstrap(), self.timeout_s, self.properties, client_id="streamfit-console")
        partitions = [
            TopicPartition(topic, p) for topic in self.keep for p in sorted(reader.partitions_for_topic(topic) or ())
        ]
        reader.assign(partitions)
        begins, ends = reader.beginning_offsets(partitions), reader.end_offsets(partitions)
        with self._lock:
            for records in self.records.values():
                records.clear()  # read again from the start of the window: nothing twice
        for tp in partitions:
            reader.seek(tp, max(begins[tp], ends[tp] - self.keep[tp.topic]))
        return reader

    def _read(self, reader) -> bool:
        """Keep what the reader has now; False when it had nothing."""
        batches = reader.poll(timeout_ms=0, max_records=5000)
        for batch in batches.values():
            kept = [_record(r) for r in batch]
            with self._lock:
                for record in kept:
                    self.records[record.topic].append(record)
        return bool(batches)


def _record(raw) -> Record:
    try:
        value = orjson.loads(raw.value) if raw.value is not None else None
    except orjson.JSONDecodeError:
        value = None
    return Record(raw.topic, raw.partition, raw.offset, raw.timestamp, value if isinstance(value, dict) else None)
