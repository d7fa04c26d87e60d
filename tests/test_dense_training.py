"""Training in numpy (pipeline/dense.py): backpropagation against central differences in float64,
SGD steps against Keras's ``train_on_batch`` (plain, momentum, Nesterov, sample weights, momentum kept
across ``set_weights``), and dropout's statistics (its random stream cannot be Keras's)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bundle import ModelBundle, fit_standardisation, standardisation_weights
from pipeline.dense import DenseEngine
from pipeline.spec import ModelSpec, OptimizerSpec

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def spec_of(hidden=(16, 8), features=6, classes=3, dropout=0.0, **optimizer) -> ModelSpec:
    return ModelSpec(
        name="t",
        feature_names=[f"x{i}" for i in range(features)],
        classes=list(range(classes)),
        builder_args={"hidden": list(hidden), "dropout": dropout},
        optimizer=OptimizerSpec(**optimizer),
    )


def batch(spec: ModelSpec, rng: np.random.Generator, n: int = 64, dtype=np.float32):
    x = (rng.normal(size=(n, spec.n_features)) * 3 + 2).astype(dtype)
    return x, rng.integers(0, spec.n_classes, n), rng.uniform(0, 2, n).astype(dtype) * (rng.random(n) > 0.2)


def trained_vector(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([w.ravel() for name, w in weights.items() if not name.startswith("standardise/")])


def with_trained(weights: dict[str, np.ndarray], vector: np.ndarray) -> dict[str, np.ndarray]:
    """``weights`` with the trained tensors taken from ``vector`` (in the weights' order)."""
    out, start = dict(weights), 0
    for name, w in weights.items():
        if not name.startswith("standardise/"):
            out[name], start = vector[start : start + w.size].reshape(w.shape), start + w.size
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_backpropagation_matches_central_differences_in_float64(dropout):
    rng = np.random.default_rng(0)
    spec = spec_of(hidden=(7, 5), features=4, classes=3, dropout=dropout)
    engine = DenseEngine(spec, dtype=np.float64)
    weights = {name: rng.normal(scale=0.7, size=shape) for name, shape in spec.weight_shapes.items()}
    weights["standardise/std"] = rng.uniform(0.5, 2, spec.n_features)
    engine.set_weights(weights)
    x, y, sample_weight = batch(spec, rng, 20, np.float64)
    masks = [(rng.random((20, w)) >= dropout) / (1 - dropout) for w in spec.architecture.hidden] if dropout else None
    loss, gradient = engine.gradients(x, y, sample_weight, masks)

    def loss_at(vector):
        engine.set_weights(with_trained(weights, vector))
        return engine.gradients(x, y, sample_weight, masks)[0]

    center, eps = trained_vector(weights), 1e-6
    numerical = np.array(
        [(loss_at(center + eps * e) - loss_at(center - eps * e)) / (2 * eps) for e in np.eye(len(center))]
    )
    assert gradient.shape == center.shape and loss > 0
    np.testing.assert_allclose(gradient, numerical, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"learning_rate": 0.1},
        {"learning_rate": 0.05, "momentum": 0.9},
        {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
    ],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_numpy_sgd_steps_equal_keras_train_on_batch(optimizer, weighted):
    """Several steps, each on another batch, then new weights set mid-way (the momentum carries over,
    in Keras as here), then more steps: same losses and same weights, to float32 rounding."""
    rng = np.random.default_rng(1)
    spec = spec_of(**optimizer)
    numpy_bundle, tf_bundle = ModelBundle(spec, seed=3), ModelBundle(spec, seed=3, engine="tensorflow")
    x = batch(spec, rng, 500)[0]
    for bundle in (numpy_bundle, tf_bundle):
        bundle.set_weights(bundle.get_weights() | standardisation_weights(*fit_standardisation(x)))
    for step in range(8):
        if step == 4:
            moved = {k: v * np.float32(0.9) if "kernel" in k else v for k, v in numpy_bundle.get_weights().items()}
            numpy_bundle.set_weights(moved), tf_bundle.set_weights(moved)
        x, y, sample_weight = batch(spec, rng)
        sample_weight = sample_weight if weighted else None
        losses = [bundle.train_on_batch(x, y, sample_weight=sample_weight) for bundle in (numpy_bundle, tf_bundle)]
        assert isinstance(losses[0], float)
        np.testing.assert_allclose(*losses, **TIGHT)
        expected = tf_bundle.get_weights()
        for name, value in numpy_bundle.get_weights().items():
            np.testing.assert_allclose(value, expected[name], **TIGHT, err_msg=f"{name} after step {step}")
    assert not np.allclose(trained_vector(numpy_bundle.get_weights()), trained_vector(moved))  # it did train


def test_dropout_masks_keep_one_minus_rate_scaled_and_are_seeded():
    spec = spec_of(hidden=(300, 200), dropout=0.4)
    masks = DenseEngine(spec, seed=5)._dropout_masks(1000)
    assert [m.shape for m in masks] == [(1000, 300), (1000, 200)] and masks[0].dtype == np.float32
    for mask in masks:
        assert abs((mask == 0).mean() - 0.4) < 0.01 and abs(mask.mean() - 1) < 0.02
        assert np.all((mask == 0) | np.isclose(mask, 1 / 0.6))
    again, other = DenseEngine(spec, seed=5)._dropout_masks(1000), DenseEngine(spec, seed=6)._dropout_masks(1000)
    assert np.array_equal(masks[0], again[0]) and not np.array_equal(masks[0], other[0])


def test_dropout_trains_like_keras_on_average_and_is_off_for_predictions():
    """The mean training loss of a dropout model (learning rate ~0, so the weights stay) estimates the
    same expectation as Keras's; predictions are deterministic (no dropout)."""
    rng = np.random.default_rng(2)
    spec = spec_of(hidden=(64, 32), dropout=0.4, learning_rate=1e-12)
    numpy_bundle, tf_bundle = ModelBundle(spec, seed=1), ModelBundle(spec, seed=1, engine="tensorflow")
    x, y, _ = batch(spec, rng)
    for bundle in (numpy_bundle, tf_bundle):
        bundle.set_weights(bundle.get_weights() | standardisation_weights(*fit_standardisation(x)))
    losses = np.array([[bundle.train_on_batch(x, y) for bundle in (numpy_bundle, tf_bundle)] for _ in range(300)])
    error = np.sqrt(losses.var(axis=0).sum() / len(losses))
    assert abs(losses[:, 0].mean() - losses[:, 1].mean()) < 4 * error, (losses.mean(axis=0), error)
    assert losses[:, 0].std() > 0  # each step drew new masks
    probabilities = numpy_bundle.predict_proba(x)
    assert np.array_equal(probabilities, numpy_bundle.predict_proba(x))
    np.testing.assert_allclose(probabilities, tf_bundle.predict_proba(x), **TIGHT)
