"""Synthetic streams: seeded, the right width, drifting where asked."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from producers.synthetic import GENERATORS, n_features, synthetic_rows


@pytest.mark.parametrize("name", list(GENERATORS))
def test_seeded_width_and_binary_labels(name):
    first = list(itertools.islice(synthetic_rows(name, seed=5), 200))
    again = list(itertools.islice(synthetic_rows(name, seed=5), 200))
    assert first == again
    assert all(len(f) == n_features(name) for f, _ in first)
    assert {label for _, label in first} <= {0, 1}


def test_drift_changes_the_concept():
    """After the drift point the same inputs get different labels: a linear fit on before fails after."""
    rows = list(itertools.islice(synthetic_rows("higgs", seed=1, drift_at=5000), 10000))
    x = np.array([f for f, _ in rows])
    y = np.array([label for _, label in rows])
    before, after = slice(0, 5000), slice(5000, 10000)
    w, *_ = np.linalg.lstsq(np.c_[x[before], np.ones(5000)], y[before] * 2 - 1, rcond=None)

    def accuracy(part):
        return ((np.c_[x[part], np.ones(5000)] @ w > 0) == y[part]).mean()

    assert accuracy(before) - accuracy(after) > 0.1


def test_stagger_features_are_category_codes_the_stagger_spec_accepts():
    from pipeline.events import FeatureSchema, Rejection, validate_document
    from pipeline.spec import BUILTIN_SPECS

    schema = FeatureSchema.of(BUILTIN_SPECS["stagger"], max_bytes=1000)
    rows = list(itertools.islice(synthetic_rows("stagger", seed=3, drift_at=100), 200))
    assert {v for features, _ in rows for v in features} == {0.0, 1.0, 2.0}
    assert not any(
        isinstance(validate_document({"id": "s", "ts": 1, "features": f, "label": y}, schema), Rejection)
        for f, y in rows
    )


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="unknown synthetic source 'nope'"):
        next(synthetic_rows("nope"))
