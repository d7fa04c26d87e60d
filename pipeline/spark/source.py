"""Spark 4 Python Data Source ``streamfit-kafka``: Kafka reader (batch and streaming) and writer.

Used where Spark's JVM Kafka connector is not on the classpath (a pip-installed
pyspark). Same output columns and options as Spark's own Kafka source: ``kafka.bootstrap.servers``
and the ``kafka.*`` client properties of :mod:`pipeline.kafka_properties` (TLS, SASL, compression,
producer tuning); one of ``subscribe``, ``subscribePattern``, ``assign``; ``startingOffsets``,
``startingOffsetsByTimestamp``, ``endingOffsets`` and ``endingOffsetsByTimestamp`` (batch),
``maxOffsetsPerTrigger`` (streaming), ``minPartitions``, ``failOnDataLoss``, ``includeHeaders`` (a
``headers`` column); the writer takes ``topic`` (or a ``topic`` column), an optional ``headers``
column, and ``kafkaClient`` (``auto``, ``confluent``, ``kafka-python``: see
``pipeline.kafka.fast_producer``; auto writes with librdkafka, ~10x less CPU per record than
kafka-python). An option it does not understand is refused, naming it, rather than ignored.
Offsets live in Spark's checkpoint, so a restarted query reads only what it has
not read, and they never move backwards (see ``pipeline.spark.offsets``; a partition the broker
reports behind the query is logged at WARNING). ``failOnDataLoss``
(default true, as Spark's) decides whether records gone before they were read fail the
query or are logged at WARNING and skipped. The writer waits for every acknowledgement before
its task reports success, so a micro-batch only commits once its output is in Kafka
(at-least-once).

A Python worker keeps its Kafka reader and writer across tasks (Spark reuses workers, and its JVM
connector pools its clients the same way): a new kafka-python client costs ~8 ms of CPU to connect
and probe the broker, several per micro-batch. A client whose task failed is closed, not reused.

>>> spark.dataSource.register(KafkaDataSource)  # doctest: +SKIP
>>> spark.readStream.format("streamfit-kafka").option("kafka.bootstrap.servers", "127.0.0.1:9092") \\
...     .option("subscribe", "events").load()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import pyarrow as pa
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    DataSourceStreamArrowWriter,
    DataSourceStreamReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadLimit, ReadMaxRows, SupportsTriggerAvailableNow

from pipeline.events import ddl
from pipeline.kafka_properties import KafkaProperties, KafkaPropertyError, from_options
from pipeline.spark import worker_heap
from pipeline.spark.offsets import (
    KafkaOffsetReader,
    OffsetError,
    OffsetRange,
    Offsets,
    Subscription,
    behind,
    limit_end,
    ranges,
    read_range,
    split,
)

log = logging.getLogger(__name__)

NAME = "streamfit-kafka"
ARROW_SCHEMA = pa.schema(
    [
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("timestampType", pa.int32()),
    ]
)
HEADERS = pa.field("headers", pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())])))
"""Spark's Kafka ``headers`` column: array<struct<key: string, value: binary>>."""
SCHEMA = ddl(ARROW_SCHEMA)
HEADERS_SCHEMA = ARROW_SCHEMA.append(HEADERS)
ROWS_PER_BATCH = 2048
"""Rows per Arrow batch from the reader, and into the Python UDFs (Spark's maxRecordsPerBatch): small
enough that a micro-batch's first predictions leave while the rest is still read (a large first
micro-batch after start-up would otherwise answer nothing for seconds)."""


class KafkaRangePartition(InputPartition):
    def __init__(self, part: OffsetRange):
        super().__init__(part)
        self.part = part


READ = ("subscribe", "subscribePattern", "assign", "startingOffsets", "startingOffsetsByTimestamp")
READ += ("failOnDataLoss", "minPartitions", "includeHeaders")
OPTIONS = {
    "stream": (*READ, "maxOffsetsPerTrigger"),
    "batch": (*READ, "endingOffsets", "endingOffsetsByTimestamp"),
    "write": ("topic", "kafkaClient"),
}
"""The options each use understands, besides ``kafka.bootstrap.servers`` and the ``kafka.*`` properties."""
SPARK_OWN = ("path", "checkpointLocation")
"""Options Spark hands every source and sink along with the user's; they mean nothing here."""


class _Options:
    """The options of one use (``stream``, ``batch`` read, ``write``), checked once with errors that name
    the option; one this source does not understand is refused (Spark's option names are case-insensitive)."""

    def __init__(self, options: dict, use: str):
        given = {str(key).lower(): value for key, value in options.items()}
        known = {name.lower(): name for name in (*OPTIONS[use], *SPARK_OWN)}
        unknown = sorted(k for k in given if k not in known and not k.startswith("kafka."))
        if unknown:
            raise OffsetError(
                f"{NAME}: unknown option(s) {', '.join(repr(k) for k in unknown)} for "
                f"{'writing' if use == 'write' else use + ' reading'}; it understands kafka.bootstrap.servers, "
                f"kafka.<Kafka client property>, {', '.join(OPTIONS[use])}"
            )
        self.bootstrap = given.get("kafka.bootstrap.servers")
        if not self.bootstrap:
            raise OffsetError(f"{NAME}: option 'kafka.bootstrap.servers' is required")
        try:
            self.properties: KafkaProperties = from_options(given)
        except KafkaPropertyError as exc:
            raise OffsetError(f"{NAME}: option kafka.*: {exc}") from None
        self.options = {known[k]: v for k, v in given.items() if k in known}
        o = self.options
        self.subscription = (
            None if use == "write" else Subscription.of(o.get("subscribe"), o.get("subscribePattern"), o.get("assign"))
        )
        self.fail_on_data_loss = self._boolean("failOnDataLoss", "true")
        self.include_headers = self._boolean("includeHeaders", "false")
        max_rows = self.options.get("maxOffsetsPerTrigger")
        if max_rows is not None and (not str(max_rows).isdigit() or int(max_rows) < 1):
            raise OffsetError(f"{NAME}: maxOffsetsPerTrigger must be a positive integer, got {max_rows!r}")
        self.max_rows = int(max_rows) if max_rows else None
        min_parts = self.options.get("minPartitions", "1")
        if not str(min_parts).isdigit() or int(min_parts) < 1:
            raise OffsetError(f"{NAME}: minPartitions must be a positive integer, got {min_parts!r}")
        self.min_parts = int(min_parts)
        from pipeline.kafka import KAFKA_CLIENTS

        self.client = self.options.get("kafkaClient", "auto")
        if self.client not in KAFKA_CLIENTS:
            raise OffsetError(f"{NAME}: kafkaClient must be one of {', '.join(KAFKA_CLIENTS)}, got {self.client!r}")

    def _boolean(self, name: str, default: str) -> bool:
        value = str(self.options.get(name, default)).lower()
        if value not in ("true", "false"):
            raise OffsetError(f"{NAME}: {name} must be true or false, got {value!r}")
        return value == "true"

    def offset_reader(self) -> KafkaOffsetReader:
        assert self.subscription is not None, "a writer reads no offsets"
        return KafkaOffsetReader(self.bootstrap, self.subscription, properties=self.properties)

    def start(self, offsets: KafkaOffsetReader, default: str) -> Offsets:
        """Where reading starts: ``startingOffsetsByTimestamp`` if given (no record at or after a
        partition's time fails, as Spark's default strategy), else ``startingOffsets``."""
        by_time = self.options.get("startingOffsetsByTimestamp")
        if by_time is not None:
            return offsets.by_timestamp(by_time, "startingOffsetsByTimestamp", missing="error")
        return offsets.starting(self.options.get("startingOffsets", default))

    def end(self, offsets: KafkaOffsetReader) -> Offsets:
        """Where a batch read ends: ``endingOffsetsByTimestamp`` if given (no record at or after a partition's
        time: its end), else ``endingOffsets`` (``latest`` or JSON)."""
        by_time = self.options.get("endingOffsetsByTimestamp")
        if by_time is not None:
            return offsets.by_timestamp(by_time, "endingOffsetsByTimestamp", missing="latest")
        ending = self.options.get("endingOffsets", "latest")
        if ending == "earliest":
            raise OffsetError(f"{NAME}: endingOffsets cannot be earliest (as in Spark)")
        return offsets.latest() if ending == "latest" else offsets.starting(ending, "endingOffsets")


_clients: dict[tuple, tuple[str, object]] = {}
"""This Python worker's Kafka clients, by (role, bootstrap servers, properties), with their kind: kept from
task to task."""


@contextlib.contextmanager
def _client(
    role: str, bootstrap: str, properties: KafkaProperties, make: Callable[[], object], kind: str = ""
) -> Iterator:
    """The worker's ``role`` client for ``bootstrap`` and ``properties`` (made on first use, or again when
    another ``kind`` is asked for: one client per role); closed and forgotten if the work with it fails, so
    a broken connection or a half-sent batch never carries into the next task."""
    key = (role, bootstrap, tuple(sorted(properties.items())))
    made_as, client = _clients.pop(key, (kind, None))
    if client is not None and made_as != kind:
        client.close()
        client = None
    client = client or make()
    try:
        yield client
    except BaseException:
        client.close()
        raise
    _clients[key] = (kind, client)


def _read(options: _Options, part: OffsetRange) -> Iterator[pa.RecordBatch]:
    """Read one range as Arrow record batches (no per-row Python objects cross into Spark)."""
    worker_heap.freeze()
    from pipeline.kafka import consumer

    schema = HEADERS_SCHEMA if options.include_headers else ARROW_SCHEMA
    make = functools.partial(
        consumer,
        options.bootstrap,
        properties=options.properties,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        max_poll_records=ROWS_PER_BATCH,
        auto_offset_reset="none",
        client_id="streamfit-spark-reader",
    )
    with _client("reader", options.bootstrap, options.properties, make) as kafka:
        columns: list[list] = [[] for _ in schema]
        for record in read_range(kafka, part, options.fail_on_data_loss):
            for column, value in zip(
                columns,
                (
                    record.key,
                    record.value,
                    record.topic,
                    record.partition,
                    record.offset,
                    record.timestamp * 1000,
                    record.timestamp_type,
                ),
            ):
                column.append(value)
            if options.include_headers:
                columns[-1].append([{"key": k, "value": v} for k, v in record.headers or ()])
            if len(columns[0]) >= ROWS_PER_BATCH:
                yield pa.RecordBatch.from_arrays([pa.array(c, t.type) for c, t in zip(columns, schema)], schema=schema)
                columns = [[] for _ in schema]
        if columns[0]:
            yield pa.RecordBatch.from_arrays([pa.array(c, t.type) for c, t in zip(columns, schema)], schema=schema)


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    def __init__(self, options: dict):
        self.options = _Options(options, "stream")
        self._offsets: KafkaOffsetReader | None = None
        self._target: Offsets | None = None  # Trigger.AvailableNow: never read past what existed at start
        self._behind: dict[tuple[str, str], int | None] = {}  # partitions last logged as behind the query

    @property
    def offsets(self) -> KafkaOffsetReader:
        if self._offsets is None:
            self._offsets = self.options.offset_reader()
        return self._offsets

    def initialOffset(self) -> dict:
        return self.options.start(self.offsets, "latest")

    def getDefaultReadLimit(self) -> ReadLimit:
        return ReadMaxRows(self.options.max_rows) if self.options.max_rows else ReadAllAvailable()

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        max_rows = limit.max_rows if isinstance(limit, ReadMaxRows) else None  # ReadAllAvailable: no cap
        latest = self._target or self.offsets.latest()
        self._log_behind(start, latest)
        return limit_end(start, latest, max_rows)

    def _log_behind(self, start: Offsets, latest: Offsets) -> None:
        """A WARNING when a partition falls behind the query's offset (once, not every trigger)."""
        now = behind(start, latest)
        for (topic, partition), reported in now.items():
            if (topic, partition) not in self._behind or self._behind[(topic, partition)] != reported:
                log.warning(
                    "%s[%s]: the broker reports %s, below the query's offset %d (a broker restarted with "
                    "less data, a truncated log or a lagging leader): keeping %d, not rewinding; records "
                    "the broker writes below it will not be read",
                    topic,
                    partition,
                    "no such partition" if reported is None else f"end offset {reported}",
                    start[topic][partition],
                    start[topic][partition],
                )
        self._behind = now

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = self.offsets.latest()

    def reportLatestOffset(self) -> dict | None:
        return self.offsets.latest()

    def partitions(self, start: dict, end: dict) -> list[InputPartition]:
        return [KafkaRangePartition(part) for part in split(ranges(start, end), self.options.min_parts)]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        """The range's records; nothing for the placeholder partition Spark reads when there are no ranges."""
        return _read(self.options, partition.part) if isinstance(partition, KafkaRangePartition) else iter(())

    def stop(self) -> None:
        if self._offsets is not None:
            self._offsets.close()


class KafkaBatchReader(DataSourceReader):
    def __init__(self, options: dict):
        self.options = _Options(options, "batch")
        offsets = self.options.offset_reader()
        try:
            start: Offsets = self.options.start(offsets, "earliest")
            end: Offsets = self.options.end(offsets)
        finally:
            offsets.close()
        self.parts = split(ranges(start, end), self.options.min_parts)

    def partitions(self) -> list[InputPartition]:
        return [KafkaRangePartition(part) for part in self.parts]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        """The range's records; nothing for the placeholder partition Spark reads when there are no ranges."""
        return _read(self.options, partition.part) if isinstance(partition, KafkaRangePartition) else iter(())


class SentCount(WriterCommitMessage):
    def __init__(self, records: int):
        self.records = records


def send_rows(
    bootstrap: str,
    default_topic: str | None,
    iterator: Iterator[pa.RecordBatch],
    client: str = "auto",
    properties: KafkaProperties | None = None,
) -> SentCount:
    """Send every row (``value`` required; ``key``, ``partition``, ``headers`` and a ``topic`` column
    optional, as in Spark's Kafka sink); return only after the broker acknowledged all of them, so the
    task fails rather than loses rows. A null partition means Kafka's default partitioner (murmur2 of the
    key). ``client`` picks the Kafka client (``pipeline.kafka.fast_producer``), ``properties`` are the
    ``kafka.*`` client properties (TLS, compression, ...)."""
    from pipeline.kafka import fast_producer

    worker_heap.freeze()
    properties = properties or KafkaProperties()
    futures = []
    make = functools.partial(
        fast_producer, bootstrap, client=client, client_id="streamfit-spark-writer", properties=properties
    )
    with _client("writer", bootstrap, properties, make, client) as kafka:
        for batch in iterator:
            names = batch.schema.names
            if "value" not in names:
                raise OffsetError(f"{NAME} writer: the DataFrame needs a 'value' column, has {names}")
            values = batch.column("value").to_pylist()
            nothing = [None] * len(values)
            keys = batch.column("key").to_pylist() if "key" in names else nothing
            topics = batch.column("topic").to_pylist() if "topic" in names else [default_topic] * len(values)
            partitions = batch.column("partition").to_pylist() if "partition" in names else nothing
            headers = batch.column("headers").to_pylist() if "headers" in names else nothing
            for topic, key, value, partition, pairs in zip(topics, keys, values, partitions, headers):
                if topic is None:
                    raise OffsetError(f"{NAME} writer: no 'topic' option and no topic in the row")
                futures.append(
                    kafka.send(
                        topic,
                        key=_bytes(key),
                        value=_bytes(value),
                        partition=partition,
                        headers=[(h["key"], _bytes(h["value"])) for h in pairs] if pairs else None,
                    )
                )
        kafka.flush()
        for future in futures:
            future.get()
    return SentCount(len(futures))


class KafkaStreamWriter(DataSourceStreamArrowWriter):
    """Streaming sink; a micro-batch commits only after all its rows are acknowledged (at-least-once)."""

    def __init__(self, options: dict):
        self.options = _Options(options, "write")

    def write(self, iterator: Iterator[pa.RecordBatch]) -> SentCount:
        o = self.options
        return send_rows(o.bootstrap, o.options.get("topic"), iterator, o.client, o.properties)

    def commit(self, messages: list, batchId: int) -> None:
        """Nothing to do: every row was acknowledged before its task returned."""

    def abort(self, messages: list, batchId: int) -> None:
        """Kafka has no rollback; the replayed batch sends again (at-least-once)."""


class KafkaBatchWriter(DataSourceArrowWriter):
    """Batch sink (``df.write``), used from ``foreachBatch``; same guarantees as the stream writer."""

    def __init__(self, options: dict):
        self.options = _Options(options, "write")

    def write(self, iterator: Iterator[pa.RecordBatch]) -> SentCount:
        o = self.options
        return send_rows(o.bootstrap, o.options.get("topic"), iterator, o.client, o.properties)


def _bytes(value) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


class KafkaDataSource(DataSource):
    @classmethod
    def name(cls) -> str:
        return NAME

    def schema(self) -> str:
        """Spark's Kafka columns, with ``headers`` when ``includeHeaders`` is true."""
        include = str(self.options.get("includeHeaders", "false")).lower() == "true"
        return ddl(HEADERS_SCHEMA) if include else SCHEMA

    def reader(self, schema) -> KafkaBatchReader:
        return KafkaBatchReader(self.options)

    def streamReader(self, schema) -> KafkaStreamReader:
        return KafkaStreamReader(self.options)

    def writer(self, schema, overwrite: bool) -> KafkaBatchWriter:
        return KafkaBatchWriter(self.options)

    def streamWriter(self, schema, overwrite: bool) -> KafkaStreamWriter:
        return KafkaStreamWriter(self.options)
