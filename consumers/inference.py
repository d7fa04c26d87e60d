"""The inference consumer: a Spark streaming query from ``events`` to ``predictions``.

Per micro-batch the driver resolves the ``champion`` version once, so every row of a
micro-batch is predicted by the same version and a promotion shows from the next
micro-batch on. Python workers validate each event with the same validator as the
producer and serving (so reasons match everywhere), predict the valid rows of each
Arrow batch in one vectorised call, and emit either a prediction or a dead-letter
record; one Kafka write sends both (the ``topic`` column routes them). A worker loads
a model version once and keeps it while that version is champion.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import orjson
import pyarrow as pa

from pipeline.dlq import dead_letter
from pipeline.events import Event, FeatureSchema, Rejection, validate
from pipeline.settings import Settings

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema([("topic", pa.string()), ("key", pa.binary()), ("value", pa.binary())])
OUTPUT_DDL = "topic string, key binary, value binary"
_loaded: dict[tuple, object] = {}  # per Python worker: (registry, model, version) -> bundle


def _bundle(registry_url: str, model: str, version: int):
    """The model version for this worker, loaded once; older versions are released."""
    key = (registry_url, model, version)
    if key not in _loaded:
        from pipeline.registry import Registry

        bundle = Registry(registry_url).load(model, version)
        bundle.warm()
        _loaded.clear()
        _loaded[key] = bundle
    return _loaded[key]


def predict_partition(batches: Iterator[pa.RecordBatch], registry_url: str, model: str, version: int,
                      schema: FeatureSchema, predictions_topic: str, dlq_topic: str) -> Iterator[pa.RecordBatch]:
    """Validate and predict one partition's Arrow batches (runs in a Spark Python worker)."""
    bundle = _bundle(registry_url, model, version)
    for batch in batches:
        values = batch.column("value").to_pylist()
        topics, partitions, offsets = (batch.column(c).to_pylist() for c in ("topic", "partition", "offset"))
        out_topics, out_keys, out_values, valid = [], [], [], []
        for raw, topic, partition, offset in zip(values, topics, partitions, offsets):
            verdict = validate(raw, schema)
            if isinstance(verdict, Rejection):
                out_topics.append(dlq_topic)
                out_keys.append(None)
                out_values.append(dead_letter("predict", verdict.reason, raw, topic, partition, offset))
            else:
                valid.append(verdict)
        if valid:
            probabilities = bundle.predict_proba(np.asarray([e.features for e in valid], dtype=np.float32))
            now = int(time.time() * 1000)
            for event, probs in zip(valid, probabilities.tolist()):
                out_topics.append(predictions_topic)
                out_keys.append(event.id.encode())
                out_values.append(_prediction(event, model, version, probs, now))
        yield pa.RecordBatch.from_arrays([pa.array(out_topics, pa.string()), pa.array(out_keys, pa.binary()),
                                          pa.array(out_values, pa.binary())], schema=OUTPUT_SCHEMA)


def _prediction(event: Event, model: str, version: int, probabilities: list[float], now_ms: int) -> bytes:
    return orjson.dumps({"id": event.id, "model": model, "model_version": version,
                         "label": int(np.argmax(probabilities)), "probabilities": probabilities,
                         "event_ts": event.ts, "predicted_at": now_ms})


class InferenceJob:
    """Builds and starts the streaming query; ``versions`` records the version used per micro-batch."""

    def __init__(self, spark, settings: Settings, bootstrap: str):
        from pipeline.registry import Registry
        from pipeline.spark.session import kafka_format

        self.spark, self.settings, self.bootstrap = spark, settings, bootstrap
        self.registry = Registry(settings.registry_url)
        spec = self.registry.spec(settings.model)
        self.schema = FeatureSchema(tuple(spec.feature_names), spec.n_classes, settings.max_event_bytes)
        self.format = kafka_format(spark, settings)
        self.versions: dict[int, int] = {}

    def _process(self, frame, batch_id: int) -> None:
        version = self.registry.resolve(self.settings.model, "champion")
        if version != (self.versions[max(self.versions)] if self.versions else None):
            log.info("micro-batch %d: predicting with %s version %d", batch_id, self.settings.model, version)
        self.versions[batch_id] = version
        s = self.settings
        args = (s.registry_url, s.model, version, self.schema, s.topic_predictions, s.topic_dlq)
        output = frame.select("value", "topic", "partition", "offset").mapInArrow(
            lambda batches: predict_partition(batches, *args), OUTPUT_DDL)
        (output.write.format(self.format).option("kafka.bootstrap.servers", self.bootstrap).mode("append").save())

    def start(self, checkpoint: str, trigger: dict | None = None, starting_offsets: str | None = None):
        s = self.settings
        reader = (self.spark.readStream.format(self.format).option("kafka.bootstrap.servers", self.bootstrap)
                  .option("subscribe", s.topic_events)
                  .option("startingOffsets", starting_offsets or s.starting_offsets)
                  .option("failOnDataLoss", "false"))
        if s.max_offsets_per_trigger:
            reader = reader.option("maxOffsetsPerTrigger", str(s.max_offsets_per_trigger))
        writer = (reader.load().writeStream.queryName("streamfit-inference").foreachBatch(self._process)
                  .option("checkpointLocation", checkpoint))
        writer = writer.trigger(**(trigger or {"processingTime": f"{s.trigger_interval_s} seconds"}))
        return writer.start()


def progress_line(progress: dict, version: int | None) -> str:
    """One log line per micro-batch: rows, rows/s, duration, lag behind the latest offsets, version."""
    lag = 0
    for source in progress.get("sources", []):
        end, latest = _offsets(source.get("endOffset")), _offsets(source.get("latestOffset"))
        lag += sum(max(0, latest.get(k, 0) - end.get(k, 0)) for k in latest)
    return (f"batch {progress['batchId']}: rows={progress['numInputRows']} "
            f"rows/s={progress.get('processedRowsPerSecond', 0):.0f} "
            f"duration_ms={progress.get('durationMs', {}).get('triggerExecution', 0)} lag={lag} version={version}")


def _offsets(value) -> dict:
    if not value:
        return {}
    doc = json.loads(value) if isinstance(value, str) else value
    return {(t, p): o for t, parts in doc.items() if isinstance(parts, dict) for p, o in parts.items()}
