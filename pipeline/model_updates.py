"""Announcing alias moves on the ``model-updates`` topic.

The registry is the truth; this topic is how servers and predictors hear of a move within a
second instead of polling. Each message is the registry's alias-change event
(``{"model", "version", "alias", "uri", "created_at", "metrics"}``) keyed by model name, so a
compacted topic keeps the latest move per model.
"""

from __future__ import annotations

import logging
import time

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from pipeline.kafka import KafkaUnavailable, bootstrap, producer
from pipeline.registry import Registry
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class Announcer:
    """Produces each alias-change event to ``topic`` and waits for the broker's acknowledgement.

    The producer is created on first use. With ``required=False`` an unreachable Kafka is logged and
    the move stands (servers fall back to polling the registry); then, for ``kafka_timeout_s``, later
    moves are not announced at all rather than each waiting that long again, so a process stopping
    beside a dead broker (``streamfit up`` killed) still exits in seconds. With ``required=True`` it
    raises :class:`~pipeline.kafka.KafkaUnavailable`.
    """

    def __init__(self, settings: Settings, *, required: bool = False):
        self.settings = settings
        self.required = required
        self._producer: KafkaProducer | None = None
        self._failed_at: float | None = None

    def __call__(self, event: dict) -> None:
        if (
            not self.required
            and self._failed_at is not None
            and time.monotonic() - self._failed_at < self.settings.kafka_timeout_s
        ):
            log.warning(
                "alias %s of %s moved to v%s; not announced on %s (Kafka failed %.0f s ago)",
                event["alias"],
                event["model"],
                event["version"],
                self.settings.topic_model_updates,
                time.monotonic() - self._failed_at,
            )
            return
        try:
            if self._producer is None:
                self._producer = producer(
                    bootstrap(self.settings),
                    self.settings.kafka_timeout_s,
                    self.settings.kafka,
                    client_id="streamfit-model-updates",
                )
            future = self._producer.send(
                self.settings.topic_model_updates, key=event["model"].encode(), value=orjson.dumps(event)
            )
            # the producer gives up on a record after kafka_timeout_s + 5 s: wait for that verdict, so a
            # failed announcement leaves nothing for close() to flush
            future.get(timeout=self.settings.kafka_timeout_s + 10)
            self._failed_at = None
        except (KafkaError, KafkaUnavailable) as exc:
            self._failed_at = time.monotonic()
            if self.required:
                raise KafkaUnavailable(
                    f"could not announce {event['model']} {event['alias']} -> "
                    f"v{event['version']} on {self.settings.topic_model_updates}: {exc}"
                ) from exc
            log.warning(
                "alias %s of %s moved to v%s but was not announced on %s (%s); "
                "servers will see it by polling the registry",
                event["alias"],
                event["model"],
                event["version"],
                self.settings.topic_model_updates,
                exc,
            )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.settings.kafka_timeout_s)
            self._producer = None


def announcing_registry(settings: Settings, *, required: bool = False) -> tuple[Registry, Announcer]:
    """The settings' registry with every alias move announced on ``model-updates``; close the announcer after."""
    announcer = Announcer(settings, required=required)
    return Registry(settings.registry_url, on_alias_change=announcer), announcer
