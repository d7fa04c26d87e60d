"""The inference consumer: a Spark streaming query from ``events`` to ``predictions``.

Per micro-batch the driver resolves the ``champion`` version once, so every row of a
micro-batch is predicted by the same version and a promotion shows from the next
micro-batch on. Python workers validate each event with the same validator as the
producer and serving (so reasons match everywhere), predict the valid rows of each
Arrow batch in one vectorised call, and emit either a prediction or a dead-letter
record (the ``topic`` column routes them). A valid event the model cannot compute --
a feature its standardisation takes past float32, or non-finite probabilities -- is
dead-lettered too, never answered with nulls. A worker loads a model version once and
keeps it while that version is champion.

With the Python Kafka source the same worker also sends its output and waits for the
acknowledgements (one Python hop fewer than a separate sink stage); with Spark's JVM
connector the output goes through ``format("kafka")``. Either way the micro-batch only
commits once every prediction and dead letter is in Kafka, so a micro-batch replayed after a
crash predicts again (at-least-once). Its dead letters are not written again: the driver enters
each micro-batch through a dead-letter fence (:mod:`pipeline.dlq_fence`), which tells a replay the
events an earlier attempt dead-lettered, and the workers skip those (exactly once per stage).
A prediction goes to the partition number of its event when both topics have as many partitions
(the event's key is its id, so that is where Kafka's default partitioner puts it too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import orjson
import pyarrow as pa

from pipeline.dlq import dead_letter
from pipeline.dlq_fence import DeadLetterFence, Source
from pipeline.events import (
    Event,
    FeatureSchema,
    Rejection,
    ddl,
    probability_problems,
    standardisation_problems,
    validate,
)
from pipeline.kafka_properties import java_options
from pipeline.settings import Settings
from pipeline.spark import worker_heap

log = logging.getLogger(__name__)

QUERY_NAME = "streamfit-inference"
TRIGGER_S = 0.5
"""Default seconds between inference micro-batches: an event waits for the next trigger, so half of this
is on every prediction's latency on average."""
OUTPUT_SCHEMA = pa.schema(
    [("topic", pa.string()), ("key", pa.binary()), ("value", pa.binary()), ("partition", pa.int32())]
)
OUTPUT_DDL = ddl(OUTPUT_SCHEMA)
SENT_SCHEMA = pa.schema([("records", pa.int64())])
SENT_DDL = ddl(SENT_SCHEMA)
_loaded: dict[tuple, object] = {}  # per Python worker: (registry, model, version) -> bundle
loads = 0
"""Model versions this Python worker has loaded: one per version while Spark keeps reusing it."""


def _bundle(registry_url: str, model: str, version: int):
    """The model version for this worker, loaded once; older versions are released."""
    key = (registry_url, model, version)
    if key not in _loaded:
        from pipeline.registry import Registry

        global loads
        loads += 1

        bundle = Registry(registry_url).load(model, version)
        bundle.warm()
        _loaded.clear()
        _loaded[key] = bundle
    return _loaded[key]


def predict_partition(
    batches: Iterator[pa.RecordBatch],
    registry_url: str,
    model: str,
    version: int,
    schema: FeatureSchema,
    predictions_topic: str,
    dlq_topic: str,
    copartitioned: bool,
    max_raw_bytes: int,
    dead_lettered: frozenset[Source] = frozenset(),
) -> Iterator[pa.RecordBatch]:
    """Validate and predict one partition's Arrow batches (runs in a Spark Python worker); an event
    in ``dead_lettered`` (an earlier attempt of this micro-batch wrote its dead letter) gets none."""
    worker_heap.freeze()
    bundle = _bundle(registry_url, model, version)
    mean, std = bundle.standardisation()
    for batch in batches:
        values = batch.column("value").to_pylist()
        topics, partitions, offsets = (batch.column(c).to_pylist() for c in ("topic", "partition", "offset"))
        valid, dead = [], []  # (row, event) and (row, reason)
        for row, raw in enumerate(values):
            verdict = validate(raw, schema)
            if isinstance(verdict, Rejection):
                dead.append((row, verdict.reason))
            else:
                valid.append((row, verdict))
        predicted = []  # (row, event, probabilities)
        if valid:
            x = np.asarray([event.features for _, event in valid], dtype=np.float32)
            problems = standardisation_problems(x, mean, std, schema.names)
            dead += [(row, problem) for (row, _), problem in zip(valid, problems) if problem is not None]
            computable = [k for k, problem in enumerate(problems) if problem is None]
            if computable:
                probabilities = bundle.predict_proba(x if len(computable) == len(valid) else x[computable])
                for k, probs, problem in zip(computable, probabilities.tolist(), probability_problems(probabilities)):
                    row, event = valid[k]
                    if problem is None:
                        predicted.append((row, event, probs))
                    else:
                        dead.append((row, problem))
        if dead_lettered:
            dead = [
                (row, reason)
                for row, reason in dead
                if (topics[row], partitions[row], offsets[row]) not in dead_lettered
            ]
        now = int(time.time() * 1000)
        out_topics = [dlq_topic] * len(dead) + [predictions_topic] * len(predicted)
        out_keys = [None] * len(dead) + [event.id.encode() for _, event, _ in predicted]
        out_values = [
            dead_letter("predict", reason, values[row], topics[row], partitions[row], offsets[row], max_raw_bytes)
            for row, reason in dead
        ] + [_prediction(event, model, version, probs, now) for _, event, probs in predicted]
        out_partitions = [None] * len(dead) + [partitions[row] if copartitioned else None for row, _, _ in predicted]
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(out_topics, pa.string()),
                pa.array(out_keys, pa.binary()),
                pa.array(out_values, pa.binary()),
                pa.array(out_partitions, pa.int32()),
            ],
            schema=OUTPUT_SCHEMA,
        )


def predict_and_send(
    batches: Iterator[pa.RecordBatch], bootstrap: str, client: str, properties, *args
) -> Iterator[pa.RecordBatch]:
    """``predict_partition`` whose output is sent (and acknowledged) from the same worker with Kafka
    client ``client`` (setting ``kafka_client``) and the ``kafka`` setting's ``properties``; yields the count."""
    from pipeline.spark.source import send_rows

    sent = send_rows(bootstrap, None, predict_partition(batches, *args), client, properties)
    yield pa.RecordBatch.from_pydict({"records": [sent.records]}, schema=SENT_SCHEMA)


def _prediction(event: Event, model: str, version: int, probabilities: list[float], now_ms: int) -> bytes:
    return orjson.dumps(
        {
            "id": event.id,
            "model": model,
            "model_version": version,
            "label": int(np.argmax(probabilities)),
            "probabilities": probabilities,
            "event_ts": event.ts,
            "predicted_at": now_ms,
        }
    )


class InferenceJob:
    """Builds and starts the streaming query. ``versions`` records the model version of every
    micro-batch; ``reporter`` logs and exports each batch's progress (``reporter.metrics``)."""

    def __init__(self, spark, settings: Settings, bootstrap: str):
        from pipeline.kafka import describe
        from pipeline.registry import Registry
        from pipeline.spark.lag import LAG_TIMEOUT_S
        from pipeline.spark.offsets import KafkaOffsetReader
        from pipeline.spark.progress import ProgressMetrics, ProgressReporter
        from pipeline.spark.session import kafka_format

        self.spark, self.settings, self.bootstrap = spark, settings, bootstrap
        self.registry = Registry(settings.registry_url)
        spec = self.registry.spec(settings.model)
        self.schema = FeatureSchema.of(spec, settings.max_event_bytes)
        self.format = kafka_format(spark, settings)
        topics = describe(bootstrap, settings.kafka_timeout_s, settings.kafka)
        self.copartitioned = topics.get(settings.topic_events) == topics.get(settings.topic_predictions)
        self.versions: dict[int, int] = {}
        self.fence: DeadLetterFence | None = None  # set by start(): it lives in the query's checkpoint
        metrics = ProgressMetrics(
            "streamfit_predict",
            lambda: KafkaOffsetReader(bootstrap, [settings.topic_events], LAG_TIMEOUT_S, settings.kafka),
        )
        self.reporter = ProgressReporter(QUERY_NAME, metrics, self.versions.get)
        spark.streams.addListener(self.reporter)

    def _process(self, frame, batch_id: int) -> None:
        from pipeline.spark.source import NAME as PYTHON_SOURCE

        version = self.registry.resolve(self.settings.model, "champion")
        if version != (self.versions[max(self.versions)] if self.versions else None):
            log.info("micro-batch %d: predicting with %s version %d", batch_id, self.settings.model, version)
        self.versions[batch_id] = version
        s = self.settings
        args = (
            self.registry.url,  # absolute: executors run in their own working directories
            s.model,
            version,
            self.schema,
            s.topic_predictions,
            s.topic_dlq,
            self.copartitioned,
            s.dlq_max_raw_bytes,
            self.fence.enter(batch_id),
        )
        events = frame.select("value", "topic", "partition", "offset")
        if self.format == PYTHON_SOURCE:
            bootstrap, client, kafka = self.bootstrap, s.kafka_client, s.kafka
            events.mapInArrow(
                lambda batches: predict_and_send(batches, bootstrap, client, kafka, *args), SENT_DDL
            ).collect()
        else:
            (
                events.mapInArrow(lambda batches: predict_partition(batches, *args), OUTPUT_DDL)
                .write.format(self.format)
                .option("kafka.bootstrap.servers", self.bootstrap)
                .options(**java_options(s.kafka))
                .mode("append")
                .save()
            )

    def start(self, checkpoint: str, trigger: dict | None = None, starting_offsets: str | None = None):
        from pipeline.spark.session import events_stream, every

        s = self.settings
        min_partitions = s.spark_min_partitions or self.spark.sparkContext.defaultParallelism
        writer = (
            events_stream(self.spark, s, self.bootstrap, starting_offsets, min_partitions)
            .writeStream.queryName(QUERY_NAME)
            .foreachBatch(self._process)
            .option("checkpointLocation", checkpoint)
        )
        writer = writer.trigger(**(trigger or every(s, TRIGGER_S)))
        if self.fence is not None:  # a restarted query gets a new fence
            self.fence.close()
        self.fence = DeadLetterFence(
            checkpoint, self.bootstrap, s.topic_dlq, "predict", timeout_s=s.kafka_timeout_s, properties=s.kafka
        )
        query = writer.start()
        self.reporter.query_id = str(query.id)
        return query
