"""The dead-letter fence against the real embedded broker: a replayed micro-batch learns which of its
events an earlier attempt dead-lettered, and only those."""

from __future__ import annotations

import pytest

from pipeline.dlq import dead_letter
from pipeline.dlq_fence import DeadLetterFence, source
from pipeline.kafka import ensure_topics, producer


def _write(bootstrap: str, dlq: str, letters: list[tuple[str, int, int]], stage: str = "predict") -> None:
    """Dead letters of ``stage`` for events ``(topic, partition, offset)``, spread over the DLQ's partitions."""
    kafka = producer(bootstrap)
    for number, (topic, partition, offset) in enumerate(letters):
        kafka.send(dlq, dead_letter(stage, "broken", b"x", topic, partition, offset), partition=number % 2).get(30)
    kafka.close()


def test_a_replay_gets_what_its_earlier_attempts_wrote_and_nothing_else(any_kafka, topic, tmp_path):
    kafka = any_kafka  # tansu answers ListOffsets below the end: the fence must still see everything
    dlq = topic + ".dlq"
    ensure_topics(kafka, {dlq: 2})
    fence = DeadLetterFence(str(tmp_path), kafka, dlq, "predict")
    assert fence.enter(0) == frozenset()
    _write(kafka, dlq, [(topic, 0, 1), (topic, 1, 5)])  # micro-batch 0, committed
    assert fence.enter(1) == frozenset()
    _write(kafka, dlq, [(topic, 0, 7), (topic, 2, 9)])  # micro-batch 1's first attempt, not committed
    _write(kafka, dlq, [(topic, 0, 8)], stage="train")  # the other consumer: its own fence
    kafka_producer = producer(kafka)
    kafka_producer.send(dlq, b"not a dead letter", partition=0).get(30)  # someone else's garbage is no record
    kafka_producer.close()

    assert fence.enter(1) == {(topic, 0, 7), (topic, 2, 9)}
    _write(kafka, dlq, [(topic, 1, 3)])  # the replay dead-letters an event the first attempt had not reached
    assert DeadLetterFence(f"file://{tmp_path}", kafka, dlq, "predict").enter(1) == {  # a replay of the replay
        (topic, 0, 7),
        (topic, 2, 9),
        (topic, 1, 3),
    }
    assert DeadLetterFence(str(tmp_path), kafka, dlq, "train").enter(1) == {(topic, 0, 8)}


def test_only_the_last_fences_are_kept(kafka, topic, tmp_path):
    ensure_topics(kafka, {topic: 1})
    fence = DeadLetterFence(str(tmp_path), kafka, topic, "train", keep=3)
    for batch_id in range(8):
        fence.enter(batch_id)
    assert sorted(p.name for p in (tmp_path / "dlq-fence").iterdir()) == ["5.json", "6.json", "7.json"]


def test_a_dlq_topic_created_after_the_fence_is_read_from_its_start(kafka, topic, tmp_path):
    dlq = topic + ".dlq"
    fence = DeadLetterFence(str(tmp_path), kafka, dlq, "predict")
    assert fence.enter(4) == frozenset()  # no DLQ topic yet: nothing can have been written
    ensure_topics(kafka, {dlq: 2})
    _write(kafka, dlq, [(topic, 0, 3)])
    assert fence.enter(4) == {(topic, 0, 3)}


def test_a_checkpoint_the_driver_cannot_write_to_is_refused():
    with pytest.raises(ValueError, match="local checkpoint directory"):
        DeadLetterFence("s3a://bucket/ck", "127.0.0.1:9092", "events.dlq", "predict")


def test_source_names_the_event_of_a_record_of_the_stage():
    record = dead_letter("train", "broken", b"x", "events", 2, 41)
    assert source(record) == source(record, "train") == ("events", 2, 41)
    assert source(record, "predict") is None and source(b"[1, 2]") is None and source(b"\xff") is None
