"""What each topic keeps: Kafka topic configs, set when streamfit creates or finds its topics.

The embedded noida-db broker keeps every record in memory (and rewrites a JSON snapshot of all of
them to its data dir as they change), so a topic without retention grows the broker without bound.
noida-db applies Kafka's own topic configs (``cleanup.policy``, ``retention.ms``, ``segment.ms``,
``retention.bytes``; its log cleaner runs every few seconds), as Apache Kafka does (on disk, every
``log.retention.check.interval.ms``). So retention is set the Kafka way, the same on every broker:

- ``events``, ``predictions``, ``training-metrics``: ``cleanup.policy=delete``, kept
  ``topic_retention_ms`` (whole segments of ``topic_retention_ms / 8`` are deleted, so a record lives
  between ``topic_retention_ms`` and ``1.125 x`` that). That is how far a consumer may fall behind, or
  stay down, before it loses records: a Spark query then fails (``fail_on_data_loss``, Spark's default)
  or skips them, naming the offsets. ``-1`` keeps everything.
- ``events.dlq``: 7 days (Kafka's default, stated): dead letters are for people to read, and few.
- ``model-updates``: compacted (the latest announcement of each model stays; servers follow its end).

Topics that already exist are brought to these configs too (IncrementalAlterConfigs), so a broker
resumed from older data, or a cluster whose topics streamfit created before, gets them. tansu's
in-memory engine accepts the configs and keeps everything anyway (it implements no retention).

>>> from pipeline.settings import Settings
>>> topic_configs(Settings(topic_retention_ms=240_000))["events"]
{'cleanup.policy': 'delete', 'retention.ms': '240000', 'segment.ms': '30000'}
>>> topic_configs(Settings(topic_retention_ms=-1))["predictions"]
{'cleanup.policy': 'delete', 'retention.ms': '-1'}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from pipeline.kafka import admin, ensure_topics, topic_specs
from pipeline.settings import Settings

log = logging.getLogger(__name__)

DLQ_RETENTION_MS = 7 * 24 * 3600 * 1000
"""Kafka's default ``retention.ms``, stated for the dead-letter topic."""

SEGMENTS_PER_RETENTION = 8
"""Retention deletes whole segments: a segment spans this fraction of the retention time."""


def stream_configs(retention_ms: int) -> dict[str, str]:
    """Time retention for a streaming topic; ``-1`` keeps everything."""
    configs = {"cleanup.policy": "delete", "retention.ms": str(retention_ms)}
    if retention_ms >= 0:
        configs["segment.ms"] = str(max(1000, retention_ms // SEGMENTS_PER_RETENTION))
    return configs


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic name -> the Kafka topic configs streamfit sets on it."""
    stream = stream_configs(settings.topic_retention_ms)
    return {
        settings.topic_events: stream,
        settings.topic_predictions: stream,
        settings.topic_training_metrics: stream,
        settings.topic_dlq: stream_configs(DLQ_RETENTION_MS),
        settings.topic_model_updates: {"cleanup.policy": "compact"},
    }


def apply_topic_configs(
    bootstrap_servers: str,
    configs: dict[str, dict[str, str]],
    timeout_s: float = 15.0,
    properties: Mapping[str, str] | None = None,
) -> None:
    """Set ``configs`` on existing topics (only the keys given; others keep their values). A broker that
    refuses logs a warning: retention is then the broker's own, and streamfit runs on."""
    client = admin(bootstrap_servers, timeout_s, properties)
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, dict(values)) for name, values in configs.items()]
        results = client.alter_configs(resources, raise_on_unknown=False, incremental=True).get("topic", {})
    except KafkaError as exc:
        log.warning("could not set the topic configs %s on %s: %s", configs, bootstrap_servers, exc)
        return
    finally:
        client.close()
    for name, outcome in results.items():
        if outcome != "OK":
            log.warning("topic %s keeps its configs (setting %s failed: %s)", name, configs[name], outcome)


def ensure_streamfit_topics(bootstrap_servers: str, settings: Settings) -> list[str]:
    """Create streamfit's topics if missing and set their configs; returns the names created."""
    created = ensure_topics(
        bootstrap_servers,
        topic_specs(settings),
        settings.kafka_timeout_s,
        settings.kafka,
        settings.topic_replication_factor,
    )
    apply_topic_configs(bootstrap_servers, topic_configs(settings), settings.kafka_timeout_s, settings.kafka)
    return created
