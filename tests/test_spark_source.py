"""The Python Kafka data source on real local Spark against both real brokers."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time

import pytest
from kafka import KafkaAdminClient, TopicPartition
from pyspark.sql.streaming.datasource import ReadAllAvailable

from pipeline.kafka import consumer, ensure_topics, producer
from pipeline.spark.offsets import OffsetError, OffsetRange, ranges, read_range
from pipeline.spark.source import NAME, KafkaStreamReader
from producers.sender import Sender, synthetic_events
from producers.synthetic import synthetic_rows
from tests.kafka_reader import read_topic


def _produce(bootstrap: str, topic: str, n: int, prefix: str) -> list[bytes]:
    kafka = producer(bootstrap)
    sender = Sender(kafka, topic, topic)
    keys = []
    for message in synthetic_events(itertools.islice(synthetic_rows("sea", seed=len(prefix)), n), prefix):
        sender.send(message)
        keys.append(message.key)
    assert sender.close().acknowledged == n
    kafka.close()
    return keys


def _stream(spark, bootstrap, topic, checkpoint, **options):
    """Run an availableNow query collecting every micro-batch; returns (rows, per-batch row counts)."""
    reader = spark.readStream.format(NAME).option("kafka.bootstrap.servers", bootstrap).option("subscribe", topic)
    for key, value in options.items():
        reader = reader.option(key, str(value))
    rows, batches = [], []

    def collect(frame, batch_id):
        got = frame.collect()
        rows.extend(got)
        batches.append(len(got))

    query = (
        reader.load()
        .writeStream.foreachBatch(collect)
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination(300)
    if query.exception():
        raise RuntimeError(str(query.exception()))
    return rows, [b for b in batches if b]


@pytest.fixture
def loaded_topic(any_kafka, topic):
    ensure_topics(any_kafka, {topic: 3})
    return any_kafka, topic, _produce(any_kafka, topic, 3000, "a")


def test_batch_read_has_spark_kafka_columns_and_every_record(spark, loaded_topic):
    bootstrap, topic, keys = loaded_topic
    df = spark.read.format(NAME).option("kafka.bootstrap.servers", bootstrap).option("subscribe", topic).load()
    assert df.columns == ["key", "value", "topic", "partition", "offset", "timestamp", "timestampType"]
    rows = df.collect()
    assert sorted(bytes(r.key) for r in rows) == sorted(keys)
    assert {r.partition for r in rows} == {0, 1, 2} and {r.topic for r in rows} == {topic}
    assert all(json.loads(bytes(r.value))["id"] == bytes(r.key).decode() for r in rows[:50])


def test_min_partitions_splits_ranges_and_reads_each_record_once(spark, loaded_topic):
    bootstrap, topic, keys = loaded_topic
    df = (
        spark.read.format(NAME)
        .option("kafka.bootstrap.servers", bootstrap)
        .option("subscribe", topic)
        .option("minPartitions", 7)
        .load()
    )
    assert df.rdd.getNumPartitions() >= 7
    assert sorted(bytes(r.key) for r in df.collect()) == sorted(keys)


def test_max_offsets_per_trigger_and_restart_reads_only_new(spark, loaded_topic, tmp_path):
    bootstrap, topic, keys = loaded_topic
    rows, batches = _stream(
        spark, bootstrap, topic, tmp_path / "ck", startingOffsets="earliest", maxOffsetsPerTrigger=700
    )
    assert sorted(bytes(r.key) for r in rows) == sorted(keys)
    assert max(batches) <= 700 and sum(batches) == 3000 and len(batches) >= 5
    more = _produce(bootstrap, topic, 500, "bb")
    rows, batches = _stream(spark, bootstrap, topic, tmp_path / "ck", startingOffsets="earliest")
    assert sorted(bytes(r.key) for r in rows) == sorted(more), "a restarted query re-read old records"


def test_starting_offsets_latest_and_json(spark, any_kafka, topic, tmp_path):
    ensure_topics(any_kafka, {topic: 2})
    _produce(any_kafka, topic, 400, "old")
    # latest: the first trigger starts at the end, so only records produced after the query started count
    rows, _ = _stream(spark, any_kafka, topic, tmp_path / "latest", startingOffsets="latest")
    assert rows == []
    new = _produce(any_kafka, topic, 100, "new1")
    rows, _ = _stream(spark, any_kafka, topic, tmp_path / "latest", startingOffsets="latest")
    assert sorted(bytes(r.key) for r in rows) == sorted(new)
    # JSON: partition 0 from offset 150, partition 1 from the beginning (-2)
    spec = json.dumps({topic: {"0": 150, "1": -2}})
    rows, _ = _stream(spark, any_kafka, topic, tmp_path / "json", startingOffsets=spec)
    everything = read_topic(any_kafka, topic, expected=500)
    expected = sorted(r.key for r in everything if r.partition == 1 or r.offset >= 150)
    assert sorted(bytes(r.key) for r in rows) == expected


def test_bad_options_are_named(spark, kafka, topic):
    ensure_topics(kafka, {topic: 1})
    with pytest.raises(Exception, match="maxOffsetsPerTrigger"):
        _stream(spark, kafka, topic, "/tmp/unused-" + topic, maxOffsetsPerTrigger="many")
    with pytest.raises(Exception, match="startingOffsets"):
        spark.read.format(NAME).option("kafka.bootstrap.servers", kafka).option("subscribe", topic).option(
            "startingOffsets", "{oops"
        ).load().count()
    with pytest.raises(Exception, match="kafkaClient must be one of auto, confluent, kafka-python, got 'rdkafka'"):
        spark.createDataFrame([("v",)], "value string").write.format(NAME).option(
            "kafka.bootstrap.servers", kafka
        ).option("topic", topic).option("kafkaClient", "rdkafka").mode("append").save()


def test_stream_writer_acknowledges_every_row(spark, kafka, topic, tmp_path):
    ensure_topics(kafka, {topic: 3, topic + "-out": 3})
    keys = _produce(kafka, topic, 2000, "w")
    query = (
        spark.readStream.format(NAME)
        .option("kafka.bootstrap.servers", kafka)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .load()
        .selectExpr("key", "upper(cast(value as string)) as value")
        .writeStream.format(NAME)
        .option("kafka.bootstrap.servers", kafka)
        .option("topic", topic + "-out")
        .option("checkpointLocation", str(tmp_path / "w"))
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination(300)
    out = read_topic(kafka, topic + "-out", expected=2000)
    assert sorted(r.key for r in out) == sorted(keys)
    assert all(r.value.startswith(b'{"ID"') for r in out)


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_writer_honours_a_partition_column_and_keys_like_kafka(spark, kafka, topic, client):
    """An explicit partition wins; a null one leaves a keyed row where Kafka's murmur2 puts it, with both clients."""
    from kafka.partitioner.default import murmur2

    ensure_topics(kafka, {topic: 3})
    rows = [(f"k{i}", f"v{i}", i % 3 if i % 2 else None) for i in range(300)]
    (
        spark.createDataFrame(rows, "key string, value string, partition int")
        .write.format(NAME)
        .option("kafka.bootstrap.servers", kafka)
        .option("topic", topic)
        .option("kafkaClient", client)
        .mode("append")
        .save()
    )
    out = {r.key.decode(): r.partition for r in read_topic(kafka, topic, expected=300)}
    assert len(out) == 300
    assert all(out[f"k{i}"] == i % 3 for i in range(1, 300, 2))
    assert all(out[f"k{i}"] == (murmur2(f"k{i}".encode()) & 0x7FFFFFFF) % 3 for i in range(0, 300, 2))


def _delete_records(bootstrap: str, topic: str, before: int) -> None:
    """What retention does: the log of partition 0 now starts at ``before`` (noida-db supports DeleteRecords)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_records({TopicPartition(topic, 0): before})
    finally:
        admin.close()


def test_a_partition_behind_the_query_or_gone_keeps_the_query_offset(kafka, topic, caplog):
    """The broker reports less than the query read (restarted with less data) or a partition no more:
    the next batch ends where the query is, not below it, and each is logged once."""
    ensure_topics(kafka, {topic: 2})
    kafka_producer = producer(kafka)
    for i in range(40):
        kafka_producer.send(topic, value=b"%d" % i, partition=i % 2)
    kafka_producer.flush()
    kafka_producer.close()
    reader = KafkaStreamReader({"kafka.bootstrap.servers": kafka, "subscribe": topic})
    try:
        committed = {topic: {"0": 1000, "1": 5, "7": 55}}
        with caplog.at_level(logging.WARNING, logger="pipeline.spark.source"):
            end = reader.latestOffset(committed, ReadAllAvailable())
            again = reader.latestOffset(committed, ReadAllAvailable())
    finally:
        reader.stop()
    assert end == again == {topic: {"0": 1000, "1": 20, "7": 55}}
    assert [(r.partition, r.start, r.end) for r in ranges(committed, end)] == [(1, 5, 20)]
    # the source's own warnings: under load kafka-python also warns of a slow selector task
    warnings = [record.getMessage() for record in caplog.records if record.name == "pipeline.spark.source"]
    assert len(warnings) == 2, warnings  # once per partition, not once per trigger
    assert any(f"{topic}[0]: the broker reports end offset 20, below the query's offset 1000" in w for w in warnings)
    assert any(f"{topic}[7]: the broker reports no such partition" in w for w in warnings)


def test_read_range_names_offsets_lost_to_retention(kafka, topic, caplog):
    ensure_topics(kafka, {topic: 1})
    _produce(kafka, topic, 100, "r")
    _delete_records(kafka, topic, 30)
    reader = consumer(kafka, auto_offset_reset="none")
    try:
        with pytest.raises(OffsetError, match=rf"{topic}\[0\]: offsets 10..29 are gone \(the log now starts at 30"):
            list(read_range(reader, OffsetRange(topic, 0, 10, 60), fail_on_data_loss=True))
        with caplog.at_level(logging.WARNING, logger="pipeline.spark.offsets"):
            records = list(read_range(reader, OffsetRange(topic, 0, 10, 60), fail_on_data_loss=False))
    finally:
        reader.close()
    assert [r.offset for r in records] == list(range(30, 60))
    assert f"{topic}[0]: offsets 10..29 are gone" in caplog.text and "skipped (failOnDataLoss=false)" in caplog.text


@pytest.mark.parametrize("fail", [True, False], ids=["failOnDataLoss=true", "failOnDataLoss=false"])
def test_records_deleted_before_a_query_reads_them_fail_it_or_are_skipped(spark, kafka, topic, tmp_path, fail):
    ensure_topics(kafka, {topic: 1})
    _produce(kafka, topic, 100, "early")
    option = {"failOnDataLoss": str(fail).lower()}
    rows, _ = _stream(spark, kafka, topic, tmp_path / "ck", startingOffsets="earliest", **option)
    assert len(rows) == 100
    _produce(kafka, topic, 100, "later")  # offsets 100..199; retention then takes 100..149 before the query runs
    _delete_records(kafka, topic, 150)
    if fail:
        with pytest.raises(Exception, match=rf"{topic}\[0\]: offsets 100..149 are gone"):  # StreamingQueryException
            _stream(spark, kafka, topic, tmp_path / "ck", **option)
    else:
        rows, _ = _stream(spark, kafka, topic, tmp_path / "ck", **option)
        assert sorted(r.offset for r in rows) == list(range(150, 200))


def test_fail_on_data_loss_must_be_a_boolean(spark, kafka, topic):
    ensure_topics(kafka, {topic: 1})
    with pytest.raises(Exception, match="failOnDataLoss must be true or false, got 'maybe'"):
        spark.read.format(NAME).option("kafka.bootstrap.servers", kafka).option("subscribe", topic).option(
            "failOnDataLoss", "maybe"
        ).load().count()


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_a_worker_keeps_its_kafka_clients_across_tasks_and_drops_one_whose_task_failed(kafka, topic, client):
    """send_rows and the reader reuse the worker's client (no connect per task); a failed send closes it."""
    import pyarrow as pa

    from pipeline.spark import source

    ensure_topics(kafka, {topic: 1})
    writer = ("writer", kafka, ())  # role, cluster, Kafka client properties (none here)
    rows = pa.RecordBatch.from_pydict({"value": [b"a", b"b"]})
    assert source.send_rows(kafka, topic, iter([rows]), client).records == 2
    kind, first = source._clients[writer]
    assert kind == client
    assert source.send_rows(kafka, topic, iter([rows]), client).records == 2
    assert source._clients[writer][1] is first

    no_partition = pa.RecordBatch.from_pydict({"value": [b"c"], "partition": pa.array([7], pa.int32())})
    with pytest.raises(Exception, match="(?i)partition"):
        source.send_rows(kafka, topic, iter([no_partition]), client)
    assert writer not in source._clients and first._closed
    assert source.send_rows(kafka, topic, iter([rows]), client).records == 2
    second = source._clients[writer][1]
    assert second is not first
    assert [r.value for r in read_topic(kafka, topic, 6, timeout_s=30)] == [b"a", b"b"] * 3
    other = "kafka-python" if client == "confluent" else "confluent"  # one writer per worker: another kind replaces it
    assert source.send_rows(kafka, topic, iter([rows]), other).records == 2
    assert second._closed and source._clients[writer][0] == other


def _batch(spark, bootstrap: str, **options):
    reader = spark.read.format(NAME).option("kafka.bootstrap.servers", bootstrap)
    for key, value in options.items():
        reader = reader.option(key, str(value))
    return reader.load().collect()


def test_assign_subscribe_pattern_and_offsets_by_timestamp(spark, kafka, topic):
    other = topic + "-b"
    ensure_topics(kafka, {topic: 2, other: 1})
    kafka_producer = producer(kafka)
    at = int(time.time() * 1000) - 60_000  # recent: the broker's time retention drops records stamped long ago
    for i in range(10):  # partition 0 stamped at+0..9, partition 1 at+1000..1009
        kafka_producer.send(topic, value=b"p0-%d" % i, partition=0, timestamp_ms=at + i)
        kafka_producer.send(topic, value=b"p1-%d" % i, partition=1, timestamp_ms=at + 1000 + i)
        kafka_producer.send(other, value=b"b-%d" % i, partition=0, timestamp_ms=at + 2000 + i)
    kafka_producer.flush()
    kafka_producer.close()
    later = at + 86_400_000  # no record at or after it

    rows = _batch(spark, kafka, assign=json.dumps({topic: [1], other: [0]}))
    assert sorted(bytes(r.value) for r in rows) == sorted(
        [b"p1-%d" % i for i in range(10)] + [b"b-%d" % i for i in range(10)]
    )
    rows = _batch(spark, kafka, subscribePattern=re.escape(topic) + "(-b)?")
    assert len(rows) == 30 and {r.topic for r in rows} == {topic, other}
    rows = _batch(
        spark,
        kafka,
        subscribe=topic,
        startingOffsetsByTimestamp=json.dumps({topic: {"0": at + 5, "1": at + 1003}}),
        endingOffsetsByTimestamp=json.dumps({topic: {"0": at + 8, "1": later}}),  # none at or after: the end
    )
    assert sorted(bytes(r.value) for r in rows) == sorted(
        [b"p0-%d" % i for i in range(5, 8)] + [b"p1-%d" % i for i in range(3, 10)]
    )
    with pytest.raises(Exception, match=rf"startingOffsetsByTimestamp: .*\[1\] has no record at or after {later} ms"):
        _batch(spark, kafka, subscribe=topic, startingOffsetsByTimestamp=json.dumps({topic: {"0": at, "1": later}}))
    with pytest.raises(Exception, match="give exactly one of the options"):
        _batch(spark, kafka, subscribe=topic, assign=json.dumps({topic: [0]}))
    with pytest.raises(Exception, match="unknown option.*'startingtimestamp'"):
        _batch(spark, kafka, subscribe=topic, startingTimestamp=at)
    assert _batch(spark, kafka, assign=json.dumps({topic: [0]}), startingOffsets="latest") == []  # nothing to read


def test_headers_are_written_and_read_like_spark_s(spark, kafka, topic, tmp_path):
    ensure_topics(kafka, {topic: 1})
    header = "array<struct<key: string, value: binary>>"
    frame = spark.createDataFrame(
        [("a", [("trace", b"\x01"), ("empty", None)]), ("b", []), ("c", None)], f"value string, headers {header}"
    )
    frame.write.format(NAME).option("kafka.bootstrap.servers", kafka).option("topic", topic).mode("append").save()
    read = spark.read.format(NAME).option("kafka.bootstrap.servers", kafka).option("subscribe", topic)
    assert "headers" not in read.load().columns
    with_headers = read.option("includeHeaders", "true").load()
    assert with_headers.schema["headers"].dataType.simpleString() == "array<struct<key:string,value:binary>>"
    got = {
        bytes(r.value): [(h.key, None if h.value is None else bytes(h.value)) for h in r.headers]
        for r in with_headers.collect()
    }
    assert got == {b"a": [("trace", b"\x01"), ("empty", None)], b"b": [], b"c": []}
    rows, _ = _stream(spark, kafka, topic, tmp_path / "ck", startingOffsets="earliest", includeHeaders="true")
    assert sorted(len(r.headers) for r in rows) == [0, 0, 2]
