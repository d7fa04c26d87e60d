"""A model ready to use: the Keras model of a spec, its weights by stable name, fast inference.

Weights travel as ``{name: float32 array}`` -- the safetensors keys and the
parameter-server tensor names alike -- including the standardisation statistics, which
are the model's first layer so Spark and serving preprocess identically. ``predict_proba``
runs one compiled ``tf.function`` (``model.predict`` costs ~40 ms per call; this is well
under 1 ms for one row of the higgs model).

TensorFlow is imported when a bundle is built, not when this module is: the registry and
the CLI use the safetensors helpers here without paying for it.

>>> from pipeline.spec import BUILTIN_SPECS
>>> bundle = ModelBundle(BUILTIN_SPECS["small"], seed=1)
>>> bundle.predict_proba(np.zeros((3, 10), np.float32)).shape
(3, 2)
>>> list(bundle.get_weights())[:3]
['standardise/mean', 'standardise/std', 'hidden_0/kernel']
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from pipeline.spec import ModelSpec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class WeightsError(ValueError):
    """Weights that do not fit the model or cannot be read; the message names the tensor or file."""


def weights_to_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    """Serialise weights as safetensors (float32, in the given order)."""
    return save({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in weights.items()})


def weights_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes: a header and raw tensors, so reading weights never runs code."""
    try:
        return load(data)
    except SafetensorError as exc:
        raise WeightsError(f"not a readable safetensors payload: {exc}") from exc


def check_weights(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` as float32 arrays in the spec's order, if names and shapes are exactly the spec's."""
    expected = spec.weight_shapes
    missing, unknown = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unknown:
        raise WeightsError(f"weights do not match model {spec.name!r}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    checked = {name: np.asarray(weights[name], dtype=np.float32) for name in expected}
    for name, value in checked.items():
        if value.shape != expected[name]:
            raise WeightsError(f"tensor {name!r} has shape {value.shape}, model {spec.name!r} expects {expected[name]}")
    return checked


def _bulk_access(variables: list):
    """Read and assign all ``variables`` as one flat float32 vector, one TF call each way: a worker
    swaps weights several times per commit, and one eager call per tensor cost ~0.1 ms to read and
    ~0.25 ms to assign (``wide``: 0.9 and 1.8 ms per swap, against 0.3 and 0.5 ms this way)."""
    import tensorflow as tf

    sizes = [int(np.prod(v.shape)) for v in variables]
    read = tf.function(lambda: tf.concat([tf.reshape(v, [-1]) for v in variables], axis=0))

    @tf.function(input_signature=[tf.TensorSpec([sum(sizes)], tf.float32)])
    def assign(flat):
        for variable, part in zip(variables, tf.split(flat, sizes)):
            variable.assign(tf.reshape(part, variable.shape))

    return read, assign, np.cumsum(sizes)[:-1]


@functools.cache
def _standardise_layer():
    """The standardisation layer class, defined on first use so importing this module stays TF-free.

    Not keras' ``Normalization``: that one freezes its statistics into constants when built,
    so assigning new mean/variance later would not change what the model computes.
    """
    import keras

    class Standardise(keras.layers.Layer):
        def __init__(self, n_features: int, **kwargs):
            super().__init__(**kwargs)
            self.mean = self.add_weight(shape=(n_features,), initializer="zeros", trainable=False, name="mean")
            self.std = self.add_weight(shape=(n_features,), initializer="ones", trainable=False, name="std")

        def call(self, x):
            return (x - self.mean) / self.std

    return Standardise


def has_identity_standardisation(weights: Mapping[str, np.ndarray]) -> bool:
    """True while the standardisation layer has not been fitted to any data (mean 0, std 1)."""
    return not np.any(weights["standardise/mean"]) and bool(np.all(weights["standardise/std"] == 1.0))


class ModelBundle:
    """The Keras model of ``spec`` with deterministic initial weights for ``seed``; ``version`` when loaded."""

    def __init__(self, spec: ModelSpec, seed: int = 0, version: int | None = None):
        import keras
        import tensorflow as tf

        self.spec, self.version = spec, version
        inputs = keras.Input((spec.n_features,), name="features")
        standardise = _standardise_layer()(spec.n_features, name="standardise")
        outputs = spec.architecture.build(standardise(inputs), spec.n_classes, seed)
        self.model = keras.Model(inputs, outputs, name=spec.name)
        self._standardise = standardise
        self._variables = {v.path: v for v in self.model.weights}
        self._statistics: tuple[np.ndarray, np.ndarray] | None = None  # (mean, std), read on first use
        made = [(v.path, tuple(v.shape)) for v in self.model.weights]
        if made != list(spec.weight_shapes.items()):
            raise RuntimeError(f"builder {spec.builder!r} made {made}, not the weight_shapes it declares")
        if spec.standardisation:
            self._set_standardisation(spec.standardisation.mean, spec.standardisation.std)
        self._infer = tf.function(lambda x: self.model(x, training=False),
                                  input_signature=[tf.TensorSpec([None, spec.n_features], tf.float32)])
        self._read_all, self._assign_all, self._splits = _bulk_access(list(self._variables.values()))
        self._trainable = False

    @property
    def n_parameters(self) -> int:
        """All weights, the standardisation statistics included."""
        return int(sum(np.prod(v.shape) for v in self._variables.values()))

    def get_weights(self) -> dict[str, np.ndarray]:
        """Fresh float32 copies in the model's layer order; the caller may keep and modify them."""
        parts = np.split(self._read_all().numpy(), self._splits)  # views of one fresh copy
        return {name: part.reshape(v.shape) for (name, v), part in zip(self._variables.items(), parts)}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy every tensor in; all or nothing, as names and shapes are checked first."""
        self._assign_all(np.concatenate([value.ravel() for value in check_weights(self.spec, weights).values()]))
        self._statistics = None

    def save_weights(self, path: str | Path) -> None:
        Path(path).write_bytes(weights_to_bytes(self.get_weights()))

    def load_weights(self, path: str | Path) -> None:
        self.set_weights(weights_from_bytes(Path(path).read_bytes()))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape ``(n, n_classes)``, for rows ``x`` of shape ``(n, n_features)``."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_features:
            raise ValueError(f"model {self.spec.name!r} expects rows of {self.spec.n_features} features, "
                             f"got an array of shape {x.shape}")
        return self._infer(x).numpy()

    def standardisation(self) -> tuple[np.ndarray, np.ndarray]:
        """The standardisation layer's ``(mean, std)`` as float32 arrays: what inputs are checked against
        (:func:`pipeline.events.standardisation_problems`) so none turns infinite inside the model. Read
        once per weights (serving asks on every request), so the arrays are read-only."""
        if self._statistics is None:
            self._statistics = tuple(v.numpy() for v in (self._standardise.mean, self._standardise.std))
            for value in self._statistics:
                value.flags.writeable = False
        return self._statistics

    def warm(self) -> None:
        """Trace the inference function now, so the first real request does not pay for it."""
        self.predict_proba(np.zeros((1, self.spec.n_features), np.float32))

    def fit_standardisation(self, x: np.ndarray) -> None:
        """Set the standardisation layer from data; a constant feature keeps std 1 (it is only centred)."""
        x = np.asarray(x, dtype=np.float64)
        std = x.std(axis=0)
        self._set_standardisation(x.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def _set_standardisation(self, mean, std) -> None:
        self._standardise.mean.assign(np.asarray(mean, np.float32))
        self._standardise.std.assign(np.asarray(std, np.float32))
        self._statistics = None

    def train_on_batch(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """One step of the spec's optimizer on ``mean_i(sample_weight_i * loss_i)``; returns that loss.

        The optimizer (and its momentum) is created on the first call and kept for the
        bundle's life, across ``set_weights``: a training worker's local model.
        """
        if not self._trainable:
            import keras

            opt = self.spec.optimizer
            self.model.compile(loss=self.spec.loss, optimizer=keras.optimizers.SGD(
                opt.learning_rate, momentum=opt.momentum, nesterov=opt.nesterov))
            self._trainable = True
        sample_weight = None if sample_weight is None else np.asarray(sample_weight, np.float32)
        return float(self.model.train_on_batch(np.asarray(x, np.float32), np.asarray(y, np.int32),
                                               sample_weight=sample_weight))
