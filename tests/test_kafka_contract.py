"""The producer and the Kafka plumbing against real Kafka-protocol brokers (noida-db and tansu), with
both clients of the hot write path (librdkafka and kafka-python)."""

from __future__ import annotations

import itertools
import time

import orjson
import pytest

from pipeline.kafka import ensure_topics, fast_producer
from producers.sender import Sender, synthetic_events
from producers.synthetic import synthetic_rows
from tests.kafka_reader import read_topic

CLIENTS = pytest.mark.parametrize("client", ["confluent", "kafka-python"])


def _send(bootstrap: str, topic: str, n: int, client: str, rate: float = 0.0, prefix: str = "e"):
    kafka = fast_producer(bootstrap, client=client)
    sender = Sender(kafka, topic, topic + ".dlq", rate=rate)
    sent = []
    for message in synthetic_events(itertools.islice(synthetic_rows("higgs", seed=3), n), prefix):
        sender.send(message)
        sent.append(message)
    summary = sender.close()
    kafka.close()
    return sent, summary


@CLIENTS
def test_100k_events_round_trip_exactly_once(any_kafka, topic, client):
    ensure_topics(any_kafka, {topic: 3})
    sent, summary = _send(any_kafka, topic, 100_000, client)
    assert (summary.sent, summary.acknowledged, summary.failed) == (100_000, 100_000, 0)
    records = read_topic(any_kafka, topic, expected=100_000, timeout_s=120)
    assert len(records) == 100_000
    assert {r.partition for r in records} == {0, 1, 2}
    by_id = {r.key: r.value for r in records}
    assert len(by_id) == 100_000, "an id arrived twice"
    assert by_id == {m.key: m.value for m in sent}
    first = orjson.loads(records[0].value)
    assert set(first) == {"id", "ts", "features", "label"} and len(first["features"]) == 30


@CLIENTS
def test_rate_holds_within_ten_percent(kafka, topic, client):
    ensure_topics(kafka, {topic: 3})
    started = time.monotonic()
    _, summary = _send(kafka, topic, 10_000, client, rate=2000)
    elapsed = time.monotonic() - started
    assert summary.acknowledged == 10_000
    assert abs(10_000 / elapsed - 2000) / 2000 < 0.10, f"{10_000 / elapsed:.0f} events/s"


def test_ensure_topics_is_idempotent(any_kafka, topic):
    assert ensure_topics(any_kafka, {topic: 2}) == [topic]
    assert ensure_topics(any_kafka, {topic: 2}) == []
