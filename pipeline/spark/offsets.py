"""Kafka offsets for Spark sources: what to read, where it ends, and reading one range.

This module speaks only the Kafka protocol (kafka-python); the Spark adapter in
``pipeline.spark.source`` stays thin on top of it. Offsets are plain JSON-able dicts
``{topic: {partition (str): offset}}`` so Spark can keep them in its checkpoint.

End offsets are the larger of the ListOffsets answer and the high watermark of a
Fetch at that position: some brokers (tansu 0.6) answer ListOffsets(latest) with the
base offset of the last batch rather than the end of the log.

A query's offsets never move backwards: a partition the broker reports behind the query
(restarted with less data, a truncated log, a lagging leader) or no longer reports keeps
the query's offset, so nothing is read twice. Records gone before they are read
(retention, ``deleteRecords``) are data loss, handled as Spark's ``failOnDataLoss`` says.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError

from pipeline.kafka_properties import KafkaProperties, python_kwargs

log = logging.getLogger(__name__)

Offsets = dict[str, dict[str, int]]


class OffsetError(ValueError):
    """Bad offsets specification or lost data; the message names the topic and partition."""


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def parse_topics(subscribe: str) -> list[str]:
    topics = [t.strip() for t in subscribe.split(",") if t.strip()]
    if not topics:
        raise OffsetError("option 'subscribe' names no topic")
    return topics


@dataclass(frozen=True)
class Subscription:
    """What a source reads, as Spark's Kafka source says it: named ``topics`` (``subscribe``), every topic
    whose whole name matches ``pattern`` (``subscribePattern``), or the ``assigned`` partitions (``assign``)."""

    topics: tuple[str, ...] = ()
    pattern: str | None = None
    assigned: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, subscribe: str | None, pattern: str | None, assign: str | None) -> Subscription:
        """From the three options, exactly one of which must be given.

        >>> Subscription.of(None, None, '{"a": [1, 0], "b": [2]}').assigned
        (('a', 0), ('a', 1), ('b', 2))
        >>> Subscription.of("a", "b.*", None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pipeline.spark.offsets.OffsetError: give exactly one of the options ...; got 'subscribe', 'subscribePattern'
        """
        options = (("subscribe", subscribe), ("subscribePattern", pattern), ("assign", assign))
        given = [name for name, value in options if value is not None]
        if len(given) != 1:
            raise OffsetError(
                "give exactly one of the options 'subscribe', 'subscribePattern', 'assign'; got "
                + (", ".join(repr(name) for name in given) or "none")
            )
        if subscribe is not None:
            return cls(topics=tuple(parse_topics(subscribe)))
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise OffsetError(f"subscribePattern {pattern!r} is not a regular expression: {exc}") from None
            return cls(pattern=pattern)
        try:
            wanted = json.loads(assign or "")
            pairs = sorted((topic, int(p)) for topic, parts in wanted.items() for p in parts)
        except (ValueError, TypeError, AttributeError):
            raise OffsetError(f'assign must be JSON like {{"topicA": [0, 1]}}, got {assign!r}') from None
        if not pairs:
            raise OffsetError("option 'assign' names no partition")
        return cls(assigned=tuple(pairs))


DRAIN_RECORDS = 1_000_000
"""Records one poll may return while :meth:`KafkaOffsetReader.latest` waits for high watermarks (all of them)."""


class KafkaOffsetReader:
    """Partition discovery and earliest/latest offsets for a set of topics (or any :class:`Subscription`)."""

    def __init__(
        self,
        bootstrap: str,
        topics: list[str] | Subscription,
        timeout_s: float = 15.0,
        properties: Mapping[str, str] | None = None,
    ):
        self.subscription = topics if isinstance(topics, Subscription) else Subscription(topics=tuple(topics))
        try:
            self.consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                enable_auto_commit=False,
                fetch_max_wait_ms=20,
                max_poll_records=1,
                request_timeout_ms=int(timeout_s * 1000) + 1000,
                bootstrap_timeout_ms=int(timeout_s * 1000),
                client_id="streamfit-offsets",
                **python_kwargs(properties or {}, "consumer"),
            )
        except KafkaError:
            from pipeline.kafka import KafkaTlsError, tls_problem

            problem = tls_problem(bootstrap, KafkaProperties(properties))
            if problem:
                raise KafkaTlsError(problem) from None
            raise
        self.timeout_s = timeout_s

    def partitions(self) -> list[TopicPartition]:
        found = []
        deadline = time.monotonic() + self.timeout_s
        subscription = self.subscription
        if subscription.pattern is not None:
            matching = sorted(t for t in self.consumer.topics() if re.fullmatch(subscription.pattern, t))
            return [TopicPartition(t, p) for t in matching for p in sorted(self.consumer.partitions_for_topic(t) or ())]
        topics = subscription.topics or tuple(dict.fromkeys(t for t, _ in subscription.assigned))
        for topic in topics:
            ids = self.consumer.partitions_for_topic(topic)
            while not ids and time.monotonic() < deadline:
                time.sleep(0.2)
                self.consumer.poll(0)  # refreshes metadata
                ids = self.consumer.partitions_for_topic(topic)
            if not ids:
                raise OffsetError(f"topic {topic!r} does not exist")
            if subscription.assigned:
                wanted = {p for t, p in subscription.assigned if t == topic}
                if wanted - ids:
                    raise OffsetError(f"assign: topic {topic!r} has no partition(s) {sorted(wanted - ids)}")
                ids = wanted
            found.extend(TopicPartition(topic, p) for p in sorted(ids))
        return found

    def earliest(self) -> Offsets:
        return _as_offsets(self.consumer.beginning_offsets(self.partitions()))

    def latest(self) -> Offsets:
        partitions = self.partitions()
        listed = self.consumer.end_offsets(partitions)
        self.consumer.assign(partitions)
        for tp in partitions:
            self.consumer.seek(tp, listed[tp])
        deadline = time.monotonic() + self.timeout_s
        while any(self.consumer.highwater(tp) is None for tp in partitions) and time.monotonic() < deadline:
            # a fetch per partition brings its high watermark; a partition's watermark is read only when the
            # fetches queued before it are drained, so drain them whole (one record a poll took the timeout).
            # Short polls: a poll returns on records, not on an empty answer with the watermark, and a broker
            # that answers empty fetches at once (noida-db) had kafka-python spin the whole 50 ms of a longer one
            self.consumer.poll(timeout_ms=1, max_records=DRAIN_RECORDS)
        ends = {tp: max(listed[tp], self.consumer.highwater(tp) or 0) for tp in partitions}
        self.consumer.assign([])
        return _as_offsets(ends)

    def starting(self, spec: str, option: str = "startingOffsets") -> Offsets:
        """``earliest``, ``latest`` or JSON ``{"topic": {"0": 23, "1": -2}}`` (-2 earliest, -1 latest)."""
        if spec == "earliest":
            return self.earliest()
        if spec == "latest":
            return self.latest()
        earliest, latest = self.earliest(), self.latest()
        wanted = _per_partition(spec, earliest, option, "earliest, latest or JSON")
        return {
            topic: {p: {-2: earliest[topic][p], -1: latest[topic][p]}.get(given, given) for p, given in parts.items()}
            for topic, parts in wanted.items()
        }

    def by_timestamp(self, spec: str, option: str, missing: str) -> Offsets:
        """Per partition, the offset of its first record stamped at or after the JSON's epoch-ms timestamp
        (``{"topic": {"0": 1700000000000}}``, Kafka's ListOffsets by time). A partition with no such record
        takes its end offset (``missing="latest"``) or fails naming it (``missing="error"``), as Spark's
        ``endingOffsetsByTimestamp`` and ``startingOffsetsByTimestamp`` do."""
        latest = self.latest()
        wanted = _per_partition(spec, latest, option, "JSON")
        found = self.consumer.offsets_for_times(
            {TopicPartition(t, int(p)): ts for t, parts in wanted.items() for p, ts in parts.items()}
        )
        result: Offsets = {}
        for tp, hit in found.items():
            if hit is None and missing == "error":
                raise OffsetError(
                    f"{option}: {tp.topic}[{tp.partition}] has no record at or after "
                    f"{wanted[tp.topic][str(tp.partition)]} ms"
                )
            result.setdefault(tp.topic, {})[str(tp.partition)] = (
                latest[tp.topic][str(tp.partition)] if hit is None else hit.offset
            )
        return result

    def close(self) -> None:
        self.consumer.close()


def _per_partition(spec: str, partitions: Offsets, option: str, expected: str) -> Offsets:
    """``spec``, JSON ``{"topic": {"partition": n}}``, checked to give an integer for each of ``partitions``."""
    try:
        wanted = json.loads(spec)
        if not isinstance(wanted, dict):
            raise ValueError
    except ValueError:
        raise OffsetError(f"{option} must be {expected}, got {spec!r}") from None
    result: Offsets = {}
    for topic, parts in partitions.items():
        given = wanted.get(topic)
        if not isinstance(given, dict):
            raise OffsetError(f"{option} has no entry for subscribed topic {topic!r}")
        missing = set(parts) - set(given)
        if missing:
            raise OffsetError(f"{option} for {topic!r} misses partition(s) {sorted(missing)}")
        try:
            result[topic] = {p: int(given[p]) for p in parts}
        except (TypeError, ValueError):
            raise OffsetError(f"{option} for {topic!r}: every value must be an integer, got {given}") from None
    return result


def _as_offsets(by_partition: dict[TopicPartition, int]) -> Offsets:
    result: Offsets = {}
    for tp, offset in by_partition.items():
        result.setdefault(tp.topic, {})[str(tp.partition)] = int(offset)
    return result


def behind(start: Offsets, latest: Offsets) -> dict[tuple[str, str], int | None]:
    """Partitions of ``start`` the broker reports below it (their reported end) or not at all (None).

    >>> behind({"t": {"0": 100, "1": 5, "2": 7}}, {"t": {"0": 10, "1": 9}})
    {('t', '0'): 10, ('t', '2'): None}
    """
    found: dict[tuple[str, str], int | None] = {}
    for topic, parts in start.items():
        for partition, offset in parts.items():
            reported = latest.get(topic, {}).get(partition)
            if reported is None or reported < offset:
                found[(topic, partition)] = reported
    return found


def limit_end(start: Offsets, latest: Offsets, max_rows: int | None) -> Offsets:
    """The end offsets of the next batch: everything available, or at most ``max_rows`` spread
    over partitions in proportion to their backlog (as Spark's Kafka source does). Never below
    ``start``: a partition :func:`behind` names keeps its offset.

    >>> limit_end({"t": {"0": 100, "1": 5, "2": 7}}, {"t": {"0": 10, "1": 9}}, None)
    {'t': {'0': 100, '1': 9, '2': 7}}
    """
    merged = {
        t: {p: max(offset, start.get(t, {}).get(p, offset)) for p, offset in parts.items()}
        for t, parts in latest.items()
    }
    for topic, parts in start.items():
        for partition, offset in parts.items():
            merged.setdefault(topic, {}).setdefault(partition, offset)
    backlog = {(t, p): max(0, merged[t][p] - start.get(t, {}).get(p, merged[t][p])) for t in merged for p in merged[t]}
    total = sum(backlog.values())
    if max_rows is None or total <= max_rows:
        return merged
    taken = 0
    shares = sorted(backlog.items(), key=lambda item: -item[1])
    for index, ((topic, partition), size) in enumerate(shares):
        share = size * max_rows // total if index < len(shares) - 1 else max_rows - taken
        share = min(size, max(0, share))
        taken += share
        merged[topic][partition] = start.get(topic, {}).get(partition, merged[topic][partition]) + share
    return merged


def ranges(start: Offsets, end: Offsets) -> list[OffsetRange]:
    """Non-empty ranges between two offset maps; a partition new since ``start`` starts at 0."""
    return [
        OffsetRange(topic, int(p), start.get(topic, {}).get(p, 0), stop)
        for topic, parts in end.items()
        for p, stop in parts.items()
        if stop > start.get(topic, {}).get(p, 0)
    ]


def split(parts: list[OffsetRange], min_parts: int) -> list[OffsetRange]:
    """Cut ranges so there are at least ``min_parts`` (each range in proportion to its size, like
    Spark's ``minPartitions``), so a micro-batch keeps every core busy whatever the partition count.

    >>> [(r.start, r.end) for r in split([OffsetRange("t", 0, 0, 10), OffsetRange("t", 1, 5, 7)], 4)]
    [(0, 2), (2, 5), (5, 7), (7, 10), (5, 7)]
    """
    total = sum(part.size for part in parts)
    if len(parts) >= min_parts or total == 0:
        return parts
    result = []
    for part in parts:
        pieces = max(1, min(part.size, -(-part.size * min_parts // total)))
        bounds = [part.start + part.size * i // pieces for i in range(pieces + 1)]
        result.extend(OffsetRange(part.topic, part.partition, a, b) for a, b in zip(bounds, bounds[1:]))
    return result


def read_range(
    consumer: KafkaConsumer, part: OffsetRange, fail_on_data_loss: bool = True, timeout_s: float = 60.0
) -> Iterator:
    """Every record with offset in [start, end) of one partition, in order.

    Offsets gone before they are read (retention, truncation, ``deleteRecords``) are data loss:
    with ``fail_on_data_loss`` an :class:`OffsetError` naming them, without it a WARNING naming
    them and the read goes on from what is left. ``consumer`` must not reset positions itself
    (``auto_offset_reset="none"``), or a loss while reading would pass unseen.
    """
    tp = TopicPartition(part.topic, part.partition)
    consumer.assign([tp])
    position = _after_loss(consumer, part, part.start, fail_on_data_loss)
    consumer.seek(tp, position)
    deadline = time.monotonic() + timeout_s
    while position < part.end:
        try:
            batch = consumer.poll(timeout_ms=500).get(tp, [])
        except OffsetOutOfRangeError:
            resumed = _after_loss(consumer, part, position, fail_on_data_loss)
            if resumed == position:  # not below the log's start, so above its end: the log was cut short
                message = (
                    f"{part.topic}[{part.partition}]: offset {position} is past the end of the log "
                    f"(truncated?); offsets {position}..{part.end - 1} cannot be read"
                )
                if fail_on_data_loss:
                    raise OffsetError(message + "; set fail_on_data_loss=false (failOnDataLoss) to skip them") from None
                log.warning("%s: skipped (failOnDataLoss=false)", message)
                return
            position = resumed
            consumer.seek(tp, position)
            continue
        if not batch:
            if time.monotonic() > deadline:
                raise OffsetError(
                    f"{part.topic}[{part.partition}]: no data at offset {position} "
                    f"(expected up to {part.end}) after {timeout_s:.0f}s"
                )
            continue
        deadline = time.monotonic() + timeout_s
        for record in batch:
            if record.offset >= part.end:
                return
            yield record
        position = batch[-1].offset + 1


def _after_loss(consumer: KafkaConsumer, part: OffsetRange, wanted: int, fail_on_data_loss: bool) -> int:
    """Where to read from when ``wanted`` is next: ``wanted`` itself, or the log's earliest offset
    if retention took ``wanted`` (raising instead, with ``fail_on_data_loss``)."""
    tp = TopicPartition(part.topic, part.partition)
    earliest = consumer.beginning_offsets([tp])[tp]
    if earliest <= wanted:
        return wanted
    lost = (
        f"{part.topic}[{part.partition}]: offsets {wanted}..{min(earliest, part.end) - 1} are gone "
        f"(the log now starts at {earliest}: retention, truncation or deleteRecords)"
    )
    if fail_on_data_loss:
        raise OffsetError(lost + "; set fail_on_data_loss=false (failOnDataLoss) to skip them")
    log.warning("%s: skipped (failOnDataLoss=false)", lost)
    return earliest
