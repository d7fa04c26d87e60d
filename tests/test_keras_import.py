"""Importing Keras 3 classifiers (``.keras`` files) and exporting versions for TF Serving and Keras."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from pipeline.bundle import ModelBundle  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.keras_export import ExportError, export_keras, export_savedmodel  # noqa: E402
from pipeline.keras_import import KerasImportError, import_keras  # noqa: E402
from pipeline.registry import Registry  # noqa: E402
from pipeline.spec import BUILTIN_SPECS, ModelSpec  # noqa: E402

ROWS = np.random.default_rng(7).normal(2.0, 3.0, size=(32, 4)).astype(np.float32)
FEATURES = ["age", "income", "tenure", "score"]


def sequential(tmp_path, *middle, name="seq.keras", output=None):
    """A Sequential classifier of 4 features saved as a user would, with ``middle`` layers after a Normalization."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Normalization(mean=[1.0, 2.0, 3.0, 4.0], variance=[1.0, 4.0, 0.25, 9.0]),
            keras.layers.Dense(8, activation="relu"),
            *middle,
            keras.layers.Dropout(0.2),
            output or keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.save(tmp_path / name)
    return model, tmp_path / name


def functional(tmp_path):
    """A functional classifier whose first layer is a Normalization adapted to data (its statistics are weights)."""
    inputs = keras.Input((4,), name="x")
    normalization = keras.layers.Normalization(name="norm")
    normalization.adapt(ROWS)
    hidden = keras.layers.Dense(6, activation="tanh", name="h")(normalization(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(hidden))
    model.save(tmp_path / "fn.keras")
    return model, tmp_path / "fn.keras"


def test_sequential_and_functional_import_with_their_normalization_as_standardisation(tmp_path):
    for model, path in [sequential(tmp_path), functional(tmp_path)]:
        spec, weights = import_keras(path, "imported", feature_names=FEATURES)
        assert (spec.builder, spec.feature_names, spec.n_classes) == (
            "keras_config",
            FEATURES,
            model.outputs[0].shape[1],
        )
        assert "Normalization" not in json.dumps(spec.builder_args["config"])  # folded into streamfit's layer
        norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
        np.testing.assert_allclose(weights["standardise/mean"], np.ravel(norm.mean), rtol=1e-6)
        np.testing.assert_allclose(weights["standardise/std"], np.sqrt(np.ravel(norm.variance)), rtol=1e-6)
        assert spec.standardisation is not None
        stored = ModelSpec.model_validate_json(spec.model_dump_json())  # as the registry reads it
        assert stored == spec
        bundle = ModelBundle(stored, version=1)
        bundle.set_weights(weights)
        assert bundle.engine == "tensorflow"
        np.testing.assert_allclose(
            bundle.predict_proba(ROWS), model(ROWS, training=False).numpy(), rtol=1e-6, atol=1e-7
        )


def test_refused_before_keras_runs_anything(tmp_path):
    _, lambda_path = sequential(tmp_path, keras.layers.Lambda(lambda x: x * 2), name="lambda.keras")

    @keras.saving.register_keras_serializable(package="user")
    class Doubling(keras.layers.Layer):
        def call(self, x):
            return x * 2

    _, custom_path = sequential(tmp_path, Doubling(), name="custom.keras")
    _, function_path = sequential(tmp_path, keras.layers.Dense(4, activation=lambda x: x * 2), name="function.keras")
    _, sigmoid_path = sequential(tmp_path, output=keras.layers.Dense(3, activation="sigmoid"), name="sigmoid.keras")
    for path, message in [
        (lambda_path, "a 'Lambda' layer '.*': it runs Python code"),
        (custom_path, "custom 'Doubling' layer"),
        (function_path, "a Python function as 'activation'"),
        (sigmoid_path, "must end in a softmax"),
        (tmp_path / "seq.keras", "the model takes 4 features"),
    ]:
        if not path.exists():
            sequential(tmp_path)
        features = FEATURES[:3] if message.startswith("the model takes") else None
        with pytest.raises(KerasImportError, match=message):
            import_keras(path, "refused", feature_names=features)
    (tmp_path / "not.keras").write_bytes(b"PK not a zip")
    with pytest.raises(KerasImportError, match="cannot read"):
        import_keras(tmp_path / "not.keras", "refused")

    # a spec.json edited by hand to smuggle a Lambda in is refused when the spec is read
    spec, _ = import_keras(tmp_path / "seq.keras", "ok")
    smuggled = spec.model_dump()
    with zipfile.ZipFile(lambda_path) as archive:
        smuggled["builder_args"]["config"] = json.loads(archive.read("config.json"))
    with pytest.raises(ValueError, match="'Lambda' layer"):
        ModelSpec.model_validate(smuggled)


def test_imported_model_trains_and_keeps_stable_weight_names(tmp_path):
    model, path = sequential(tmp_path)
    spec, weights = import_keras(path, "imported")
    registry = Registry(tmp_path / "registry")
    registry.create_model(spec)
    version = registry.register("imported", weights, algorithm="import")
    bundle = registry.load("imported", version)
    labels = np.arange(len(ROWS)) % 3
    before = bundle.get_weights()
    losses = [bundle.train_on_batch(ROWS, labels) for _ in range(20)]
    assert losses[-1] < losses[0]
    after = bundle.get_weights()
    assert list(after) == list(spec.weight_shapes) == list(weights)
    np.testing.assert_array_equal(after["standardise/mean"], before["standardise/mean"])  # never trained
    assert registry.register("imported", after, parent=version) == version + 1  # the same names and shapes again


def test_export_savedmodel_and_keras_answer_as_streamfit_does(tmp_path):
    _, path = functional(tmp_path)
    spec, weights = import_keras(path, "imported")
    imported = ModelBundle(spec, version=4)
    imported.set_weights(weights)
    small = ModelBundle(BUILTIN_SPECS["small"], seed=3, version=2)  # a built-in spec, run in numpy
    for bundle in (imported, small):
        rows = np.random.default_rng(1).normal(size=(16, bundle.spec.n_features)).astype(np.float32)
        expected = bundle.predict_proba(rows)
        saved = export_savedmodel(bundle, tmp_path / bundle.spec.name)
        assert saved == tmp_path / bundle.spec.name / str(bundle.version)
        signature = tf.saved_model.load(str(saved)).signatures["serving_default"]
        outputs = signature(features=tf.constant(rows))
        assert list(outputs) == ["probabilities"]
        np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, rtol=1e-6, atol=1e-7)
        with pytest.raises(ExportError, match="exists"):
            export_savedmodel(bundle, tmp_path / bundle.spec.name)
        exported = export_keras(bundle, tmp_path / "keras")
        reloaded = keras.saving.load_model(exported, safe_mode=True)
        np.testing.assert_allclose(reloaded(rows).numpy(), expected, rtol=1e-6, atol=1e-7)
    again, again_weights = import_keras(tmp_path / "keras" / "imported-v4.keras", "again")  # the round trip
    assert {name: value.shape for name, value in again_weights.items()} == spec.weight_shapes
    for name, value in weights.items():
        np.testing.assert_array_equal(again_weights[name], value)


def test_models_cli_import_annotate_export_and_delete_alias(tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("STREAMFIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STREAMFIT_HOME", str(tmp_path / "home"))

    def streamfit(*args, code: int = 0) -> str:
        assert main(["models", *map(str, args)]) == code
        out, err = capsys.readouterr()
        return out + err

    model, path = sequential(tmp_path)
    _, lambda_path = sequential(tmp_path, keras.layers.Lambda(lambda x: x + 1), name="lambda.keras")
    assert "'Lambda' layer" in streamfit("import", "refused", "--keras", lambda_path, code=1)
    out = streamfit(
        "import", "churn", "--keras", path, "--features", ",".join(FEATURES), "--classes", "stay,leave,upgrade",
        "--description", "trained offline", "--tag", "team=growth",
    )  # fmt: skip
    assert "standardisation from its Normalization layer): version 1 is champion" in out
    registry = Registry(tmp_path / "home" / "registry")
    spec = registry.spec("churn")
    assert (spec.feature_names, spec.classes, spec.builder) == (FEATURES, ["stay", "leave", "upgrade"], "keras_config")
    np.testing.assert_allclose(
        registry.load("churn").predict_proba(ROWS), model(ROWS, training=False).numpy(), rtol=1e-6, atol=1e-7
    )
    registry.set_alias("churn", "candidate", 1)
    assert "trained offline" in streamfit("show", "models:/churn@candidate")
    streamfit("annotate", "models:/churn@champion", "--tag", "stage=prod", "--remove-tag", "team")
    assert registry.meta("churn", 1)["tags"] == {"stage": "prod"}
    assert "churn: alias candidate (was version 1) deleted" in streamfit("delete-alias", "churn", "candidate")
    assert "no 'candidate' alias" in streamfit("export", "churn", "--alias", "candidate", tmp_path / "out", code=1)
    out = streamfit("export", "models:/churn@champion", "--format", "savedmodel", tmp_path / "serving")
    assert f"exported churn version 1 as savedmodel to {tmp_path / 'serving' / '1'}" in out
    assert (tmp_path / "serving" / "1" / "saved_model.pb").exists()
    assert "churn-v1.keras" in streamfit("export", "churn", "--version", "1", "--format", "keras", tmp_path / "k")
