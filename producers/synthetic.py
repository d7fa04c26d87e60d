"""Synthetic labelled streams, with optional abrupt concept drift.

river's generators provide hyperplane (with gradual drift), SEA, Agrawal, random
RBF (with drifting centroids) and STAGGER (three categorical features, codes 0..2: the
``stagger`` spec's); ``higgs`` is our own vectorised 30-feature two-class
generator shaped like the HIGGS benchmark, matching the default model's input.
``--drift-at N`` switches every stream to a second concept after N events.

>>> rows = list(itertools.islice(synthetic_rows("sea", seed=1), 3))
>>> [len(features) for features, _ in rows], all(label in (0, 1) for _, label in rows)
([3, 3, 3], True)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
from river.datasets import synth

Row = tuple[list[float], int]


def _river(make: Callable[[int, int], object]) -> Callable[[int, int], Iterator[Row]]:
    """Adapt a river generator factory (seed, concept) into a stream of (feature list, label)."""

    def rows(seed: int, concept: int) -> Iterator[Row]:
        for x, y in make(seed, concept):
            yield [float(v) for v in x.values()], int(y)

    return rows


def _higgs(seed: int, concept: int, block: int = 4096) -> Iterator[Row]:
    """30 features: 21 'low-level' (momenta-like, some positive) and 9 'high-level' nonlinear combinations.

    The label comes from a fixed random nonlinear score of the high-level features
    plus noise (Bayes accuracy about 0.9); a new concept redraws the score's weights.
    """
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(10_007 + concept).normal(size=9)
    while True:
        low = rng.normal(size=(block, 21))
        low[:, ::3] = np.abs(low[:, ::3])  # transverse-momentum-like features are positive
        pairs = low[:, :18].reshape(block, 9, 2)
        high = (
            np.sqrt(pairs[:, :, 0] ** 2 + pairs[:, :, 1] ** 2)
            - np.sqrt(2)
            + 0.3 * np.tanh(low[:, 18:19] * pairs[:, :, 0])
        )
        score = high @ weights + 0.3 * rng.normal(size=block)
        labels = (score > 0).astype(np.int64).tolist()
        features = np.concatenate([low, high], axis=1).round(6).tolist()
        yield from zip(features, labels)


GENERATORS: dict[str, tuple[Callable[[int, int], Iterator[Row]], int]] = {
    # name: (factory(seed, concept), number of features)
    "hyperplane": (
        _river(
            lambda seed, c: synth.Hyperplane(seed=seed + 7919 * c, n_features=10, mag_change=0.0, noise_percentage=0.05)
        ),
        10,
    ),
    "sea": (_river(lambda seed, c: synth.SEA(variant=(0, 2, 1, 3)[c % 4], seed=seed)), 3),
    "agrawal": (_river(lambda seed, c: synth.Agrawal(classification_function=(0, 2, 4, 6)[c % 4], seed=seed)), 9),
    "rbf": (
        _river(
            lambda seed, c: synth.RandomRBFDrift(
                seed_model=seed + 7919 * c, seed_sample=seed, n_features=10, n_centroids=50, change_speed=0.0001
            )
        ),
        10,
    ),
    "stagger": (
        _river(lambda seed, c: synth.STAGGER(classification_function=c % 3, seed=seed, balance_classes=True)),
        3,
    ),
    "higgs": (_higgs, 30),
}


def n_features(name: str) -> int:
    return GENERATORS[_known(name)][1]


def _known(name: str) -> str:
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic source {name!r}; choose one of {', '.join(GENERATORS)}")
    return name


def synthetic_rows(name: str, seed: int = 0, drift_at: int | None = None) -> Iterator[Row]:
    """An endless seeded stream of (features, label); the concept changes abruptly after ``drift_at`` rows."""
    make = GENERATORS[_known(name)][0]
    if drift_at is None:
        return make(seed, 0)
    return itertools.chain(itertools.islice(make(seed, 0), drift_at), make(seed, 1))
