"""The dead-letter fence: a micro-batch Spark replays does not dead-letter its events again.

Spark replays a micro-batch it did not commit (the driver crashed, or the query failed and was
restarted): same batch id, same offsets. The attempt that did not commit may already have written
dead letters, and Kafka has no rollback. So before a micro-batch writes any, its driver calls
:meth:`DeadLetterFence.enter`: the first attempt records the DLQ topic's end offsets in
``<checkpoint>/dlq-fence/<batch id>.json`` (synced, renamed into place); a later attempt finds the
file, reads the DLQ from those offsets to its end -- only what was written since -- and returns the
source ``(topic, partition, offset)`` of the records of its stage: the events already dead-lettered,
which it skips. The file stays until the micro-batch is long committed, so a replay of a replay
still sees the first attempt's records. Each bad event is dead-lettered once per stage however often
its micro-batch runs, without a transactional producer (the embedded brokers have none).

Recording a lower offset is safe (the records before it belong to other micro-batches' events), a
higher one is not: the fence uses ListOffsets, the replay the high watermark.

Limits: a task Spark retries inside one attempt (``spark.task.maxFailures`` on a cluster; local mode
does not retry tasks) writes its dead letters again; a dead letter the broker lost (or retention
removed) is written again; another query of the same stage on the same source topic and DLQ would
count as this one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import orjson
from kafka import TopicPartition

from pipeline.durable import fsync_dir, replace_atomically
from pipeline.kafka import consumer
from pipeline.spark.offsets import KafkaOffsetReader, Offsets, ranges, read_range

log = logging.getLogger(__name__)

Source = tuple[str, int, int]
"""An event's (topic, partition, offset), as its dead letter names it."""

KEEP = 5
"""Fence files kept: the micro-batch starting and the last committed ones."""


def source(dead_letter: bytes | None, stage: str | None = None) -> Source | None:
    """The event a DLQ record is about (if the record is of ``stage``, when given); None for a
    value that is not such a record."""
    try:
        record = orjson.loads(dead_letter or b"")
        if stage is not None and record["stage"] != stage:
            return None
        return record["topic"], int(record["partition"]), int(record["offset"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class DeadLetterFence:
    """The fence of one streaming query (its ``checkpoint``, a local directory) writing dead
    letters of ``stage`` to ``topic``."""

    def __init__(
        self,
        checkpoint: str,
        bootstrap: str,
        topic: str,
        stage: str,
        *,
        keep: int = KEEP,
        timeout_s: float = 15.0,
        properties: Mapping[str, str] | None = None,
    ):
        self.directory = _local_path(checkpoint) / "dlq-fence"
        self.bootstrap, self.topic, self.stage, self.keep, self.timeout_s = bootstrap, topic, stage, keep, timeout_s
        self.properties = properties
        self._offsets: KafkaOffsetReader | None = None  # kept across micro-batches: a new client costs ~8 ms

    def close(self) -> None:
        if self._offsets is not None:
            self._offsets.close()
            self._offsets = None

    def enter(self, batch_id: int) -> frozenset[Source]:
        """The events micro-batch ``batch_id`` has dead-lettered already: none on its first attempt
        (whose DLQ end offsets this records), those an earlier attempt wrote on a replay. Call it
        before the micro-batch writes a dead letter."""
        path = self.directory / f"{batch_id}.json"
        if path.exists():
            written = self._written_since(orjson.loads(path.read_bytes())["offsets"])
            log.info(
                "micro-batch %d is a replay: %d event(s) it already dead-lettered (stage %s) are not "
                "dead-lettered again",
                batch_id,
                len(written),
                self.stage,
            )
            return written
        if not self.directory.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.directory.parent)
        fence = {"topic": self.topic, "stage": self.stage, "offsets": self._ends(), "at": int(time.time() * 1000)}
        replace_atomically(path, orjson.dumps(fence))
        fsync_dir(self.directory)
        for old in self.directory.glob("*.json"):  # micro-batches before this one are committed
            if old.stem.isdigit() and int(old.stem) <= batch_id - self.keep:
                old.unlink(missing_ok=True)
        return frozenset()

    def _partitions(self) -> list[int]:
        """The DLQ's partitions, from the kept reader; none for a topic not created yet (the reader is
        then dropped, so the next micro-batch asks with fresh metadata)."""
        if self._offsets is None:
            self._offsets = KafkaOffsetReader(self.bootstrap, [self.topic], self.timeout_s, self.properties)
        try:
            partitions = sorted(self._offsets.consumer.partitions_for_topic(self.topic) or ())
        except Exception:
            self.close()
            raise
        if not partitions:
            self.close()
        return partitions

    def _ends(self) -> Offsets:
        """The DLQ's end offsets by ListOffsets (at most the true end); none for a topic not created yet."""
        partitions = self._partitions()
        if not partitions:
            return {}
        try:
            ends = self._offsets.consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        except Exception:  # a broken connection is not kept for the next micro-batch
            self.close()
            raise
        return {self.topic: {str(tp.partition): int(offset) for tp, offset in ends.items()}}

    def _written_since(self, fence: Offsets) -> frozenset[Source]:
        """The sources of this stage's records written since ``fence`` (the end: the high watermark)."""
        try:
            end = self._offsets.latest() if self._partitions() else {}
        except Exception:
            self.close()
            raise
        kafka = consumer(
            self.bootstrap, self.timeout_s, self.properties, auto_offset_reset="none", client_id="streamfit-dlq-fence"
        )
        written = set()
        try:
            for part in ranges(fence, end):
                for record in read_range(kafka, part, fail_on_data_loss=False, timeout_s=self.timeout_s):
                    written.add(source(record.value, self.stage))
        finally:
            kafka.close()
        return frozenset(written - {None})


def _local_path(checkpoint: str) -> Path:
    """A checkpoint given as a path or a ``file:`` URI; the fence keeps its files on the driver's disk."""
    url = urlparse(checkpoint)
    if url.scheme not in ("", "file"):
        raise ValueError(f"the dead-letter fence needs a local checkpoint directory, got {checkpoint!r}")
    return Path(url.path if url.scheme else checkpoint)
