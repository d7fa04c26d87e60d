"""Inference consumer throughput next to a dist-keras-style row-wise predictor and the compute limit.

``python -m bench.inference [--events N] [--rowwise-sample N]`` prints one JSON object, every figure
measured in the same run, on the default higgs model (~1.02 M parameters) and Spark ``local[2]``:

- ``events_per_s``: end to end, ``events`` -> acknowledged ``predictions`` through ``streamfit predict``'s
  job (Python Kafka source, validation, Arrow batch inference, acknowledged Kafka write);
- ``rowwise_events_per_s``: the same path with dist-keras' predictor (one ``model.predict`` per row
  inside ``mapPartitions``), on a sample;
- ``compute_limit_events_per_s``: the model's batch inference (numpy) of the same rows, no Kafka, no Spark.

``speedup_vs_rowwise`` (target >= 100) and ``efficiency`` = end-to-end / compute limit (target >= 0.3).
The Python workers are warmed on a small topic first (model loaded), as they are
in a consumer that has been running for a while.

``--cluster`` adds a ``cluster`` row: the same end-to-end run with ``--master spark://...`` on a Spark
standalone cluster of two one-core workers started here (:mod:`pipeline.spark.standalone`): executors
in their own JVMs, each with its own Python workers, the same two cores as ``local[2]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from pipeline.broker import EmbeddedBroker
from pipeline.kafka import ensure_topics, producer
from pipeline.settings import load_settings
from pipeline.spark.offsets import KafkaOffsetReader
from producers.sender import Sender, synthetic_events
from producers.synthetic import synthetic_rows

BATCH = 10_000  # rows per inference call, as spark.sql.execution.arrow.maxRecordsPerBatch


def produce(bootstrap: str, topic: str, n: int, seed: int) -> list[list[float]]:
    kafka = producer(bootstrap)
    sender = Sender(kafka, topic, topic + ".dlq")
    rows = list(itertools.islice(synthetic_rows("higgs", seed=seed), n))
    for message in synthetic_events(rows, f"{topic}-{seed}"):
        sender.send(message)
    summary = sender.close()
    kafka.close()
    assert summary.acknowledged == n, summary.as_dict()
    return [features for features, _ in rows]


def topic_size(bootstrap: str, topic: str) -> int:
    reader = KafkaOffsetReader(bootstrap, [topic])
    try:
        return sum(reader.latest()[topic].values())
    finally:
        reader.close()


def consumer_seconds(spark, settings, bootstrap: str, home: Path, tag: str) -> float:
    """Seconds for the consumer to answer all of ``topic_events`` once its Python workers are warm
    (three runs on the small ``warm`` topic: worker processes are pooled, and each may load the model)."""
    warm = settings.model_copy(update={"topic_events": "warm", "topic_predictions": "warm.pred"})
    for round_ in range(3):
        end_to_end(spark, warm, bootstrap, home / f"ck-{tag}-warm{round_}")
    elapsed = end_to_end(spark, settings, bootstrap, home / f"ck-{tag}")
    events, predicted = (topic_size(bootstrap, t) for t in (settings.topic_events, settings.topic_predictions))
    assert predicted == events, f"{predicted} predictions for {events} events"
    return elapsed


def on_cluster(settings, bootstrap: str, home: Path, events: int) -> dict:
    """The end-to-end run on a standalone cluster of two one-core workers (started and stopped here)."""
    from pipeline.spark.session import spark_session
    from pipeline.spark.standalone import StandaloneCluster

    with StandaloneCluster(workers=2, cores=1, memory="1g", directory=home / "standalone") as cluster:
        on = settings.model_copy(
            update={
                "spark_master": cluster.url,
                "spark_conf": cluster.app_conf,
                "topic_predictions": "predictions.cluster",
            }
        )
        spark = spark_session(on, "streamfit-bench-inference-cluster")
        try:
            elapsed = consumer_seconds(spark, on, bootstrap, home, "cluster")
        finally:
            spark.stop()
    return {
        "spark_master": "standalone: 2 workers x 1 core, executors of 1g",
        "elapsed_s": round(elapsed, 2),
        "events_per_s": round(events / elapsed),
    }


def end_to_end(spark, settings, bootstrap: str, checkpoint: Path) -> float:
    """Seconds for the inference job to turn everything in ``topic_events`` into acknowledged predictions."""
    from consumers.inference import InferenceJob

    job = InferenceJob(spark, settings, bootstrap)
    started = time.perf_counter()
    query = job.start(str(checkpoint), trigger={"availableNow": True}, starting_offsets="earliest")
    query.awaitTermination()
    elapsed = time.perf_counter() - started
    if query.exception():
        raise RuntimeError(str(query.exception()))
    return elapsed


_keras_models: dict[tuple, object] = {}  # per Python worker, so loading is not counted


def _rowwise_partition(rows, registry_url: str, model: str, version: int, out_topic: str):
    """dist-keras' ModelPredictor: the Keras model's ``model.predict`` on a one-row array, once per row."""
    from pipeline.registry import Registry

    key = (registry_url, model, version)
    if key not in _keras_models:
        _keras_models[key] = Registry(registry_url).load(model, version, engine="tensorflow").model
    keras_model = _keras_models[key]
    for row in rows:
        event = orjson.loads(row.value)
        probabilities = keras_model.predict(np.asarray([event["features"]], np.float32), verbose=0)[0].tolist()
        yield (
            out_topic,
            row.key,
            orjson.dumps(
                {
                    "id": event["id"],
                    "model": model,
                    "model_version": version,
                    "label": int(np.argmax(probabilities)),
                    "probabilities": probabilities,
                    "event_ts": event["ts"],
                    "predicted_at": int(time.time() * 1000),
                }
            ),
        )


def rowwise(spark, settings, bootstrap: str, topic: str, per_partition: int, out_topic: str) -> float:
    """Events/s of the row-wise predictor over the first ``per_partition`` events of each partition,
    read from Kafka and written back to Kafka."""
    from pipeline.spark.source import NAME

    ending = json.dumps({topic: {str(p): per_partition for p in range(settings.events_partitions)}})
    args = (settings.registry_url, settings.model, 1, out_topic)
    started = time.perf_counter()
    (
        spark.read.format(NAME)
        .option("kafka.bootstrap.servers", bootstrap)
        .option("subscribe", topic)
        .option("endingOffsets", ending)
        .load()
        .rdd.mapPartitions(lambda rows: _rowwise_partition(rows, *args))
        .toDF("topic string, key binary, value binary")
        .write.format(NAME)
        .option("kafka.bootstrap.servers", bootstrap)
        .mode("append")
        .save()
    )
    return per_partition * settings.events_partitions / (time.perf_counter() - started)


def compute_limit(registry_url: str, model: str, features: list[list[float]]) -> float:
    """Events/s of the bundle's batch inference alone, on the same rows, in this process."""
    from pipeline.registry import Registry

    bundle = Registry(registry_url).load(model, 1)
    x = np.asarray(features, np.float32)
    bundle.predict_proba(x[:BATCH])
    started = time.perf_counter()
    for start in range(0, len(x), BATCH):
        bundle.predict_proba(x[start : start + BATCH])
    return len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rowwise-sample", type=int, default=300)
    parser.add_argument("--impl", default="noida", choices=["noida", "tansu"])
    parser.add_argument("--cluster", action="store_true", help="also run the consumer on a standalone cluster")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pipeline.bundle import ModelBundle
    from pipeline.registry import Registry
    from pipeline.spark.session import spark_session
    from pipeline.spec import BUILTIN_SPECS

    with tempfile.TemporaryDirectory() as home, EmbeddedBroker(args.impl, data_dir=Path(home)) as broker:
        bootstrap = broker.bootstrap
        settings = load_settings(home=home, model="higgs", spark_master="local[2]", kafka_source="python")
        registry = Registry(settings.registry_url)
        registry.create_model(BUILTIN_SPECS["higgs"])
        bundle = ModelBundle(BUILTIN_SPECS["higgs"], seed=0)
        registry.set_alias("higgs", "champion", registry.register("higgs", bundle.get_weights()))
        n_parameters = bundle.n_parameters
        del bundle
        topics = {"warm": 3, "warm.pred": 3, "events": 3, "predictions": 3, "events.dlq": 1, "rowwise.pred": 3}
        ensure_topics(bootstrap, topics | ({"predictions.cluster": 3} if args.cluster else {}))
        produce(bootstrap, "warm", 5_000, seed=1)
        features = produce(bootstrap, "events", args.events, seed=2)

        spark = spark_session(settings, "streamfit-bench-inference")
        try:
            elapsed = consumer_seconds(spark, settings, bootstrap, Path(home), "local")
            per_partition = args.rowwise_sample // settings.events_partitions
            rowwise(spark, settings, bootstrap, "warm", 5, "rowwise.pred")  # load the Keras model in each worker
            rowwise_eps = rowwise(spark, settings, bootstrap, "events", per_partition, "rowwise.pred")
        finally:
            spark.stop()
        cluster = on_cluster(settings, bootstrap, Path(home), args.events) if args.cluster else None
        limit = compute_limit(settings.registry_url, "higgs", features)

    eps = args.events / elapsed
    print(
        json.dumps(
            {
                "benchmark": "inference",
                "broker": args.impl,
                "spark_master": settings.spark_master,
                "model_parameters": n_parameters,
                "events": args.events,
                "elapsed_s": round(elapsed, 2),
                "events_per_s": round(eps),
                "rowwise_events_per_s": round(rowwise_eps, 1),
                "rowwise_sample": args.rowwise_sample,
                "compute_limit_events_per_s": round(limit),
                "speedup_vs_rowwise": round(eps / rowwise_eps, 1),
                "target_speedup": 100,
                "efficiency": round(eps / limit, 3),
                "target_efficiency": 0.3,
                **(
                    {"cluster": {**cluster, "efficiency": round(cluster["events_per_s"] / limit, 3)}} if cluster else {}
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
