"""Proven maths (seed 003): for every builder, TensorFlow's gradients of the training loss match central
differences in float64, and the loss is a mean over the minibatch, so its size does not change the step.

The numpy engine's own backpropagation is checked the same way in tests/test_dense_training.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bundle import ModelBundle, standardisation_weights
from pipeline.dense import initial_weights, supports
from pipeline.spec import BUILDERS, BUILTIN_SPECS, ModelSpec

keras = pytest.importorskip("keras")

ROWS, EPS = 6, 1e-6
CHECKED_PER_TENSOR = 12  # the largest gradients of each tensor, and as many drawn at random


def imported_example() -> ModelSpec:
    """A Keras classifier (tanh, relu, a softmax over 3 classes) imported as users import theirs."""
    import tempfile
    from pathlib import Path

    from pipeline.keras_import import import_keras

    layers = [keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(5, activation="relu")]
    model = keras.Sequential([keras.Input((4,)), *layers, keras.layers.Dense(3, activation="softmax")])
    with tempfile.TemporaryDirectory() as directory:
        model.save(Path(directory) / "imported.keras")
        return import_keras(Path(directory) / "imported.keras", "imported")[0]


def examples(builder: str) -> list[ModelSpec]:
    """Specs naming ``builder`` with dropout off: the built-in ones, and an imported Keras model."""
    if builder == "keras_config":
        return [imported_example()]
    return [
        ModelSpec.model_validate(spec.model_dump() | {"builder_args": {**spec.builder_args, "dropout": 0.0}})
        for spec in BUILTIN_SPECS.values()
        if spec.builder == builder
    ]


EXAMPLES = [spec for builder in BUILDERS for spec in examples(builder)]


def test_every_builder_has_an_example_to_check():
    assert not [builder for builder in BUILDERS if not examples(builder)], "add a spec to check the gradients of"


@pytest.fixture
def float64_keras():
    """Keras builds float64 variables and computes in float64 while the test runs."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def float64_engine(spec: ModelSpec):
    """The spec's Keras model in float64, from its usual initial weights and a standardisation that
    is not the identity (so its layer is in the path)."""
    from pipeline.keras_engine import KerasEngine

    engine = KerasEngine(spec, seed=1)
    start = initial_weights(spec, seed=1) if supports(spec) else {v.path: v.numpy() for v in engine.model.weights}
    start |= standardisation_weights(np.linspace(-1, 1, spec.n_features), np.linspace(0.5, 2, spec.n_features))
    for variable in engine.model.weights:
        assert variable.dtype == "float64", variable.path
        variable.assign(start[variable.path].astype(np.float64))
    return engine


def rows(spec: ModelSpec, n: int = ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 2.0, (n, spec.n_features)), rng.integers(0, spec.n_classes, n)


def tape_gradients(engine, x, y) -> dict[str, np.ndarray]:
    import tensorflow as tf

    trained = engine.model.trainable_weights
    with tf.GradientTape() as tape:
        loss = engine.training_loss(x, y)
    return {v.path: g.numpy() for v, g in zip(trained, tape.gradient(loss, trained))}


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda spec: spec.name)
def test_tensorflow_gradients_match_central_differences_in_float64(spec, float64_keras):
    """Each trained tensor's largest gradients (where an error would show) and random ones."""
    engine = float64_engine(spec)
    x, y = rows(spec)
    analytic = tape_gradients(engine, x, y)
    rng = np.random.default_rng(3)
    differences, largest = [], 0.0
    for variable in engine.model.trainable_weights:
        gradient = analytic[variable.path].ravel()
        picked = np.unique(
            np.concatenate(
                [np.argsort(-np.abs(gradient))[:CHECKED_PER_TENSOR], rng.choice(gradient.size, CHECKED_PER_TENSOR)]
            )
        )
        value = variable.numpy()
        for index in picked:
            losses = []
            for sign in (1, -1):
                moved = value.copy()
                moved.flat[index] += sign * EPS
                variable.assign(moved)
                losses.append(float(engine.training_loss(x, y)))
            variable.assign(value)
            differences.append(abs((losses[0] - losses[1]) / (2 * EPS) - gradient[index]))
        largest = max(largest, float(np.abs(gradient).max()))
    assert largest > 1e-2  # gradients worth checking: a wrong one would not hide under the tolerance
    assert np.mean(differences) <= 1e-7, f"mean |tape - central difference| {np.mean(differences):.3g}"


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda spec: spec.name)
def test_the_loss_gradient_is_the_mean_of_the_rows_gradients(spec, float64_keras):
    """Scaled by 1/batch: a batch's gradient is its rows' mean, and the same rows twice give the same."""
    engine = float64_engine(spec)
    x, y = rows(spec)
    batch = tape_gradients(engine, x, y)
    per_row = [tape_gradients(engine, x[i : i + 1], y[i : i + 1]) for i in range(ROWS)]
    twice = tape_gradients(engine, np.concatenate([x, x]), np.concatenate([y, y]))
    for name, gradient in batch.items():
        np.testing.assert_allclose(gradient, np.mean([g[name] for g in per_row], axis=0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(twice[name], gradient, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("engine", ["numpy", "tensorflow"])
def test_the_minibatch_size_does_not_change_the_step(engine):
    """One training step on a batch and on the same batch repeated four times moves the weights alike,
    in both engines (float32, the model's precision)."""
    spec = BUILTIN_SPECS["wide"]
    x, y = rows(spec, 16)
    x = x.astype(np.float32)
    moved = []
    for repeat in (1, 4):
        bundle = ModelBundle(spec, seed=2, engine=engine)
        bundle.train_on_batch(np.tile(x, (repeat, 1)), np.tile(y, repeat))
        moved.append(bundle.get_weights())
    start = ModelBundle(spec, seed=2).get_weights()
    for name, value in moved[0].items():
        np.testing.assert_allclose(moved[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert max(np.abs(moved[0][n] - start[n]).max() for n in start) > 1e-3  # the step is not negligible
