"""The TensorFlow engine of a :class:`~pipeline.bundle.ModelBundle`: the spec's Keras model.

The fallback for architectures numpy cannot run (:func:`pipeline.dense.supports`), and the
reference the numpy engine is tested and benchmarked against (``engine="tensorflow"``).
Importing this module imports TensorFlow.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from pipeline.spec import ModelSpec


def _bulk_access(variables: list):
    """Read and assign all ``variables`` as one flat float32 vector, one TF call each way: a worker
    swaps weights several times per commit, and one eager call per tensor cost ~0.1 ms to read and
    ~0.25 ms to assign (``wide``: 0.9 and 1.8 ms per swap, against 0.3 and 0.5 ms this way)."""
    sizes = [int(np.prod(v.shape)) for v in variables]
    read = tf.function(lambda: tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0))

    @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float32)])
    def assign(flat):
        for variable, part in zip(variables, tf.split(flat, sizes)):
            variable.assign(tf.reshape(part, variable.shape))

    return read, assign, np.cumsum(sizes)[:-1]


@functools.cache
def _standardise_layer():
    """The standardisation layer class (defined once).

    Not keras' ``Normalization``: that one freezes its statistics into constants when built,
    so assigning new mean/variance later would not change what the model computes.
    """

    class Standardise(keras.layers.Layer):
        def __init__(self, n_features: int, **kwargs):
            super().__init__(**kwargs)
            self.mean = self.add_weight(shape=(n_features,), initializer="zeros", trainable=False, name="mean")
            self.std = self.add_weight(shape=(n_features,), initializer="ones", trainable=False, name="std")

        def call(self, x):
            return (x - self.mean) / self.std

    return Standardise


@functools.cache
def _one_hot_layer():
    """The one-hot encoding layer class (defined once): no weights, the same output as
    :func:`pipeline.dense.one_hot_encode` from the raw features and the standardised ones."""

    class OneHot(keras.layers.Layer):
        def __init__(self, cardinalities: tuple[int | None, ...], **kwargs):
            super().__init__(**kwargs)
            self.cardinalities = cardinalities

        def call(self, inputs):
            x, standardised = inputs
            blocks = [
                standardised[:, j : j + 1] if k is None else keras.ops.one_hot(keras.ops.cast(x[:, j], "int32"), k)
                for j, k in enumerate(self.cardinalities)
            ]
            return keras.ops.concatenate(blocks, axis=1)

    return OneHot


class KerasEngine:
    """The Keras model of ``spec``, inference as one compiled ``tf.function`` (``model.predict``
    costs ~40 ms per call) and training with ``train_on_batch``."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        self.spec = spec
        inputs = keras.Input((spec.n_features,), name="features")
        encoded = standardised = _standardise_layer()(spec.n_features, name="standardise")(inputs)
        if spec.categorical:
            encoded = _one_hot_layer()(spec.cardinalities, name="one_hot")([inputs, standardised])
        self.model = keras.Model(inputs, spec.architecture.build(encoded, spec.n_classes, seed), name=spec.name)
        self._variables = {v.path: v for v in self.model.weights}
        made = [(path, tuple(v.shape)) for path, v in self._variables.items()]
        if made != list(spec.weight_shapes.items()):
            raise RuntimeError(f"builder {spec.builder!r} made {made}, not the weight_shapes it declares")
        self._infer = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec([None, spec.n_features], tf.float32)],
        )
        self._read_all, self._assign_all, self._splits = _bulk_access(list(self._variables.values()))
        self._compiled = False

    def get_weights(self) -> dict[str, np.ndarray]:
        parts = np.split(self._read_all().numpy(), self._splits)  # views of one fresh copy
        return {name: part.reshape(v.shape) for (name, v), part in zip(self._variables.items(), parts)}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._assign_all(np.concatenate([weights[name].ravel() for name in self._variables]))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self._infer(x).numpy()

    def train_on_batch(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None) -> float:
        self.compile()
        return float(self.model.train_on_batch(x, y, sample_weight=sample_weight))

    def training_loss(self, x, y, sample_weight=None):
        """The loss ``train_on_batch`` differentiates (dropout on), as a tensor: what the gradient
        checks (tests/test_gradients.py) differentiate with a tape and by central differences."""
        self.compile()
        return self.model.compute_loss(x=x, y=y, y_pred=self.model(x, training=True), sample_weight=sample_weight)

    def compile(self) -> None:
        """Compile the model for training with the spec's loss and optimizer, once: ``train_on_batch``,
        the gradient checks and plain Keras ``fit`` (``bench.fit``'s baseline) train the same thing."""
        if not self._compiled:  # the optimizer (and its momentum) lives as long as the engine
            opt = self.spec.optimizer
            self.model.compile(
                loss=self.spec.loss,
                optimizer=keras.optimizers.SGD(opt.learning_rate, momentum=opt.momentum, nesterov=opt.nesterov),
            )
            self._compiled = True
