"""A Keras model imported with its own feature names is trained, predicted and served like a built-in one:
every algorithm trains it through a real parameter server; both Spark consumers (training's prequential
scoring, inference) predict it from a real broker; serving answers it over HTTP and hot-swaps its versions."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pipeline.bundle import ModelBundle  # noqa: E402
from pipeline.keras_import import import_keras  # noqa: E402
from pipeline.ps.algorithms import ALGORITHMS  # noqa: E402
from pipeline.ps.server import CenterState, ParameterServer  # noqa: E402
from pipeline.training import TrainingPlan, train_rows  # noqa: E402

FEATURES = ["temperature", "pressure", "humidity", "wind", "rain", "cloud"]


def rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features around (20, 1000, ...) -- far from standardised -- and a label linear in them."""
    rng = np.random.default_rng(seed)
    x = rng.normal([20, 1000, 50, 5, 2, 40], [5, 10, 20, 3, 1, 30], size=(n, len(FEATURES))).astype(np.float32)
    return x, ((x[:, 0] - 20) / 5 + (x[:, 1] - 1000) / 10 - (x[:, 2] - 50) / 20 > 0).astype(np.int64)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A user's Keras classifier, its Normalization adapted to their data, untrained otherwise; imported."""
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
    assert accuracy(spec, center, x_test, y_test) >= max(0.85, accuracy(spec, weights, x_test, y_test) + 0.1)
