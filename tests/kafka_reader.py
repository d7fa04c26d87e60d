"""Read a topic back completely, for assertions (counts what arrived, never trusts one ListOffsets answer)."""

from __future__ import annotations

import time

from kafka import TopicPartition

from pipeline.kafka import consumer


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0, settle_s: float = 1.0) -> list:
    """All records of ``topic``: stops once ``expected`` arrived and nothing more came for ``settle_s``."""
    reader = consumer(bootstrap, consumer_timeout_ms=200, fetch_max_bytes=16 * 1024 * 1024)
    try:
        partitions = reader.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + timeout_s
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.1)
            partitions = reader.partitions_for_topic(topic) or set()
        reader.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        reader.seek_to_beginning()
        records, quiet_since = [], time.monotonic()
        while time.monotonic() < deadline:
            batch = reader.poll(timeout_ms=200)
            got = [r for rs in batch.values() for r in rs]
            records.extend(got)
            now = time.monotonic()
            if got:
                quiet_since = now
            elif len(records) >= expected and now - quiet_since >= settle_s:
                break
        return records
    finally:
        reader.close()
