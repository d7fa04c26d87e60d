"""A Keras model imported with its own feature names is trained, predicted and served like a built-in one:
every algorithm trains it through a real parameter server; both Spark consumers (training's prequential
scoring, inference) predict it from a real broker; serving answers it over HTTP and hot-swaps its versions."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest

keras = pytest.importorskip("keras")

from consumers.inference import InferenceJob  # noqa: E402
from consumers.training import TrainingJob  # noqa: E402
from pipeline.bundle import ModelBundle  # noqa: E402
from pipeline.kafka import ensure_topics, producer  # noqa: E402
from pipeline.keras_import import import_keras  # noqa: E402
from pipeline.model_updates import announcing_registry  # noqa: E402
from pipeline.ps.algorithms import ALGORITHMS, from_settings  # noqa: E402
from pipeline.ps.server import CenterState, ParameterServer  # noqa: E402
from pipeline.publishing import CandidatePublisher  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.training import TrainingPlan, train_rows  # noqa: E402
from producers.sender import Outgoing, Sender  # noqa: E402
from serving.app import create_app  # noqa: E402
from tests.kafka_reader import read_topic  # noqa: E402
from tests.test_serving import LiveServer  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

FEATURES = ["temperature", "pressure", "humidity", "wind", "rain", "cloud"]


def rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features around (20, 1000, ...) -- far from standardised -- and a label linear in them."""
    rng = np.random.default_rng(seed)
    x = rng.normal([20, 1000, 50, 5, 2, 40], [5, 10, 20, 3, 1, 30], size=(n, len(FEATURES))).astype(np.float32)
    return x, ((x[:, 0] - 20) / 5 + (x[:, 1] - 1000) / 10 - (x[:, 2] - 50) / 20 > 0).astype(np.int64)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A user's Keras classifier, its Normalization adapted to their data, untrained otherwise; imported.
    Its initial weights are seeded: the training tests' accuracies must not depend on the draw."""
    keras.utils.set_random_seed(11)
    normalization = keras.layers.Normalization()
    normalization.adapt(rows(2000, seed=9)[0])
    model = keras.Sequential(
        [
            keras.Input((len(FEATURES),)),
            normalization,
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    path = tmp_path_factory.mktemp("keras") / "weather.keras"
    model.save(path)
    return import_keras(path, "weather", feature_names=FEATURES, classes=["dry", "storm"])


def accuracy(spec, weights, x, y) -> float:
    bundle = ModelBundle(spec)
    bundle.set_weights(weights)
    return float(np.mean(bundle.predict_proba(x).argmax(axis=1) == y))


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_the_imported_model_through_the_parameter_server(imported, algorithm):
    spec, weights = imported
    x, y = rows(1200, seed=1)
    params = {"workers": 1} if algorithm == "sync" else {}
    plan = TrainingPlan.create(
        spec, algorithm=algorithm, addresses=[], learning_rate=0.1, batch_size=32, epochs=3, algorithm_params=params
    )
    state = CenterState(weights, plan.algorithm().rule())
    with ParameterServer(state) as server:
        report = train_rows(plan.model_copy(update={"addresses": [server.address]}), x, y, worker_id=0)
    assert report.commits >= state.counter > 0
    center = dict(state.pull(worker_id=0)[0])  # what worker 0 trains from next: an ensemble's own member
    assert list(center) == list(spec.weight_shapes)
    np.testing.assert_array_equal(center["standardise/mean"], weights["standardise/mean"])  # never trained
    x_test, y_test = rows(600, seed=2)
    assert accuracy(spec, center, x_test, y_test) >= max(0.8, accuracy(spec, weights, x_test, y_test) + 0.1)


def produce(bootstrap: str, topic: str, x: np.ndarray, y: np.ndarray) -> None:
    """Events whose features are objects keyed by the imported model's own feature names."""
    kafka = producer(bootstrap)
    sender = Sender(kafka, topic, topic + ".dlq")
    for i, (features, label) in enumerate(zip(x, y)):
        event = {"id": f"w{i}", "ts": 1, "features": dict(zip(FEATURES, map(float, features))), "label": int(label)}
        sender.send(Outgoing(f"w{i}".encode(), orjson.dumps(event)))
    assert sender.close().failed == 0
    kafka.close()


def test_imported_model_streams_through_training_inference_and_serving(imported, spark, kafka, topic, tmp_path):
    spec, weights = imported
    ensure_topics(kafka, {topic: 2, topic + ".dlq": 1, topic + ".pred": 2, topic + ".metrics": 1, topic + ".mu": 1})
    settings = load_settings(
        home=tmp_path,
        model="weather",
        kafka_bootstrap=kafka,
        topic_events=topic,
        topic_dlq=topic + ".dlq",
        topic_predictions=topic + ".pred",
        topic_training_metrics=topic + ".metrics",
        topic_model_updates=topic + ".mu",
        kafka_source="python",
        algorithm="adag",
        workers=2,
        batch_size=32,
        registry_poll_s=30,
    )
    registry, announcer = announcing_registry(settings)
    registry.create_model(spec)
    registry.set_alias("weather", "champion", registry.register("weather", weights, algorithm="import"))
    x, y = rows(3000, seed=3)
    produce(kafka, topic, x, y)

    # training: the Spark training consumer scores each micro-batch, then trains through the parameter server
    state = CenterState(weights, from_settings(settings).rule())
    publisher = CandidatePublisher(registry, "weather", algorithm="adag", keep=10)
    with ParameterServer(state, on_publish=publisher, publish_every_updates=5, publish_every_s=3600) as server:
        job = TrainingJob(spark, settings.model_copy(update={"ps_port": server.address[1]}), kafka, registry)
        query = job.start(str(tmp_path / "train"), trigger={"availableNow": True}, starting_offsets="earliest")
        query.awaitTermination(300)
        job.close()
        assert query.exception() is None, query.exception()
    history = list(job.history)
    assert sum(r["trained_rows"] for r in history) == 3000 and state.counter > 0
    assert sum(r["rows"] for r in history if "accuracy" in r) == 3000  # each scored before it trained
    candidate = wait_until(lambda: registry.aliases("weather").get("candidate"), 30)  # published while training
    assert registry.spec("weather") == spec and set(registry.weights("weather", candidate)[1]) == set(weights)

    # inference: the Spark inference consumer predicts with the champion (the imported version 1)
    inference = InferenceJob(spark, settings, kafka)
    predicting = inference.start(str(tmp_path / "predict"), trigger={"availableNow": True}, starting_offsets="earliest")
    assert predicting.awaitTermination(300) and predicting.exception() is None
    predictions = {p["id"]: p for p in map(orjson.loads, (r.value for r in read_topic(kafka, topic + ".pred", 3000)))}
    assert len(predictions) == 3000 and {p["model_version"] for p in predictions.values()} == {1}
    served = np.array([predictions[f"w{i}"]["probabilities"] for i in range(3000)])
    np.testing.assert_allclose(served, registry.load("weather", 1).predict_proba(x), rtol=1e-5, atol=1e-6)

    # serving: answers by feature name, then hot-swaps to the trained version when it is promoted
    serving = LiveServer(create_app(settings))
    try:
        body = {"instances": [dict(zip(FEATURES, map(float, row))) for row in x[:5]]}
        with httpx.Client(base_url=serving.url) as client:
            first = client.post("/v1/models/weather:predict", json=body).json()
            assert first["model_version"] == 1
            np.testing.assert_allclose(first["predictions"], served[:5], rtol=1e-5, atol=1e-6)
            registry.promote("weather", candidate)
            answer = wait_until(
                lambda: (
                    (a := client.post("/v1/models/weather:predict", json=body).json())["model_version"] == candidate
                    and a
                ),
                60,
            )
        expected = registry.load("weather", "models:/weather@champion").predict_proba(x[:5])
        np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(expected, served[:5])  # the trained version answers differently
    finally:
        serving.stop()
        announcer.close()
