"""The inference consumer on real local Spark, the real broker and registered models: every event
answered exactly once (prediction or dead letter), restarts from the checkpoint, promotions
mid-stream, and the per-batch progress it exports."""

from __future__ import annotations

import itertools
import time

import numpy as np
import orjson
import pytest

from consumers.inference import InferenceJob
from pipeline.bundle import ModelBundle
from pipeline.dlq import original_bytes
from pipeline.kafka import ensure_topics, producer
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS
from producers.sender import Outgoing, Sender, synthetic_events
from producers.synthetic import synthetic_rows
from tests.helpers import uncommit
from tests.kafka_reader import read_topic
from tests.waiting import wait_until

BAD = [  # (value, the reason the DLQ record must give)
    (orjson.dumps({"id": "x", "ts": 1, "features": [1.0], "label": 0}), "expected 10 features, got 1"),
    (b"\xff\x00 not json", "not valid JSON"),
    (orjson.dumps({"id": "x", "ts": 1, "features": [0.5] * 10, "label": 7}), "'label' must be null or an integer"),
    (orjson.dumps({"id": "x", "ts": 1, "features": ["a"] * 10, "label": None}), "is not a number"),
]


@pytest.fixture
def setup(kafka, topic, tmp_path):
    """Settings on fresh topics and a registered ``small`` model whose version 1 is champion."""
    settings = load_settings(
        home=tmp_path,
        model="small",
        topic_events=topic,
        topic_dlq=topic + ".dlq",
        topic_predictions=topic + ".pred",
        kafka_source="python",
    )
    ensure_topics(kafka, {topic: 3, topic + ".dlq": 1, topic + ".pred": 3})
    registry = Registry(settings.registry_url)
    registry.create_model(BUILTIN_SPECS["small"])
    bundle = ModelBundle(BUILTIN_SPECS["small"], seed=3)
    registry.set_alias("small", "champion", registry.register("small", bundle.get_weights()))
    return settings, registry, bundle


def _produce(bootstrap: str, topic: str, n: int, bad_every: int = 0) -> np.ndarray:
    """``n`` valid events ``i-0..i-{n-1}`` (plus one invalid one after every ``bad_every``); their features."""
    kafka = producer(bootstrap)
    sender = Sender(kafka, topic, topic)
    rows = list(itertools.islice(synthetic_rows("hyperplane", seed=2), n))
    for number, message in enumerate(synthetic_events(rows, "i")):
        sender.send(message)
        if bad_every and number % bad_every == 0:
            sender.send(Outgoing(f"bad{number}".encode(), BAD[number // bad_every % len(BAD)][0]))
    assert sender.close().failed == 0
    kafka.close()
    return np.array([features for features, _ in rows], dtype=np.float32)


def _run(job: InferenceJob, checkpoint, **trigger):
    return job.start(str(checkpoint), trigger=trigger or {"availableNow": True}, starting_offsets="earliest")


def _finish(query) -> None:
    assert query.awaitTermination(300), "the query did not finish in 5 minutes"
    assert query.exception() is None, query.exception()


def _predictions(kafka, topic: str, expected: int) -> list[dict]:
    return [orjson.loads(r.value) | {"_partition": r.partition} for r in read_topic(kafka, topic + ".pred", expected)]


def test_50k_events_one_prediction_per_valid_one_dead_letter_per_invalid(spark, kafka, topic, tmp_path, setup):
    settings, _, bundle = setup
    n, bad_every = 49_000, 49  # 1,000 invalid: 2% of 50,000
    x = _produce(kafka, topic, n, bad_every)
    events = {r.key: r for r in read_topic(kafka, topic, expected=50_000)}
    job = InferenceJob(spark, settings, kafka)
    _finish(_run(job, tmp_path / "ck"))

    predictions = _predictions(kafka, topic, n)
    by_id = {p["id"]: p for p in predictions}
    assert len(predictions) == len(by_id) == n, "not exactly one prediction per valid event"
    served = np.array([by_id[f"i-{i}"]["probabilities"] for i in range(n)])
    assert np.allclose(served, bundle.predict_proba(x), atol=1e-5)
    assert {p["model_version"] for p in predictions} == {1} and {p["model"] for p in predictions} == {"small"}
    assert all(p["label"] == int(np.argmax(p["probabilities"])) for p in predictions[:1000])
    assert all(p["_partition"] == events[p["id"].encode()].partition for p in predictions), "not co-partitioned"

    dead = [orjson.loads(r.value) for r in read_topic(kafka, topic + ".dlq", expected=1000)]
    assert len(dead) == 1000 and len({(d["partition"], d["offset"]) for d in dead}) == 1000
    by_offset = {(r.partition, r.offset): r for r in events.values()}
    for record in dead:
        original = by_offset[(record["partition"], record["offset"])]
        reason = next(reason for value, reason in BAD if value == original.value)
        assert record["stage"] == "predict" and record["topic"] == topic and reason in record["error"]

    metrics = job.reporter.metrics.registry
    assert metrics.get_sample_value("streamfit_predict_rows_total") == 50_000
    assert metrics.get_sample_value("streamfit_predict_model_version") == 1
    assert metrics.get_sample_value("streamfit_predict_lag_records") == 0  # measured against Kafka now
    assert metrics.get_sample_value("streamfit_predict_lag_seconds") == 0
    batches = len(job.versions)  # one entry per micro-batch the query ran; Spark reports each to the listener
    wait_until(lambda: metrics.get_sample_value("streamfit_predict_batch_duration_seconds_count") == batches > 0, 30)
    assert metrics.get_sample_value("streamfit_predict_batch_id") == max(job.versions)


def test_events_the_model_cannot_compute_are_dead_lettered_not_predicted_with_nulls(
    spark, kafka, topic, tmp_path, setup
):
    """The champion's f3 has std 1e-20: f3 = 1e20 is a valid float32 that overflows once standardised, and
    +-3e38 in the other features stays finite through the standardisation but not through the layers (signed
    like a hidden unit's kernel, it overflows that unit in any summation order)."""
    settings, registry, bundle = setup
    weights = bundle.get_weights()
    weights["standardise/std"][3] = 1e-20
    registry.set_alias("small", "champion", registry.register("small", weights))
    _produce(kafka, topic, 300)
    kernel = np.delete(weights["hidden_0/kernel"], 3, axis=0)
    unit = np.abs(kernel).sum(axis=0).argmax()
    assert 3e38 * float(np.abs(kernel[:, unit]).sum()) > 1.01 * float(np.finfo(np.float32).max)
    extreme = (3e38 * np.sign(kernel[:, unit])).tolist()
    hostile = {
        "overflow": [0.5, 0.5, 0.5, 1e20, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        "nan": extreme[:3] + [0.0] + extreme[3:],
    }
    kafka_producer = producer(kafka)
    sender = Sender(kafka_producer, topic, topic)
    for event_id, features in hostile.items():
        sender.send(
            Outgoing(event_id.encode(), orjson.dumps({"id": event_id, "ts": 1, "features": features, "label": None}))
        )
    assert sender.close().failed == 0
    kafka_producer.close()
    _finish(_run(InferenceJob(spark, settings, kafka), tmp_path / "ck"))

    predictions = _predictions(kafka, topic, 300)
    assert sorted(p["id"] for p in predictions) == sorted(f"i-{i}" for i in range(300))
    assert all(p["model_version"] == 2 and all(np.isfinite(p["probabilities"])) for p in predictions)
    dead = {
        orjson.loads(original_bytes(d))["id"]: d
        for d in map(orjson.loads, (r.value for r in read_topic(kafka, topic + ".dlq", expected=2)))
    }
    assert set(dead) == set(hostile) and {d["stage"] for d in dead.values()} == {"predict"}
    assert dead["overflow"]["error"].startswith("feature f3 = 1e+20 is inf after the model's standardisation (x - 0)")
    assert dead["nan"]["error"].startswith("the model's probabilities are not finite")


def test_restart_from_checkpoint_loses_nothing_duplicates_at_most_one_batch(spark, kafka, topic, tmp_path, setup):
    settings = setup[0].model_copy(update={"max_offsets_per_trigger": 1500})
    n = 12_000
    _produce(kafka, topic, n)
    job = InferenceJob(spark, settings, kafka)
    query = _run(job, tmp_path / "ck", processingTime="0 seconds")
    try:  # batches 0-2 committed, batch 3 under way
        wait_until(lambda: len(job.versions) >= 4, 180, interval_s=0.02, message="the query never got going")
    finally:
        query.stop()
    before = len(read_topic(kafka, topic + ".pred", expected=0, timeout_s=10))
    assert 3 * 1500 <= before < n, f"not stopped mid-stream ({before} predictions)"

    _finish(_run(InferenceJob(spark, settings, kafka), tmp_path / "ck"))
    ids = [p["id"] for p in _predictions(kafka, topic, n)]
    duplicates = len(ids) - len(set(ids))
    print(f"restart: {before} predictions before the stop, {duplicates} duplicates after the restart")
    assert set(ids) == {f"i-{i}" for i in range(n)}, "an event was lost across the restart"
    assert duplicates <= 1500, f"{duplicates} duplicates: more than the one interrupted micro-batch"


def test_a_replayed_micro_batch_predicts_again_but_does_not_dead_letter_again(spark, kafka, topic, tmp_path, setup):
    """A crash after the last micro-batch sent its output, before Spark committed it: the restarted
    query predicts that micro-batch again (at-least-once), but the dead-letter fence keeps it from
    dead-lettering its invalid events again."""
    settings = setup[0].model_copy(update={"max_offsets_per_trigger": 1500})
    _produce(kafka, topic, 2940, bad_every=49)  # and 60 invalid ones: 3,000 events, two micro-batches
    checkpoint = tmp_path / "ck"
    job = InferenceJob(spark, settings, kafka)
    _finish(_run(job, checkpoint))
    assert sorted(job.versions) == [0, 1]
    uncommit(checkpoint, 1)
    replay = InferenceJob(spark, settings, kafka)
    _finish(_run(replay, checkpoint))

    assert sorted(replay.versions) == [1], "micro-batch 1 was not replayed"
    ids = [p["id"] for p in _predictions(kafka, topic, 2941)]
    assert set(ids) == {f"i-{i}" for i in range(2940)} and len(ids) > 2940, "the replay did not predict again"
    dead = [orjson.loads(r.value) for r in read_topic(kafka, topic + ".dlq", expected=60)]
    assert len(dead) == len({(d["partition"], d["offset"]) for d in dead}) == 60, "an event dead-lettered twice"


def test_promotion_mid_stream_switches_versions_between_micro_batches(spark, kafka, topic, tmp_path, setup):
    settings, registry, _ = setup
    settings = settings.model_copy(update={"max_offsets_per_trigger": 1500})
    n = 12_000
    x = _produce(kafka, topic, n)
    offsets = {r.key.decode(): (r.partition, r.offset) for r in read_topic(kafka, topic, expected=n)}
    new = ModelBundle(BUILTIN_SPECS["small"], seed=11)
    job = InferenceJob(spark, settings, kafka)
    query = _run(job, tmp_path / "ck")
    while len(job.versions) < 2 and query.isActive:  # promote while batch 1 runs
        time.sleep(0.02)
    registry.set_alias("small", "champion", registry.register("small", new.get_weights()))
    _finish(query)

    versions = [job.versions[b] for b in sorted(job.versions)]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), versions
    batch_of = {}  # (partition, offset) -> batch id, from Spark's own progress reports
    for progress in query.recentProgress:
        source = progress["sources"][0]
        start = (orjson.loads(source["startOffset"] or "null") or {}).get(topic, {})  # batch 0: none
        end = orjson.loads(source["endOffset"])[topic]
        for partition, stop in end.items():
            for offset in range(start.get(partition, 0), stop):
                batch_of[(int(partition), offset)] = progress["batchId"]
    predictions = _predictions(kafka, topic, n)
    assert len(predictions) == n
    for p in predictions:
        assert p["model_version"] == job.versions[batch_of[offsets[p["id"]]]], "a micro-batch mixed versions"
    later = [p for p in predictions if p["model_version"] == 2]
    assert later, "the promoted version was never used"
    rows = [int(p["id"][2:]) for p in later]
    assert np.allclose([p["probabilities"] for p in later], new.predict_proba(x[rows]), atol=1e-5)


def test_a_warm_worker_is_reused_across_micro_batches_loading_the_model_once(spark, kafka, topic, tmp_path, setup):
    """Spark reuses Python workers, and a reused worker keeps its model and Kafka clients: after 6
    micro-batches, live workers still hold the model and their Kafka clients (loads counts every
    test's models: workers outlive tests in one Spark session), frozen out of the collection PySpark
    runs after each task (``worker_heap``). The predictions' writer is the client that setting
    ``kafka_client`` names (kafka-python here; auto would be librdkafka). The checkpoint is written
    by the plain local file system: no ``.crc`` files, no ``chmod`` process per file."""
    settings, _, _ = setup

    def worker_state(_):
        """In a Spark Python worker: its pid, how many models it loaded, the Kafka clients it keeps, and
        how many objects are frozen out of the collections."""
        import gc
        import os

        import pyarrow as pa

        from consumers import inference
        from pipeline.spark import source

        writers = [kind for (role, *_), (kind, _) in source._clients.items() if role == "writer"]
        yield pa.RecordBatch.from_pydict(
            {
                "pid": [os.getpid()],
                "loads": [inference.loads],
                "clients": [len(source._clients)],
                "writer": [",".join(writers)],
                "frozen": [gc.get_freeze_count()],
            }
        )

    _produce(kafka, topic, 3000)
    job = InferenceJob(
        spark, settings.model_copy(update={"max_offsets_per_trigger": 500, "kafka_client": "kafka-python"}), kafka
    )
    _finish(_run(job, tmp_path / "ck"))
    assert len(job.versions) == 6, job.versions
    assert (tmp_path / "ck" / "offsets" / "5").is_file()
    assert not list((tmp_path / "ck").rglob("*.crc")), sorted((tmp_path / "ck").rglob("*"))
    slots = spark.sparkContext.defaultParallelism
    states = (
        spark.range(4 * slots, numPartitions=4 * slots)
        .mapInArrow(worker_state, "pid long, loads long, clients long, writer string, frozen long")
        .collect()
    )
    warm = [s for s in states if s.loads]
    assert warm, f"no worker kept the model from the micro-batches: {states}"
    assert all(s.clients >= 1 for s in warm), states  # a reused worker keeps its Kafka client(s) too
    assert "kafka-python" in {s.writer for s in warm}, states
    assert all(s.frozen > 10_000 for s in warm), states  # imports, model and clients: not rescanned per task
