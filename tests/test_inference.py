"""The inference consumer on real local Spark, the real broker and a registered model."""

from __future__ import annotations

import itertools

import numpy as np
import orjson

from consumers.inference import InferenceJob
from pipeline.bundle import ModelBundle
from pipeline.kafka import ensure_topics, producer
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS
from producers.sender import Outgoing, Sender, synthetic_events
from producers.synthetic import synthetic_rows
from tests.kafka_reader import read_topic


def test_every_valid_event_predicted_every_invalid_dead_lettered(spark, kafka, topic, tmp_path):
    settings = load_settings(home=tmp_path, model="small", topic_events=topic, topic_dlq=topic + ".dlq",
                             topic_predictions=topic + ".pred", kafka_source="python")
    ensure_topics(kafka, {topic: 3, topic + ".dlq": 1, topic + ".pred": 3})
    registry = Registry(settings.registry_url)
    registry.create_model(BUILTIN_SPECS["small"])
    bundle = ModelBundle(BUILTIN_SPECS["small"], seed=3)
    registry.set_alias("small", "champion", registry.register("small", bundle.get_weights()))
    kafka_producer = producer(kafka)
    sender = Sender(kafka_producer, topic, topic)
    rows = list(itertools.islice(synthetic_rows("hyperplane", seed=2), 3000))
    for number, message in enumerate(synthetic_events(rows, "i")):
        sender.send(message)
        if number % 50 == 0:  # 2% invalid: wrong feature count
            sender.send(Outgoing(b"bad", orjson.dumps({"id": f"bad{number}", "ts": 1, "features": [1.0], "label": 0})))
    assert sender.close().failed == 0
    kafka_producer.close()
    job = InferenceJob(spark, settings, kafka)
    query = job.start(str(tmp_path / "ck"), trigger={"availableNow": True}, starting_offsets="earliest")
    query.awaitTermination(300)
    assert query.exception() is None
    predictions = {orjson.loads(r.value)["id"]: orjson.loads(r.value)
                   for r in read_topic(kafka, topic + ".pred", expected=3000)}
    assert len(predictions) == 3000
    dead = [orjson.loads(r.value) for r in read_topic(kafka, topic + ".dlq", expected=60)]
    assert len(dead) == 60 and all("expected 10 features, got 1" in d["error"] for d in dead)
    assert all(d["stage"] == "predict" and d["offset"] is not None for d in dead)
    x = np.array([features for features, _ in rows], dtype=np.float32)
    direct = bundle.predict_proba(x)
    served = np.array([predictions[f"i-{n}"]["probabilities"] for n in range(3000)])
    assert np.allclose(served, direct, atol=1e-5)
    assert {p["model_version"] for p in predictions.values()} == {1}
