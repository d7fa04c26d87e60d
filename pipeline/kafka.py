"""Kafka plumbing shared by every component: finding the cluster, topics, clients.

All talk to Kafka goes through kafka-python over the Kafka protocol, so the same
code runs against the embedded broker and a real Apache Kafka cluster.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.settings import Settings

log = logging.getLogger(__name__)

BROKER_FILE = "broker.json"


class KafkaUnavailable(RuntimeError):
    """No Kafka cluster could be reached or found; the message says what to do."""


def broker_file(settings: Settings) -> Path:
    return settings.home / BROKER_FILE


def bootstrap(settings: Settings) -> str:
    """The cluster to use: ``STREAMFIT_KAFKA_BOOTSTRAP`` if set, else the running embedded broker."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    path = broker_file(settings)
    try:
        return json.loads(path.read_text())["bootstrap"]
    except FileNotFoundError:
        raise KafkaUnavailable(
            f"no Kafka configured: start one with `streamfit broker` (it writes {path}) "
            "or set STREAMFIT_KAFKA_BOOTSTRAP=host:port"
        ) from None
    except (ValueError, KeyError) as exc:
        raise KafkaUnavailable(f"{path} is unreadable ({exc}); restart `streamfit broker`") from None


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count for every topic streamfit uses."""
    return {
        settings.topic_events: settings.events_partitions,
        settings.topic_dlq: 1,
        settings.topic_predictions: settings.events_partitions,
        settings.topic_model_updates: 1,
        settings.topic_training_metrics: 1,
    }


def admin(bootstrap_servers: str, timeout_s: float) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000),
                                bootstrap_timeout_ms=int(timeout_s * 1000), client_id="streamfit-admin")
    except KafkaError:
        raise KafkaUnavailable(f"no Kafka broker answers at {bootstrap_servers}") from None


def ensure_topics(bootstrap_servers: str, topics: dict[str, int], timeout_s: float = 15.0) -> list[str]:
    """Create the missing topics; returns the names created. Existing topics are left as they are."""
    client = admin(bootstrap_servers, timeout_s)
    try:
        existing = set(client.list_topics())
        missing = [NewTopic(name, partitions, 1) for name, partitions in topics.items() if name not in existing]
        if missing:
            try:
                client.create_topics(missing, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass  # another process created them first
        _wait_for_topics(client, list(topics), timeout_s)
        return [t.name for t in missing]
    finally:
        client.close()


def _wait_for_topics(client: KafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """Topic creation is asynchronous on some brokers: wait until metadata lists every partition leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = client.describe_topics(names)
        ready = all(t["error_code"] == 0 and t["partitions"] and all(p["leader_id"] >= 0 for p in t["partitions"])
                    for t in described)
        if ready:
            return
        if time.monotonic() > deadline:
            raise KafkaUnavailable(f"topics {names} not ready after {timeout_s:.0f}s")
        time.sleep(0.1)


def describe(bootstrap_servers: str, timeout_s: float = 15.0) -> dict[str, int]:
    """Topic name -> partition count of every topic on the cluster, asked again until ``timeout_s`` passes
    when the broker drops the connection meanwhile (a consumer starting while its broker restarts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        client = admin(bootstrap_servers, max(1.0, deadline - time.monotonic()))
        try:
            return {t["name"]: len(t["partitions"])
                    for t in client.describe_topics(client.list_topics())}
        except KafkaError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
        finally:
            client.close()


def producer(bootstrap_servers: str, timeout_s: float = 15.0, **overrides) -> KafkaProducer:
    """A producer that waits for full acknowledgement, retries through a broker restart, and fails a
    send only once ``timeout_s`` (+5 s) passed without an acknowledgement."""
    config = dict(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
        retries=2**31 - 1,  # as Apache Kafka's own client: retry until delivery_timeout_ms, so a broker restart loses nothing
        request_timeout_ms=int(timeout_s * 1000),
        max_block_ms=int(timeout_s * 1000),
        bootstrap_timeout_ms=int(timeout_s * 1000),
        delivery_timeout_ms=int(timeout_s * 1000) + 5000,
        client_id="streamfit-producer",
    )
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except KafkaError:
        raise KafkaUnavailable(f"no Kafka broker answers at {bootstrap_servers}") from None
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot connect to Kafka at {bootstrap_servers}: {exc}") from None


def consumer(bootstrap_servers: str, timeout_s: float = 15.0, **overrides) -> KafkaConsumer:
    """A consumer with manual offset control; callers assign partitions themselves."""
    config = dict(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, auto_offset_reset="earliest",
                  bootstrap_timeout_ms=int(timeout_s * 1000), client_id="streamfit-consumer")
    config.update(overrides)
    try:
        return KafkaConsumer(**config)
    except KafkaError:
        raise KafkaUnavailable(f"no Kafka broker answers at {bootstrap_servers}") from None
