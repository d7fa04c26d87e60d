"""A streaming query's lag as Prometheus serves it, measured against a real broker at scrape time:
records past the query's position, and the age of the oldest of them from its Kafka timestamp."""

from __future__ import annotations

import json
import threading
import time

from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from pipeline.kafka import ensure_topics
from pipeline.metrics import serve
from pipeline.spark.lag import QueryLag, lag
from pipeline.spark.offsets import KafkaOffsetReader
from tests.helpers import scrape


def progress(topic: str, ends: dict[int, int]) -> dict:
    """A progress report as Spark hands it to a listener (end offsets as JSON text)."""
    return {"batchId": 1, "sources": [{"endOffset": json.dumps({topic: {str(p): o for p, o in ends.items()}})}]}


def lag_samples(port: int) -> dict[str, float]:
    return {name: value for name, value in scrape(port).items() if "_lag_" in name}


def test_lag_in_records_and_seconds_past_the_querys_position(kafka, topic):
    ensure_topics(kafka, {topic: 2})
    now_ms = int(time.time() * 1000)
    producer = KafkaProducer(bootstrap_servers=kafka)
    for i in range(10):  # partition 0: written 30 s ago (record timestamps), one ms apart
        producer.send(topic, b"old", partition=0, timestamp_ms=now_ms - 30_000 + i)
    for _ in range(3):
        producer.send(topic, b"new", partition=1, timestamp_ms=now_ms)
    producer.flush()
    producer.close()

    lag = QueryLag("streamfit_q", lambda: KafkaOffsetReader(kafka, [topic], 5.0))
    registry = CollectorRegistry()
    registry.register(lag)
    exporter = serve(registry, 0, host="127.0.0.1")
    try:
        assert lag_samples(exporter.server_port) == {}  # no micro-batch yet: no figure rather than a made-up one
        lag.update(progress(topic, {0: 4, 1: 0}))
        behind = lag_samples(exporter.server_port)
        lag.update(progress(topic, {0: 10}))  # partition 1 not in the position yet: read from its start
        new_only = lag_samples(exporter.server_port)
        lag.update(progress(topic, {0: 10, 1: 3}))
        caught_up = lag_samples(exporter.server_port)
    finally:
        exporter.shutdown()
        lag.close()
    assert behind["streamfit_q_lag_records"] == 6 + 3
    assert 30 <= behind["streamfit_q_lag_seconds"] < 30 + 60  # partition 0's record at offset 4 is the oldest
    assert new_only["streamfit_q_lag_records"] == 3 and new_only["streamfit_q_lag_seconds"] < 30
    assert caught_up == {"streamfit_q_lag_records": 0, "streamfit_q_lag_seconds": 0}


def test_an_unreachable_broker_leaves_the_lag_without_a_sample_and_the_scrape_answering(topic):
    lag = QueryLag("streamfit_q", lambda: KafkaOffsetReader("127.0.0.1:1", [topic], 1.0))
    lag.update(progress(topic, {0: 4}))
    registry = CollectorRegistry()
    registry.register(lag)
    exporter = serve(registry, 0, host="127.0.0.1")
    try:
        assert lag_samples(exporter.server_port) == {}
    finally:
        exporter.shutdown()


def test_lag_of_a_query_keeping_up_with_a_busy_topic_is_its_own_not_the_measurements(kafka, topic):
    """Records arriving while the lag is measured fill the reader's fetch buffer; the end offsets
    must not wait behind them (they did: 5 s, the reader's timeout, added to every figure at 1,000 events/s)."""
    ensure_topics(kafka, {topic: 3})
    producer = KafkaProducer(bootstrap_servers=kafka, linger_ms=5)
    reader = KafkaOffsetReader(kafka, [topic], 5.0)
    stop, sent = threading.Event(), [0]

    def produce() -> None:  # about 2,000 records/s, bounded by the test's own measurements below
        while not stop.is_set() and sent[0] < 200_000:
            for _ in range(20):
                producer.send(topic, b"x" * 64)
            sent[0] += 20
            time.sleep(0.01)

    sender = threading.Thread(target=produce, daemon=True)
    sender.start()
    try:
        time.sleep(1.0)
        measured = []
        for _ in range(5):
            at = {(t, int(p)): o for t, parts in reader.latest().items() for p, o in parts.items()}
            started = time.monotonic()
            records, seconds = lag(reader, at)
            measured.append((time.monotonic() - started, seconds))
    finally:
        stop.set()
        sender.join(10)
        producer.close()
        reader.close()
    assert sent[0] > 1000
    assert max(took for took, _ in measured) < 2.0, measured
    assert max(seconds for _, seconds in measured) < 2.0, measured
