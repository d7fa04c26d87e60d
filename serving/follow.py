"""Following alias moves: ``model-updates`` on Kafka for speed, the registry itself as the fallback.

A move announced on ``model-updates`` reaches the server within a Kafka fetch (the consumer
long-polls with a 100 ms ceiling). The registry is the truth, so a message only says *look
now*: the swap thread re-reads the champion, which also makes a burst of moves cost one
swap. Independently, the registry is re-read every ``registry_poll_s``: that is how moves
arrive while Kafka is unreachable (or was never configured), and how a missed message is
caught. A Kafka that goes away is retried in the background; serving never waits for it.
"""

from __future__ import annotations

import logging
import threading

import orjson
from kafka import TopicPartition
from kafka.errors import KafkaError

from pipeline.kafka import KafkaUnavailable, bootstrap, consumer
from pipeline.settings import Settings
from serving.metrics import Metrics
from serving.swap import ModelHost

log = logging.getLogger(__name__)

RECONNECT_S = 5.0
"""Wait between attempts to reach Kafka while it is unavailable."""
POLL_EVERY_S = 0.1
"""How often the follower asks Kafka for new model updates: it polls without waiting and sleeps in
between, because a broker that answers an empty fetch at once (noida-db ignores ``fetch.max.wait.ms``)
keeps a waiting poll fetching in a busy loop -- half a core in serving and a third of the broker's
CPU at 1,000 events/s, for a topic that moves a few times a minute."""


class Follower:
    """Two daemon threads keeping ``host`` on each model's champion: the Kafka follower and the poller."""

    def __init__(self, settings: Settings, host: ModelHost, metrics: Metrics):
        self.settings, self.host, self.metrics = settings, host, metrics
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._follow_kafka, name="streamfit-model-updates", daemon=True),
            threading.Thread(target=self._poll_registry, name="streamfit-registry-poll", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)  # daemon threads: one stuck in a Kafka connect dies with the process

    def _poll_registry(self) -> None:
        self.host.refresh_all()
        while not self._stop.wait(self.settings.registry_poll_s):
            self.host.refresh_all()

    def _follow_kafka(self) -> None:
        outage = None
        while not self._stop.is_set():
            try:
                self._consume()
                return
            except (KafkaUnavailable, KafkaError, OSError) as exc:
                self.metrics.updates_connected.set(0)
                if str(exc) != outage:
                    outage = str(exc)
                    log.warning(
                        "not following %s (%s); polling the registry every %g s and retrying Kafka every %g s",
                        self.settings.topic_model_updates,
                        exc,
                        self.settings.registry_poll_s,
                        RECONNECT_S,
                    )
            self._stop.wait(RECONNECT_S)

    def _consume(self) -> None:
        """Follow the topic from its end until stopped; raises if Kafka cannot be reached."""
        topic, servers = self.settings.topic_model_updates, bootstrap(self.settings)
        reader = consumer(
            servers,
            self.settings.kafka_timeout_s,
            self.settings.kafka,
            client_id="streamfit-serve",
            fetch_max_wait_ms=100,
            request_timeout_ms=int(self.settings.kafka_timeout_s * 1000) + 1000,
        )
        try:
            partitions = reader.partitions_for_topic(topic)
            if not partitions:
                raise KafkaUnavailable(f"topic {topic} does not exist on {servers} (create it with `streamfit topics`)")
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            reader.assign(assigned)
            reader.seek_to_end()
            for partition in assigned:
                reader.position(partition)  # resolve the end offsets now: later moves are all seen
            self.host.refresh_all()  # moves made before that point
            self.metrics.updates_connected.set(1)
            log.info("following %s on %s", topic, servers)
            while not self._stop.is_set():
                for records in reader.poll(timeout_ms=0).values():
                    for record in records:
                        self._heard(record.value)
                self._stop.wait(POLL_EVERY_S)
        finally:
            self.metrics.updates_connected.set(0)
            reader.close()

    def _heard(self, value: bytes) -> None:
        try:
            event = orjson.loads(value)
            model, alias = event["model"], event["alias"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed %s message: %.200r", self.settings.topic_model_updates, value)
            return
        if model in self.host.models:  # the champion to swap to; the candidate for canary and shadow
            log.debug("heard %s %s -> v%s", model, alias, event.get("version"))
            self.host.refresh(model)
