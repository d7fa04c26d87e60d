"""Send events to Kafka and account for every one: sent, acknowledged, failed, dead-lettered.

Sends are pipelined (the client batches them); acknowledgements are collected as
they complete, and ``close`` waits for the last one, so a run only reports success
once the broker has acknowledged everything. The producer is ``pipeline.kafka.fast_producer``'s
(librdkafka or kafka-python) or a kafka-python ``KafkaProducer``: both fail a send with a ``KafkaError``.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import orjson
from kafka.errors import KafkaError

from pipeline.dlq import MAX_RAW_BYTES, dead_letter
from pipeline.events import Event, Rejection, validate_document
from producers.files import FileRow
from producers.rate import TokenBucket
from producers.synthetic import Row


@dataclass(frozen=True)
class Outgoing:
    """One message to send: an event (``dead=False``) or a dead-letter record."""

    key: bytes | None
    value: bytes
    dead: bool = False


@dataclass
class Summary:
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    resent: int = 0
    dead_lettered: int = 0
    elapsed_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.acknowledged / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "errors": self.errors[:5], "events_per_s": round(self.events_per_s, 1)}


BROKEN = (  # what an event is replaced with when it is sent broken on purpose: each fails validation differently
    lambda event: b"{not json: " + event["id"].encode(),
    lambda event: orjson.dumps(event | {"features": event["features"][:-1]}),
    lambda event: orjson.dumps(event | {"features": ["n/a"] * len(event["features"])}),
)


def synthetic_events(
    rows: Iterable[Row], id_prefix: str, label_fraction: float = 1.0, seed: int = 0, invalid_fraction: float = 0.0
) -> Iterator[Outgoing]:
    """Turn generated (features, label) rows into event messages keyed by id (hot path: no per-event objects).

    ``invalid_fraction`` of them are sent broken (not JSON, a feature short, non-numbers), so a demo or
    a test shows the consumers' dead-letter path on the same stream.
    """
    keep, breaks = random.Random(seed).random, random.Random(seed + 1).random
    dumps, now_ns = orjson.dumps, time.time_ns
    for number, (features, label) in enumerate(rows):
        event_id = f"{id_prefix}-{number}"
        event = {
            "id": event_id,
            "ts": now_ns() // 1_000_000,
            "features": features,
            "label": label if keep() < label_fraction else None,
        }
        broken = invalid_fraction and breaks() < invalid_fraction
        yield Outgoing(event_id.encode(), BROKEN[number % len(BROKEN)](event) if broken else dumps(event))


def file_events(
    rows: Iterable[FileRow],
    schema_for,
    source: str,
    label_fraction: float = 1.0,
    seed: int = 0,
    max_raw_bytes: int = MAX_RAW_BYTES,
) -> Iterator[Outgoing]:
    """Validate file rows: valid ones become events, the rest dead-letter records naming row and reason.

    ``schema_for(document)`` gives the feature schema, so it can be derived from the first row.
    An event larger than the schema's ``max_bytes`` (a long id) is dead-lettered here, as the
    consumers would refuse it.
    """
    keep = random.Random(seed).random
    for row in rows:
        if row.error:
            verdict = Rejection(row.error)
        else:
            schema = schema_for(row.document)
            verdict = validate_document(row.document, schema)
        if isinstance(verdict, Event):
            if verdict.label is not None and keep() >= label_fraction:
                verdict = Event(verdict.id, verdict.ts, verdict.features, None)
            value = verdict.to_json()
            if len(value) <= schema.max_bytes:
                yield Outgoing(verdict.id.encode(), value)
                continue
            verdict = Rejection(f"event is {len(value)} bytes, over the {schema.max_bytes}-byte limit")
        yield Outgoing(
            None, dead_letter("produce", verdict.reason, row.raw, source, None, row.row, max_raw_bytes), dead=True
        )


class Sender:
    """Pipelined sends with acknowledgement accounting and optional pacing.

    A send the producer gave up on (its own retries ran out, or a broker restarted and lost the
    idempotent producer's sequence numbers: ``OutOfOrderSequenceNumberError``, which librdkafka makes
    fatal: ``fast_producer``'s next send starts a new one) is sent again, up to ``resends`` times,
    before it counts as failed: at-least-once, so a resend may duplicate an event.
    """

    def __init__(
        self, producer, topic: str, dlq_topic: str, rate: float = 0.0, max_in_flight: int = 20_000, resends: int = 3
    ):
        self.producer, self.topic, self.dlq_topic = producer, topic, dlq_topic
        self.bucket = TokenBucket(rate)
        self.max_in_flight = max_in_flight
        self.resends = resends
        self.pending: deque = deque()
        self.summary = Summary()
        self.started = time.monotonic()

    def send(self, message: Outgoing) -> None:
        if message.dead:
            self.summary.dead_lettered += 1
            topic = self.dlq_topic
        else:
            self.bucket.take()
            topic = self.topic
        if self._send(topic, message, attempt=0):
            self.summary.sent += 1
        if self.summary.sent % 256 == 0:
            self._collect(block=len(self.pending) > self.max_in_flight)

    def _send(self, topic: str, message: Outgoing, attempt: int) -> bool:
        try:
            future = self.producer.send(topic, key=message.key, value=message.value)
        except KafkaError as exc:
            self._fail(exc)
            return False
        self.pending.append((future, topic, message, attempt))
        return True

    def _collect(self, block: bool) -> None:
        pending = self.pending
        while pending and (pending[0][0].is_done or block):
            future, topic, message, attempt = pending.popleft()
            block = False
            try:
                future.get()
                self.summary.acknowledged += 1
            except KafkaError as exc:
                if attempt < self.resends:
                    self.summary.resent += 1
                    self._send(topic, message, attempt + 1)
                else:
                    self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.summary.failed += 1
        if len(self.summary.errors) < 20:
            self.summary.errors.append(f"{type(exc).__name__}: {exc}")

    def close(self, timeout_s: float = 60.0) -> Summary:
        """Flush, wait for every acknowledgement, and return the final accounting."""
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            self._fail(exc)
        while self.pending:
            self._collect(block=True)
        self.summary.elapsed_s = time.monotonic() - self.started
        return self.summary
