"""Bring a Keras 3 classifier trained elsewhere (a ``.keras`` file) into streamfit as a spec and its weights.

A ``.keras`` file is a zip of ``config.json`` (the architecture, JSON) and ``model.weights.h5``
(HDF5 arrays). The config is read and checked here, as data (:func:`pipeline.keras_config.code_in_config`),
before Keras is called, and Keras builds it with ``safe_mode=True``; the weights are HDF5 datasets
read by Keras's ``load_weights``. Nothing in the file is unpickled or executed.

The model must take one input of shape ``(None, n_features)`` and end in a softmax over its classes
(streamfit trains with sparse categorical cross-entropy on probabilities). If its first layer is a
``Normalization``, that layer becomes streamfit's standardisation layer (mean, and std =
max(sqrt(variance), Keras's epsilon): the same arithmetic) and leaves the Keras config, so the
contract holds unchanged: features are checked against it, and training never changes it.
Importing this module imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

from pipeline.bundle import ModelBundle, standardisation_weights
from pipeline.errors import StreamfitError
from pipeline.keras_config import code_in_config
from pipeline.spec import ModelSpec, Standardisation

MAX_CONFIG_BYTES = 16 * 2**20
SOFTMAX_LAYERS = {"Softmax"}


class KerasImportError(StreamfitError, ValueError):
    """A ``.keras`` file streamfit does not import; the message says what and why."""


def read_keras_file(path: str | os.PathLike) -> tuple[dict, bytes]:
    """The model config (checked to name only Keras built-ins) and the weights file's bytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {"config.json", "model.weights.h5"} <= names:
                raise KerasImportError(
                    f"{path} is not a Keras 3 model file: it has no config.json and model.weights.h5 "
                    "(save it with model.save('model.keras'))"
                )
            if archive.getinfo("config.json").file_size > MAX_CONFIG_BYTES:
                raise KerasImportError(f"{path}: config.json is larger than {MAX_CONFIG_BYTES} bytes")
            config, weights = json.loads(archive.read("config.json")), archive.read("model.weights.h5")
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError) as exc:
        raise KerasImportError(f"cannot read {path} as a .keras file: {exc}") from exc
    if not isinstance(config, dict) or config.get("class_name") not in ("Sequential", "Functional", "Model"):
        raise KerasImportError(f"{path}: the config is not a Sequential or functional Keras model")
    config.pop("compile_config", None)  # the loss and optimizer are the spec's; a custom loss is never loaded
    if problem := code_in_config(config):
        raise KerasImportError(f"{path}: {problem}")
    return _without_dtypes(config), weights


def _without_dtypes(node):
    """The config with its layers' dtypes left to Keras's policy: streamfit's weights are float32 whatever
    precision the model was trained in (and a float64 policy gives float64, for gradient checks)."""
    if isinstance(node, list):
        return [_without_dtypes(item) for item in node]
    if isinstance(node, dict):
        keep = "keras_history" in node  # a symbolic tensor's record of what flows, not a layer's setting
        return {key: _without_dtypes(value) for key, value in node.items() if keep or key != "dtype"}
    return node


def _build(config: dict, weights_h5: bytes | None = None) -> keras.Model:
    model = keras.saving.deserialize_keras_object(json.loads(json.dumps(config)), safe_mode=True)
    if weights_h5 is not None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.weights.h5"
            path.write_bytes(weights_h5)
            model.load_weights(path)
    return model


def _first_normalization(config: dict) -> str | None:
    """The name of the ``Normalization`` layer that alone reads the model's input, if there is one."""
    layers = config["config"]["layers"]
    if config["class_name"] == "Sequential":
        first = next((layer for layer in layers if layer["class_name"] != "InputLayer"), None)
        return first["config"]["name"] if first and first["class_name"] == "Normalization" else None
    input_name = config["config"]["input_layers"][0]
    readers = [layer for layer in layers if input_name in _read_layers(layer.get("inbound_nodes", []))]
    if len(readers) == 1 and readers[0]["class_name"] == "Normalization":
        return readers[0]["name"]
    return None


def _read_layers(node) -> set[str]:
    """Names of the layers whose outputs a functional config's node reads."""
    if isinstance(node, dict) and "keras_history" in node:
        return {node["keras_history"][0]}
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return set().union(set(), *(_read_layers(child) for child in children))


def _rewire(node, old: str, new: str):
    """``node`` with every read of layer ``old``'s output reading layer ``new``'s instead."""
    if isinstance(node, list):
        if len(node) == 3 and node[0] == old and isinstance(node[1], int):  # output_layers entry
            return [new, *node[1:]]
        return [_rewire(item, old, new) for item in node]
    if isinstance(node, dict):
        if "keras_history" in node and node["keras_history"][0] == old:
            return {**node, "keras_history": [new, *node["keras_history"][1:]]}
        return {key: _rewire(value, old, new) for key, value in node.items()}
    return node


def _without_layer(config: dict, name: str) -> dict:
    """The config with the input-reading layer ``name`` removed (its readers read the input)."""
    inner = dict(config["config"])
    inner["layers"] = [layer for layer in inner["layers"] if layer["config"].get("name") != name]
    if config["class_name"] != "Sequential":
        inner = _rewire(inner, name, inner["input_layers"][0])
    return {**config, "config": inner}


def _check_classifier(model: keras.Model, path) -> tuple[int, int]:
    """``(n_features, n_classes)`` if the model maps one ``(None, n)`` input to softmax probabilities."""
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 2 or model.inputs[0].shape[1] is None:
        raise KerasImportError(f"{path}: the model must take one input of shape (None, n_features)")
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2 or (model.outputs[0].shape[1] or 0) < 2:
        raise KerasImportError(f"{path}: the model must have one output of shape (None, n_classes >= 2)")
    last = model
    while isinstance(last, keras.Model):  # the layer that makes the output, inside nested models too
        last = last.outputs[0]._keras_history.operation
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    if type(last).__name__ not in SOFTMAX_LAYERS and activation != "softmax":
        raise KerasImportError(
            f"{path}: the output layer {last.name!r} must end in a softmax over the classes (streamfit trains "
            "with sparse categorical cross-entropy on probabilities); give it activation='softmax'"
        )
    return int(model.inputs[0].shape[1]), int(model.outputs[0].shape[1])


def import_keras(
    path: str | os.PathLike,
    name: str,
    feature_names: Sequence[str] | None = None,
    classes: Sequence[int | str] | None = None,
) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The spec (builder ``keras_config``) of the model in ``path`` and its weights, by stable name."""
    config, weights_h5 = read_keras_file(path)
    try:
        model = _build(config, weights_h5)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise KerasImportError(f"{path}: Keras could not build the model from its config and weights: {exc}") from exc
    n_features, n_classes = _check_classifier(model, path)
    mean, std = np.zeros(n_features, np.float32), np.ones(n_features, np.float32)
    if normalization := _first_normalization(config):
        layer = model.get_layer(normalization)
        if layer.invert or tuple(layer.axis) != (-1,):
            raise KerasImportError(f"{path}: the first Normalization layer must normalise the last axis, not invert")
        mean = np.broadcast_to(keras.ops.convert_to_numpy(layer.mean), (1, n_features))[0].astype(np.float32)
        variance = np.broadcast_to(keras.ops.convert_to_numpy(layer.variance), (1, n_features))[0]
        std = np.maximum(np.sqrt(variance.astype(np.float32)), np.float32(keras.backend.epsilon()))
        config = _without_layer(config, normalization)
    core = _build(config)
    for layer in core.layers:
        layer.set_weights(model.get_layer(layer.name).get_weights())
    for variable in core.weights:
        if variable.dtype != "float32":
            raise KerasImportError(
                f"{path}: tensor {variable.path!r} is {variable.dtype}; streamfit's weights are float32 "
                "(a Normalization layer is only accepted as the first layer)"
            )
    tensors = {variable.path: list(variable.shape) for variable in core.weights}  # as spec.json holds them
    if any(name.startswith(("standardise/", "one_hot/")) for name in tensors):
        raise KerasImportError(f"{path}: rename the layers 'standardise' and 'one_hot': streamfit's own layers")
    feature_names = list(feature_names or (f"f{i}" for i in range(n_features)))
    classes = list(classes or range(n_classes))
    if (len(feature_names), len(classes)) != (n_features, n_classes):
        raise KerasImportError(
            f"{path}: the model takes {n_features} features and has {n_classes} classes; "
            f"the features given name {len(feature_names)} and the classes {len(classes)}"
        )
    try:
        spec = ModelSpec(
            name=name,
            builder="keras_config",
            builder_args={"config": config, "tensors": tensors},
            feature_names=feature_names,
            classes=classes,
            standardisation=Standardisation(mean=mean.tolist(), std=std.tolist()) if normalization else None,
        )
    except ValueError as exc:
        raise KerasImportError(f"{path}: {exc}") from exc
    weights = standardisation_weights(mean, std) | {v.path: keras.ops.convert_to_numpy(v) for v in core.weights}
    _check_same_outputs(spec, weights, model, path)
    return spec, weights


def _check_same_outputs(spec: ModelSpec, weights: dict[str, np.ndarray], model: keras.Model, path) -> None:
    """The imported model, rebuilt as streamfit runs it, answers as the file's own model does."""
    rows = np.random.default_rng(0).normal(size=(8, spec.n_features)).astype(np.float32)
    bundle = ModelBundle(spec, engine="tensorflow")
    bundle.set_weights(weights)
    expected = keras.ops.convert_to_numpy(model(rows, training=False))
    if not np.allclose(bundle.predict_proba(rows), expected, rtol=1e-5, atol=1e-6):
        raise KerasImportError(f"{path}: the model rebuilt from its config does not reproduce the file's outputs")
