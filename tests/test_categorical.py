"""Categorical features end to end: a user's spec file through ``streamfit models create``, the model
served over HTTP, and the inference consumer on real Spark and the real broker -- a category code is
one-hot encoded by the model, anything else is refused naming the feature (400 in serving, a dead letter
in the pipeline)."""

from __future__ import annotations

import itertools
import subprocess

import httpx
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
from serving.app import create_app
from tests.helpers import STREAMFIT
from tests.kafka_reader import read_topic
from tests.test_serving import LiveServer

SHOP = """\
# price and visits are numbers; zip is an index into 100 zip codes
feature_names: [price, visits, zip]
categorical: {zip: 100}
classes: [stays, leaves]
builder_args: {hidden: [32, 16]}
optimizer: {learning_rate: 0.05, momentum: 0.9}
"""


def test_a_spec_file_makes_a_model_whose_categorical_feature_serving_checks(tmp_path, cli_env):
    (tmp_path / "shop.yaml").write_text(SHOP)
    (tmp_path / "bad.json").write_text('{"feature_names": ["price"], "builder_args": {"hidden": [8, 0]}}')

    def streamfit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*STREAMFIT, "models", *args], env=cli_env, cwd=tmp_path, capture_output=True, text=True)

    created = streamfit("create", "shop", "--spec-file", "shop.yaml")
    assert created.returncode == 0 and "from spec file shop.yaml (3,864 parameters)" in created.stdout, created
    refused = streamfit("create", "other", "--spec-file", "bad.json")
    assert refused.returncode == 1 and "bad.json: not a valid model spec:" in refused.stderr, refused
    assert "builder_args.hidden.1: Input should be greater than 0" in refused.stderr, refused
    shown = streamfit("show", "shop").stdout
    assert "features (3): price, visits, zip (categorical, 100)" in shown and "other" not in streamfit("list").stdout

    settings = load_settings(home=cli_env["STREAMFIT_HOME"], model="shop", registry_poll_s=30)  # no Kafka needed
    registry = Registry(settings.registry_url)
    spec, (version, weights) = registry.spec("shop"), registry.weights("shop", "champion")
    assert spec.categorical == {"zip": 100} and weights["hidden_0/kernel"].shape == (102, 32)
    bundle = ModelBundle(spec)
    bundle.set_weights(weights)
    server = LiveServer(create_app(settings))
    try:
        with httpx.Client(base_url=server.url) as client:
            rows = [[19.5, 3, 0], [4.0, 1, 99], {"price": 7.25, "visits": 0, "zip": 42.0}]
            answer = client.post("/v1/models/shop:predict", json={"instances": rows})
            assert answer.status_code == 200 and answer.json()["model_version"] == version, answer.text
            x = np.array([[19.5, 3, 0], [4.0, 1, 99], [7.25, 0, 42]], np.float32)
            np.testing.assert_allclose(answer.json()["predictions"], bundle.predict_proba(x), atol=1e-6)
            for code in (100, -1, 2.5):
                answer = client.post("/v1/models/shop:predict", json={"instances": [[1.0, 1, 5], [1.0, 1, code]]})
                assert answer.status_code == 400, answer.text
                assert answer.json()["error"] == (
                    f"instances[1]: feature zip is {float(code)!r}, not one of its 100 category codes "
                    "(an integer 0..99)"
                )
    finally:
        server.stop()


def test_the_inference_consumer_dead_letters_codes_out_of_range_naming_the_feature(spark, kafka, topic, tmp_path):
    spec = BUILTIN_SPECS["stagger"]
    settings = load_settings(
        home=tmp_path,
        model="stagger",
        topic_events=topic,
        topic_dlq=topic + ".dlq",
        topic_predictions=topic + ".pred",
        kafka_source="python",
    )
    ensure_topics(kafka, {topic: 2, topic + ".dlq": 1, topic + ".pred": 2})
    registry = Registry(settings.registry_url)
    registry.create_model(spec)
    bundle = ModelBundle(spec, seed=5)
    registry.set_alias("stagger", "champion", registry.register("stagger", bundle.get_weights()))

    rows = list(itertools.islice(synthetic_rows("stagger", seed=4), 200))
    bad = {"size3": [3, 0, 0], "color1.5": [0, 1.5, 0], "shape-1": [0, 0, -1]}
    kafka_producer = producer(kafka)
    sender = Sender(kafka_producer, topic, topic + ".dlq")
    for message in synthetic_events(rows, "s"):
        sender.send(message)
    for event_id, features in bad.items():
        sender.send(Outgoing(event_id.encode(), orjson.dumps({"id": event_id, "ts": 1, "features": features})))
    assert sender.close().failed == 0
    kafka_producer.close()

    query = InferenceJob(spark, settings, kafka).start(
        str(tmp_path / "ck"), trigger={"availableNow": True}, starting_offsets="earliest"
    )
    assert query.awaitTermination(300) and query.exception() is None, query.exception()
    by_id = {p["id"]: p for p in map(orjson.loads, (r.value for r in read_topic(kafka, topic + ".pred", 200)))}
    assert sorted(by_id) == sorted(f"s-{i}" for i in range(200))
    expected = bundle.predict_proba(np.array([features for features, _ in rows], np.float32))
    np.testing.assert_allclose([by_id[f"s-{i}"]["probabilities"] for i in range(200)], expected, atol=1e-6)
    dead = {
        orjson.loads(record["raw"])["id"]: record
        for record in map(orjson.loads, (r.value for r in read_topic(kafka, topic + ".dlq", 3)))
    }
    assert {event_id: record["error"] for event_id, record in dead.items()} == {
        "size3": "feature size is 3, not one of its 3 category codes (an integer 0..2)",
        "color1.5": "feature color is 1.5, not one of its 3 category codes (an integer 0..2)",
        "shape-1": "feature shape is -1, not one of its 3 category codes (an integer 0..2)",
    }
    assert {record["stage"] for record in dead.values()} == {"predict"}
