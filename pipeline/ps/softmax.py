"""A training-algorithm reference model in numpy, needing no TensorFlow."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class SoftmaxRegression:
    """A :class:`LocalModel` in numpy: multinomial logistic regression trained by plain SGD.

    The executable statement of the LocalModel contract (mean of per-sample weighted losses, copies in
    and out), used by the examples and tests, and a model that needs no TensorFlow.

    >>> model = SoftmaxRegression(features=2, classes=2, learning_rate=1.0)
    >>> for _ in range(20):
    ...     _ = model.train_on_batch(np.eye(2), np.array([0, 1]))
    >>> model.predict(np.eye(2))
    array([0, 1])
    """

    def __init__(self, features: int, classes: int, learning_rate: float = 0.1):
        self.learning_rate = learning_rate
        self._weights = {"kernel": np.zeros((features, classes), np.float32), "bias": np.zeros(classes, np.float32)}

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._weights.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._weights = {name: np.array(weights[name], dtype=np.float32) for name in self._weights}

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = x @ self._weights["kernel"] + self._weights["bias"]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)

    def train_on_batch(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """One SGD step on ``mean_i(sample_weight_i * cross_entropy_i)``; returns that loss before the step."""
        x = np.asarray(x, np.float32)
        probs = self.predict_proba(x)
        weight = np.ones(len(x), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        loss = float(np.mean(weight * -np.log(probs[np.arange(len(x)), y] + 1e-12)))
        grad = probs
        grad[np.arange(len(x)), y] -= 1.0
        grad *= weight[:, None] / len(x)
        self._weights["kernel"] -= np.float32(self.learning_rate) * (x.T @ grad)
        self._weights["bias"] -= np.float32(self.learning_rate) * grad.sum(axis=0)
        return loss
