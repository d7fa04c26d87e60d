"""``pipeline.kafka.fast_producer``, the hot write path, with both clients against a real broker: a send
counts as acknowledged only once the broker has it, a bad record fails alone with a clear error, keys
land where Kafka's partitioner puts them, and the Sender carries on through a killed broker."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import pytest
from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from kafka.partitioner.default import murmur2

from pipeline.broker import EmbeddedBroker
from pipeline.kafka import ConfluentProducer, KafkaUnavailable, ensure_topics, fast_producer
from producers.sender import Sender, synthetic_events
from producers.synthetic import synthetic_rows
from tests.kafka_reader import read_topic

pytestmark = pytest.mark.slow

CLIENTS = ["confluent", "kafka-python"]


@pytest.fixture(params=CLIENTS)
def client(request) -> str:
    return request.param


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Where Kafka's default partitioner (Java's, kafka-python's) puts a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_auto_is_librdkafka_and_an_unknown_client_is_refused(kafka):
    kafka_producer = fast_producer(kafka)
    try:
        assert isinstance(kafka_producer, ConfluentProducer)
    finally:
        kafka_producer.close()
    with pytest.raises(ValueError, match="unknown Kafka client 'rdkafka'"):
        fast_producer(kafka, client="rdkafka")


def test_sends_are_acknowledged_in_order_and_keyed_like_kafka_python(kafka, topic, client):
    ensure_topics(kafka, {topic: 3})
    kafka_producer = fast_producer(kafka, client=client)
    try:
        futures = [kafka_producer.send(topic, key=b"k%d" % i, value=b"v%d" % i) for i in range(3000)]
        futures += [kafka_producer.send(topic, value=b"p%d" % i, partition=i % 3) for i in range(30)]
        kafka_producer.flush(timeout=30)
        assert all(f.is_done for f in futures), "flush returned before every acknowledgement"
        for future in futures:
            future.get(timeout=0)
    finally:
        kafka_producer.close()
    records = read_topic(kafka, topic, expected=3030)
    assert len(records) == 3030
    keyed = [r for r in records if r.key is not None]
    assert all(r.partition == murmur2_partition(r.key, 3) for r in keyed)
    for partition in range(3):  # each partition keeps the send order
        values = [int(r.value[1:]) for r in keyed if r.partition == partition]
        assert values == sorted(values)
    assert sorted((r.partition, r.value) for r in records if r.key is None) == sorted(
        (i % 3, b"p%d" % i) for i in range(30)
    )


def test_a_bad_record_fails_alone_with_a_clear_error(kafka, topic, client):
    ensure_topics(kafka, {topic: 1})
    kafka_producer = fast_producer(kafka, client=client)
    try:
        first = kafka_producer.send(topic, value=b"a")
        with pytest.raises((KafkaError, ValueError), match=rf"(?i){topic}.*partition|partition.*{topic}"):
            kafka_producer.send(topic, value=b"x", partition=7).get(timeout=20)  # raised by send or by get
        with pytest.raises(MessageSizeTooLargeError):
            kafka_producer.send(topic, value=b"x" * (5 * 1024 * 1024)).get(timeout=20)
        last = kafka_producer.send(topic, value=b"b")
        kafka_producer.flush(timeout=30)
        first.get(timeout=0), last.get(timeout=0)
    finally:
        kafka_producer.close()
    assert [r.value for r in read_topic(kafka, topic, expected=2)] == [b"a", b"b"]


def test_an_unreachable_cluster_fails_fast_naming_it(client):
    started = time.monotonic()
    with pytest.raises(KafkaUnavailable, match="127.0.0.1:1"):
        fast_producer("127.0.0.1:1", timeout_s=2, client=client)
    assert time.monotonic() - started < 15


@pytest.fixture
def own_broker(tmp_path):
    """A noida-db broker of the test's own (it is stopped and killed); keeps its port and data across restarts."""
    broker = EmbeddedBroker("noida", data_dir=tmp_path)
    broker.start()
    yield broker
    broker.stop()


def _kill(broker: EmbeddedBroker) -> None:
    os.killpg(broker.process.pid, signal.SIGKILL)
    broker.process.wait()
    broker.process = None


def test_nothing_counts_as_acknowledged_while_the_broker_is_down(own_broker, topic, client):
    ensure_topics(own_broker.bootstrap, {topic: 1})
    kafka_producer = fast_producer(own_broker.bootstrap, timeout_s=30, client=client)
    try:
        kafka_producer.send(topic, value=b"before").get(timeout=20)
        own_broker.stop()
        waiting = kafka_producer.send(topic, value=b"during")
        with pytest.raises(KafkaTimeoutError):
            kafka_producer.flush(timeout=2)
        with pytest.raises(KafkaTimeoutError):
            waiting.get(timeout=1)
        assert not waiting.is_done
        own_broker.start()  # same port, same data
        waiting.get(timeout=30)
    finally:
        kafka_producer.close()
    assert [r.value for r in read_topic(own_broker.bootstrap, topic, expected=2)] == [b"before", b"during"]


def test_the_sender_carries_on_through_a_sigkilled_broker(own_broker, topic, client):
    """A broker killed mid-stream and restarted: the sends in flight are resent (the restarted broker
    answers OutOfOrderSequenceNumber, which librdkafka's idempotent producer makes fatal: a new one
    takes over) and none fails. Only records sent after the restart are checked in the topic: noida-db
    loses the writes it acknowledged in the last ~0.6 s before a SIGKILL, with either client."""
    ensure_topics(own_broker.bootstrap, {topic: 3})
    kafka_producer = fast_producer(own_broker.bootstrap, timeout_s=10, client=client)
    sender = Sender(kafka_producer, topic, topic + ".dlq", rate=3000)
    messages = list(synthetic_events(itertools.islice(synthetic_rows("sea", seed=5), 12_000), "k"))
    summaries = []

    def produce():  # the broker restarts from the main thread: it dies with the thread that started it
        for message in messages:
            sender.send(message)
        summaries.append(sender.close())

    sending = threading.Thread(target=produce)
    sending.start()
    try:
        time.sleep(1.5)
        _kill(own_broker)
        time.sleep(1.0)
        own_broker.start()
        restarted_at = sender.summary.sent
    finally:
        sending.join(120)
        kafka_producer.close()
    summary = summaries[0]
    assert (summary.sent, summary.acknowledged, summary.failed) == (12_000, 12_000, 0), summary.as_dict()
    assert summary.resent > 0 and restarted_at < 12_000, (restarted_at, summary.as_dict())
    keys = {r.key for r in read_topic(own_broker.bootstrap, topic, expected=12_000 - restarted_at)}
    assert {m.key for m in messages[restarted_at:]} <= keys
