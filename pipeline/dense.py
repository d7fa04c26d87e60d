"""Dense classifiers in numpy: the Keras model of a :class:`~pipeline.spec.DenseClassifier`, without TensorFlow.

Importing TensorFlow costs a process ~0.5 GB and seconds, and each call into it a fixed overhead;
the processes that predict and train (serving, Spark workers, the parameter server's evaluation) run
these small networks in numpy instead. Float32 throughout and the same operations as Keras, so the
two engines agree to float32 rounding (tests/test_dense.py, tests/test_dense_training.py). Overflow
yields inf/NaN silently, as in TensorFlow: callers check outputs
(:func:`pipeline.events.probability_problems`) and trained weights (:func:`pipeline.training.poisonous_rows`).

>>> from pipeline.spec import BUILTIN_SPECS
>>> engine = DenseEngine(BUILTIN_SPECS["small"])
>>> engine.set_weights(initial_weights(BUILTIN_SPECS["small"], seed=1))
>>> engine.predict_proba(np.zeros((1, 10), np.float32)).sum().round(6)
np.float32(1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pipeline.spec import DenseClassifier, ModelSpec


def supports(spec: ModelSpec) -> bool:
    """Whether numpy can run ``spec``'s architecture (else only the TensorFlow engine can)."""
    return isinstance(spec.architecture, DenseClassifier)


def initial_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Keras's default initialisation: Glorot-uniform kernels (layer ``i``'s drawn from a generator
    seeded with ``(seed, i)``, so no global random state is touched), zero biases; standardisation
    the identity (the bundle applies the spec's)."""
    weights, layer = {}, 0
    for name, shape in spec.weight_shapes.items():
        if name.endswith("/kernel"):
            limit = math.sqrt(6.0 / sum(shape))
            weights[name] = np.random.default_rng([seed, layer]).uniform(-limit, limit, shape).astype(np.float32)
            layer += 1
        else:
            weights[name] = np.full(shape, 1.0 if name == "standardise/std" else 0.0, np.float32)
    return weights


def _views(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``flat`` cut into arrays of ``shapes``, in order, sharing its memory."""
    views, start = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name], start = flat[start : start + size].reshape(shape), start + size
    return views


def one_hot_encode(x: np.ndarray, standardised: np.ndarray, cardinalities: tuple[int | None, ...]) -> np.ndarray:
    """The first dense layer's input: each numeric feature standardised, each categorical one's code
    (from the raw ``x``, truncated to an integer as TensorFlow's cast does) as a one-hot block. A code
    outside ``0..cardinality-1`` gives an all-zero block, as ``tf.one_hot`` does (events never carry
    one: :func:`pipeline.events.category_code_problem`).

    >>> x = np.array([[2.0, 0.5], [0.0, -1.0]], np.float32)
    >>> one_hot_encode(x, x, (3, None)).tolist()
    [[0.0, 0.0, 1.0, 0.5], [1.0, 0.0, 0.0, -1.0]]
    """
    encoded = np.zeros((len(x), sum(k or 1 for k in cardinalities)), standardised.dtype)
    column = 0
    for j, k in enumerate(cardinalities):
        if k is None:
            encoded[:, column] = standardised[:, j]
        else:
            with np.errstate(invalid="ignore"):
                codes = np.trunc(x[:, j])
                rows = np.flatnonzero((codes >= 0) & (codes < k))
            encoded[rows, column + codes[rows].astype(np.intp)] = 1
        column += k or 1
    return encoded


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax as TensorFlow computes it: the row maximum subtracted first (so inf logits give NaN, as there)."""
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class DenseEngine:
    """A dense classifier's weights in one flat float32 buffer (reading or replacing them all is one
    copy each way, an optimizer step one vector update), its forward pass, and its training: gradients
    by backpropagation and the spec's Keras SGD step (:meth:`train_on_batch`)."""

    def __init__(self, spec: ModelSpec, seed: int = 0, dtype: type = np.float32):
        """``dtype`` float64 only for gradient checks: the model is float32."""
        if not isinstance(spec.architecture, DenseClassifier):
            raise ValueError(f"numpy cannot run builder {spec.builder!r}; use the tensorflow engine")
        self.architecture = spec.architecture
        shapes = spec.weight_shapes
        self.spec, self._shapes = spec, shapes
        self._flat: np.ndarray = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype)
        self._weights = _views(self._flat, shapes)
        names = [*(f"hidden_{i}" for i in range(len(self.architecture.hidden))), "output"]
        self._layers = [(self._weights[f"{n}/kernel"], self._weights[f"{n}/bias"]) for n in names]
        self._trained = slice(2 * spec.n_features, None)  # all but the standardisation statistics
        self._trained_shapes = dict(list(shapes.items())[2:])
        self._velocity: np.ndarray | None = None  # SGD momentum, kept across set_weights like Keras's optimizer
        self._rng = np.random.default_rng(seed)  # dropout masks

    def get_weights(self) -> dict[str, np.ndarray]:
        """Fresh float32 copies (views of one new buffer)."""
        return _views(self._flat.copy(), self._shapes)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy in ``weights``, already checked against the spec (:func:`pipeline.bundle.check_weights`)."""
        for name, target in self._weights.items():
            target[...] = weights[name]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of float32 rows ``x`` (inference: no dropout)."""
        with np.errstate(all="ignore"):
            return _softmax(self._forward(x)[-1])

    def _forward(self, x: np.ndarray, masks: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Each layer's input, the standardised (and one-hot encoded) ``x`` first, then the logits;
        ``masks`` scale the hidden layers' outputs (dropout)."""
        w = self._weights
        standardised = (x - w["standardise/mean"]) / w["standardise/std"]
        cardinalities = self.spec.cardinalities
        outputs = [one_hot_encode(x, standardised, cardinalities) if self.spec.categorical else standardised]
        for i, (kernel, bias) in enumerate(self._layers):
            h = outputs[-1] @ kernel
            h += bias
            if i < len(self._layers) - 1:
                np.maximum(h, 0, out=h)
                if masks:
                    h *= masks[i]
            outputs.append(h)
        return outputs

    def train_on_batch(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """One step of the spec's optimizer on ``mean_i(sample_weight_i * crossentropy_i)`` with dropout;
        returns that loss (before the step), as Keras's ``train_on_batch`` does."""
        with np.errstate(all="ignore"):
            loss, gradient = self.gradients(x, y, sample_weight, self._dropout_masks(len(x)))
            self._step(gradient)
        return loss

    def gradients(
        self,
        x: np.ndarray,
        y: np.ndarray,
        sample_weight: np.ndarray | None = None,
        masks: list[np.ndarray] | None = None,
    ) -> tuple[float, np.ndarray]:
        """The loss and its gradient with respect to the trained weights (flat, in the weights' order).

        Crossentropy from the logits, as Keras computes it in training (it takes the softmax's input,
        so no probability is clipped): ``logsumexp(z) - z_y``, whose gradient is ``softmax(z) - onehot(y)``.
        """
        dtype, n = self._flat.dtype, len(x)
        outputs = self._forward(x, masks)
        logits = outputs.pop()
        rows, weight = np.arange(n), np.ones(n, dtype) if sample_weight is None else np.asarray(sample_weight, dtype)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        loss = float(np.sum((np.log(total[:, 0]) - shifted[rows, y]) * weight) / dtype.type(n))
        delta = exp / total
        delta[rows, y] -= 1
        delta *= (weight / dtype.type(n))[:, None]
        gradient = np.empty_like(self._flat[self._trained])
        parts = list(_views(gradient, self._trained_shapes).values())  # kernel, bias of each layer in turn
        for i in reversed(range(len(self._layers))):
            np.matmul(outputs[i].T, delta, out=parts[2 * i])
            delta.sum(axis=0, out=parts[2 * i + 1])
            if i:
                delta = delta @ self._layers[i][0].T
                delta *= outputs[i] > 0  # relu's derivative, from its output (as TensorFlow's ReluGrad)
                if masks:
                    delta *= masks[i - 1]
        return loss, gradient

    def _dropout_masks(self, n: int) -> list[np.ndarray] | None:
        """Inverted dropout: each hidden output kept with probability ``1 - rate`` and scaled by its inverse."""
        rate = self.architecture.dropout
        if not rate:
            return None
        scale = self._flat.dtype.type(1 / (1 - rate))
        return [(self._rng.random((n, width), np.float32) >= rate) * scale for width in self.architecture.hidden]

    def _step(self, gradient: np.ndarray) -> None:
        """Keras's SGD: ``w -= lr * g``; with momentum ``v = m * v - lr * g`` then ``w += v``, or with
        Nesterov ``w += m * v - lr * g`` -- the same float32 operations in the same order."""
        opt, dtype, weights = self.spec.optimizer, self._flat.dtype.type, self._flat[self._trained]
        step = gradient * dtype(opt.learning_rate)
        if not opt.momentum:
            weights -= step
            return
        if self._velocity is None:
            self._velocity = np.zeros_like(gradient)
        velocity, momentum = self._velocity, dtype(opt.momentum)
        velocity *= momentum
        velocity -= step
        weights += velocity * momentum - step if opt.nesterov else velocity
