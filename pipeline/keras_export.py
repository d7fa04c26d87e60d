"""Export a registry version for TensorFlow Serving (a SavedModel) or for Keras (a ``.keras`` file).

SavedModel: ``DIR/<version>/``, the layout ``tensorflow_model_server --model_base_path=DIR`` loads,
with a ``serving_default`` signature from ``features`` (float32, ``(None, n_features)``) to
``probabilities`` (``(None, n_classes)``): the very model streamfit runs, standardisation included.
``.keras``: ``DIR/<name>-v<version>.keras``, built from Keras's own layers only (the standardisation
as a ``Normalization`` first layer), so anyone loads it with ``keras.saving.load_model`` in safe
mode, and ``streamfit models import --keras`` takes it back. Importing this module imports TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from pipeline.bundle import ModelBundle
from pipeline.errors import StreamfitError

FORMATS = ("savedmodel", "keras")
SIGNATURE, INPUT, OUTPUT = "serving_default", "features", "probabilities"


class ExportError(StreamfitError, ValueError):
    """A version that cannot be exported as asked; the message says why."""


def export_savedmodel(bundle: ModelBundle, directory: str | os.PathLike) -> Path:
    """Write ``bundle`` as a SavedModel under ``directory/<version>``; returns that path."""
    target = _fresh(Path(directory) / str(bundle.version or 0))
    model = ModelBundle(bundle.spec, version=bundle.version, engine="tensorflow")
    model.set_weights(bundle.get_weights())
    archive = keras.export.ExportArchive()
    archive.track(model.model)
    archive.add_endpoint(
        SIGNATURE,
        lambda features: {OUTPUT: model.model(features, training=False)},
        input_signature=[tf.TensorSpec([None, bundle.spec.n_features], tf.float32, name=INPUT)],
    )
    archive.write_out(str(target), verbose=False)
    return target


def export_keras(bundle: ModelBundle, directory: str | os.PathLike) -> Path:
    """Write ``bundle`` as ``directory/<name>-v<version>.keras`` of built-in Keras layers; returns its path."""
    spec = bundle.spec
    if spec.categorical:
        raise ExportError(
            f"model {spec.name!r} has categorical features, which Keras's built-in layers do not "
            "encode as streamfit does; export it with --format savedmodel"
        )
    weights = bundle.get_weights()
    mean, std = weights["standardise/mean"], weights["standardise/std"]
    inputs = keras.Input((spec.n_features,), name=INPUT)
    normalised = keras.layers.Normalization(mean=mean, variance=np.square(std.astype(np.float64)), name="standardise")
    model = keras.Model(inputs, spec.architecture.build(normalised(inputs), spec.n_classes, seed=0), name=spec.name)
    variables = {variable.path: variable for variable in model.weights}
    for name, value in weights.items():
        if not name.startswith("standardise/"):
            variables[name].assign(value)
    Path(directory).mkdir(parents=True, exist_ok=True)
    target = Path(directory) / f"{spec.name}-v{bundle.version or 0}.keras"
    model.save(target)
    return target


def _fresh(path: Path) -> Path:
    if path.exists():
        raise ExportError(f"{path} exists; export to another directory or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
