"""Retention over the Kafka protocol: the embedded broker deletes what the topic configs say, so its
memory stays bounded over long runs; topics that already exist get the configs too."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from pipeline.kafka import consumer, ensure_topics, producer
from pipeline.retention import DLQ_RETENTION_MS, ensure_streamfit_topics, topic_configs
from pipeline.settings import Settings


def _settings(tmp_path, topic: str, retention_ms: int) -> Settings:
    return Settings(
        home=tmp_path / "home",
        topic_events=f"{topic}-events",
        topic_predictions=f"{topic}-predictions",
        topic_dlq=f"{topic}-dlq",
        topic_model_updates=f"{topic}-updates",
        topic_training_metrics=f"{topic}-metrics",
        events_partitions=2,
        topic_retention_ms=retention_ms,
        kafka_timeout_s=10,
    )


def _configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    client = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        described = client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name, None) for name in names])
    finally:
        client.close()
    return {
        name: {key: entry["value"] for key, entry in configs.items()} for name, configs in described["topic"].items()
    }


def _produce(bootstrap: str, topic: str, n: int, partitions: int) -> None:
    kafka = producer(bootstrap)
    for i in range(n):
        kafka.send(topic, key=b"%d" % i, value=b"x" * 500, partition=i % partitions)
    kafka.flush()
    kafka.close()


def _log_bounds(bootstrap: str, topic: str, partitions: int) -> tuple[int, int]:
    """(sum of log start offsets, sum of end offsets) over the topic's partitions."""
    reader = consumer(bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        return sum(reader.beginning_offsets(parts).values()), sum(reader.end_offsets(parts).values())
    finally:
        reader.close()


def test_the_embedded_broker_deletes_records_past_retention(kafka, topic, tmp_path):
    settings = _settings(tmp_path, topic, retention_ms=2000)
    ensure_streamfit_topics(kafka, settings)
    _produce(kafka, settings.topic_events, 400, 2)
    _produce(kafka, settings.topic_dlq, 10, 1)
    assert _log_bounds(kafka, settings.topic_events, 2) == (0, 400)
    deadline = time.monotonic() + 30
    while _log_bounds(kafka, settings.topic_events, 2) != (400, 400):  # the log start reaches the end
        assert time.monotonic() < deadline, f"retention did not run: {_log_bounds(kafka, settings.topic_events, 2)}"
        time.sleep(0.5)
    assert _log_bounds(kafka, settings.topic_dlq, 1) == (0, 10)  # dead letters stay for days
    _produce(kafka, settings.topic_events, 10, 2)  # the topic goes on at the next offsets
    assert _log_bounds(kafka, settings.topic_events, 2) == (400, 410)


def test_topics_that_exist_already_get_the_configs(kafka, topic, tmp_path):
    """A broker resumed from older data, or a cluster streamfit created topics on before."""
    settings = _settings(tmp_path, topic, retention_ms=240_000)
    wanted = topic_configs(settings)
    ensure_topics(kafka, {settings.topic_events: 2, settings.topic_model_updates: 1})
    created = ensure_streamfit_topics(kafka, settings)
    assert set(created) == {settings.topic_dlq, settings.topic_predictions, settings.topic_training_metrics}
    described = _configs(kafka, list(wanted))
    for name, configs in wanted.items():
        assert {key: described[name].get(key) for key in configs} == configs, name
    assert described[settings.topic_events]["retention.ms"] == "240000"
    assert described[settings.topic_events]["segment.ms"] == "30000"
    assert described[settings.topic_dlq]["retention.ms"] == str(DLQ_RETENTION_MS)
    assert described[settings.topic_model_updates]["cleanup.policy"] == "compact"


def test_tansu_takes_the_configs_but_keeps_everything(tansu, topic, tmp_path):
    """tansu's in-memory engine implements no retention: streamfit runs on it, unbounded (README)."""
    settings = _settings(tmp_path, topic, retention_ms=2000)
    ensure_streamfit_topics(tansu, settings)
    _produce(tansu, settings.topic_events, 40, 2)
    time.sleep(3)
    start, end = _log_bounds(tansu, settings.topic_events, 2)
    assert start == 0 < end
