"""A model ready to use: a spec's model, its weights by stable name, fast inference.

Weights travel as ``{name: float32 array}`` -- the safetensors keys and the
parameter-server tensor names alike -- including the standardisation statistics, which
are the model's first layer so Spark and serving preprocess identically.

Dense models run and train in numpy (:mod:`pipeline.dense`): no process that uses them imports
TensorFlow (~0.5 GB and seconds per process). TensorFlow (:mod:`pipeline.keras_engine`) is the
fallback for architectures numpy cannot run, imported when such a bundle is built.

>>> from pipeline.spec import BUILTIN_SPECS
>>> bundle = ModelBundle(BUILTIN_SPECS["small"], seed=1)
>>> bundle.predict_proba(np.zeros((3, 10), np.float32)).shape
(3, 2)
>>> list(bundle.get_weights())[:3]
['standardise/mean', 'standardise/std', 'hidden_0/kernel']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load, save

from pipeline import dense
from pipeline.errors import StreamfitError
from pipeline.spec import ModelSpec

if TYPE_CHECKING:  # importing it imports TensorFlow
    from pipeline.keras_engine import KerasEngine


class WeightsError(StreamfitError, ValueError):
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
        raise WeightsError(
            f"weights do not match model {spec.name!r}: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    checked = {name: np.asarray(weights[name], dtype=np.float32) for name in expected}
    for name, value in checked.items():
        if value.shape != expected[name]:
            raise WeightsError(f"tensor {name!r} has shape {value.shape}, model {spec.name!r} expects {expected[name]}")
    return checked


def has_identity_standardisation(weights: Mapping[str, np.ndarray]) -> bool:
    """True while the standardisation layer has not been fitted to any data (mean 0, std 1)."""
    return not np.any(weights["standardise/mean"]) and bool(np.all(weights["standardise/std"] == 1.0))


Standardisation = tuple[np.ndarray, np.ndarray]
"""A model's (mean, std) per feature, as its first layer applies them."""


def standardisation_from_moments(
    mean: np.ndarray, std: np.ndarray, cardinalities: Sequence[int | None] = ()
) -> Standardisation:
    """The standardisation of features with these means and (population) stds: a constant feature
    keeps std 1, so it is only centred; a categorical one (a cardinality in ``cardinalities``, the
    spec's) keeps the identity, as the model one-hot encodes its code instead. Every fit of the
    standardisation (numpy or Spark) ends here.

    >>> standardisation_from_moments(np.array([2.0, 5.0]), np.array([0.5, 0.0]))[1].tolist()
    [0.5, 1.0]
    >>> [a.tolist() for a in standardisation_from_moments(np.array([2.0, 1.2]), np.array([0.5, 0.7]), (None, 3))]
    [[2.0, 0.0], [0.5, 1.0]]
    """
    categorical = np.array([k is not None for k in cardinalities] or False)
    return np.where(categorical, 0.0, mean), np.where(categorical | (std <= 1e-12), 1.0, std)


def fit_standardisation(x: np.ndarray, cardinalities: Sequence[int | None] = ()) -> Standardisation:
    """The standardisation of the rows ``x`` (categorical features, by ``cardinalities``, left alone),
    computed in float64 (squares of valid float32s near its limit overflow float32); float64 arrays.

    >>> mean, std = fit_standardisation(np.array([[1.0, 3.0], [3.0, 3.0]], np.float32))
    >>> mean.tolist(), std.tolist()
    ([2.0, 3.0], [1.0, 1.0])
    """
    x = np.asarray(x, dtype=np.float64)
    return standardisation_from_moments(x.mean(axis=0), x.std(axis=0), cardinalities)


def standardisation_weights(mean: npt.ArrayLike, std: npt.ArrayLike) -> dict[str, np.ndarray]:
    """The standardisation layer's weights (float32) for ``(mean, std)``, to merge into a model's weights."""
    return {"standardise/mean": np.asarray(mean, np.float32), "standardise/std": np.asarray(std, np.float32)}


ENGINES = ("auto", "numpy", "tensorflow")


class ModelBundle:
    """The model of ``spec`` with deterministic initial weights for ``seed``; ``version`` when loaded.

    ``engine="auto"`` runs it in numpy when the architecture allows (every built-in spec), else
    in TensorFlow; ``"tensorflow"`` forces the Keras model (benchmarks, and tests comparing the two).
    """

    def __init__(self, spec: ModelSpec, seed: int = 0, version: int | None = None, engine: str = "auto"):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.spec, self.version = spec, version
        if engine == "auto":
            engine = "numpy" if dense.supports(spec) else "tensorflow"
        self.engine = engine
        self._engine: dense.DenseEngine | KerasEngine
        if self.engine == "numpy":
            self._engine = dense.DenseEngine(spec, seed)
        else:
            from pipeline.keras_engine import KerasEngine

            self._engine = KerasEngine(spec, seed)
        weights = dense.initial_weights(spec, seed) if dense.supports(spec) else self._engine.get_weights()
        if spec.standardisation:
            weights |= standardisation_weights(spec.standardisation.mean, spec.standardisation.std)
        self.set_weights(weights)

    @property
    def model(self):
        """The Keras model (the TensorFlow engine's only)."""
        if isinstance(self._engine, dense.DenseEngine):
            raise AttributeError(f"a {self.engine} bundle has no Keras model; build it with engine='tensorflow'")
        return self._engine.model

    @property
    def n_parameters(self) -> int:
        """All weights, the standardisation statistics included."""
        return int(sum(np.prod(shape) for shape in self.spec.weight_shapes.values()))

    def get_weights(self) -> dict[str, np.ndarray]:
        """Fresh float32 copies in the model's layer order; the caller may keep and modify them."""
        return self._engine.get_weights()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy every tensor in; all or nothing, as names and shapes are checked first."""
        checked = check_weights(self.spec, weights)
        self._engine.set_weights(checked)
        self._statistics = (checked["standardise/mean"].copy(), checked["standardise/std"].copy())
        for value in self._statistics:
            value.flags.writeable = False

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape ``(n, n_classes)``, for rows ``x`` of shape ``(n, n_features)``."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_features:
            raise ValueError(
                f"model {self.spec.name!r} expects rows of {self.spec.n_features} features, "
                f"got an array of shape {x.shape}"
            )
        return self._engine.predict_proba(x)

    def standardisation(self) -> Standardisation:
        """The standardisation layer's ``(mean, std)`` as float32 arrays: what inputs are checked against
        (:func:`pipeline.events.standardisation_problems`) so none turns infinite inside the model.
        Training leaves them alone, so they are kept from the last ``set_weights``, read-only."""
        return self._statistics

    def warm(self) -> None:
        """Run inference once now, so the first real request does not pay for tracing (TensorFlow)."""
        self.predict_proba(np.zeros((1, self.spec.n_features), np.float32))

    def train_on_batch(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """One step of the spec's optimizer on ``mean_i(sample_weight_i * loss_i)``; returns that loss.

        The optimizer's momentum starts at zero and is kept for the bundle's life, across
        ``set_weights``: a training worker's local model. Dropout is applied (inverted, seeded by the
        bundle's seed in numpy; Keras's own stream in TensorFlow).
        """
        sample_weight = None if sample_weight is None else np.asarray(sample_weight, np.float32)
        return self._engine.train_on_batch(np.asarray(x, np.float32), np.asarray(y, np.int32), sample_weight)
