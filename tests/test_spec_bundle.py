"""Model specs and the model bundle: architecture, weights by name, fast inference, local training."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.bundle import (
    ModelBundle,
    WeightsError,
    fit_standardisation,
    standardisation_weights,
    weights_from_bytes,
    weights_to_bytes,
)
from pipeline.spec import BUILTIN_SPECS, ModelSpec, SpecFileError, spec_from_file

SMALL = BUILTIN_SPECS["small"]


@pytest.fixture(scope="module")
def higgs():
    bundle = ModelBundle(BUILTIN_SPECS["higgs"], seed=7)
    bundle.warm()
    return bundle


def rows(n: int, features: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32)


def test_builtin_specs_round_trip_through_json():
    for spec in BUILTIN_SPECS.values():
        assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    assert (SMALL.n_features, SMALL.n_classes, SMALL.feature_names[-1]) == (10, 2, "f9")
    assert list(SMALL.weight_shapes.items()) == [
        ("standardise/mean", (10,)),
        ("standardise/std", (10,)),
        ("hidden_0/kernel", (10, 32)),
        ("hidden_0/bias", (32,)),
        ("output/kernel", (32, 2)),
        ("output/bias", (2,)),
    ]


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"builder": "os.system"}, "unknown builder 'os.system'"),
        ({"builder_args": {"hidden": [8, 0]}}, "builder_args.hidden.1: Input should be greater than 0"),
        ({"categorical": {"f0": 1}}, "categorical.f0\n  Input should be greater than or equal to 2"),
        ({"categorical": {"zip": 3}}, "categorical names \\['zip'\\] that are not in feature_names"),
        ({"builder_args": {"hidden": [8], "activation": "eval"}}, "Extra inputs are not permitted"),
        ({"name": "../etc"}, "should match pattern"),
        ({"feature_names": ["a", "a"]}, "must be unique"),
        ({"classes": [0]}, "at least 2 items"),
        ({"standardisation": {"mean": [0.0], "std": [1.0]}}, "standardisation has 1 entries for 10 features"),
        ({"standardisation": {"mean": [0.0] * 10, "std": [0.0] * 10}}, "stds finite and > 0"),
        ({"optimizer": {"name": "adam"}}, "'sgd'"),
    ],
)
def test_bad_specs_are_rejected_naming_the_problem(change, problem):
    with pytest.raises(ValidationError, match=problem):
        ModelSpec.model_validate(SMALL.model_dump() | change)


def test_spec_files_in_yaml_or_json_are_validated_naming_every_bad_field(tmp_path):
    yaml_file, json_file, bad = tmp_path / "shop.yaml", tmp_path / "shop.json", tmp_path / "bad.yml"
    yaml_file.write_text(
        "name: shop\nfeature_names: [price, zip]\ncategorical: {zip: 100}\nclasses: [stays, leaves]\n"
        "builder_args: {hidden: [16, 8]}\noptimizer: {learning_rate: 0.05, momentum: 0.9}\n"
    )
    spec = spec_from_file(yaml_file)
    assert (spec.cardinalities, spec.n_inputs, spec.classes) == ((None, 100), 101, ["stays", "leaves"])
    json_file.write_text(spec.model_dump_json())
    assert spec_from_file(json_file, name="shop2") == ModelSpec.model_validate(spec.model_dump() | {"name": "shop2"})
    bad.write_text("name: shop\nfeature_names: [price]\noptimizer: {learning_rate: -1, kind: adam}\nlayers: [8]\n")
    with pytest.raises(SpecFileError) as error:
        spec_from_file(bad)
    first, *problems = str(error.value).splitlines()
    assert first == f"{bad}: not a valid model spec:"
    assert sorted(problems) == [
        "  layers: Extra inputs are not permitted (got [8])",
        '  optimizer.kind: Extra inputs are not permitted (got "adam")',
        "  optimizer.learning_rate: Input should be greater than 0 (got -1)",
    ]
    bad.write_text("name: shop\nfeature_names: [price]\nbuilder_args: {hidden: [8, -1]}\n")
    with pytest.raises(SpecFileError, match="builder_args.hidden.1: Input should be greater than 0"):
        spec_from_file(bad)
    bad.write_text("!!python/object/apply:os.system [echo hi]")
    with pytest.raises(SpecFileError, match="cannot read a YAML or JSON spec: could not determine a constructor"):
        spec_from_file(bad)


def test_a_fitted_standardisation_leaves_categorical_features_alone():
    """Price and a constant are fitted; the zip code's column keeps mean 0 and std 1, however its codes spread."""
    x = np.array([[10.0, 0, 5], [20.0, 2, 5], [30.0, 1, 5]], np.float32)
    mean, std = fit_standardisation(x, cardinalities=(None, 3, None))
    np.testing.assert_allclose(mean, [20, 0, 5])
    np.testing.assert_allclose(std, [np.sqrt(200 / 3), 1, 1])


def test_higgs_size_and_fast_path_match_the_keras_model(higgs):
    assert 1_010_000 < higgs.n_parameters < 1_030_000
    x = rows(17, 30)
    keras_model = ModelBundle(BUILTIN_SPECS["higgs"], seed=7, engine="tensorflow").model
    assert np.allclose(higgs.predict_proba(x), keras_model(x, training=False).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="expects rows of 30 features, got an array of shape \\(2, 29\\)"):
        higgs.predict_proba(rows(2, 29))


def test_initial_weights_are_deterministic_per_seed():
    a, b, c = (ModelBundle(SMALL, seed=s).get_weights() for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["hidden_0/kernel"], c["hidden_0/kernel"])


def test_safetensors_round_trip_and_unreadable_file(tmp_path):
    source, target = ModelBundle(SMALL, seed=1), ModelBundle(SMALL, seed=2)
    source.set_weights(source.get_weights() | standardisation_weights(*fit_standardisation(rows(100) * 3 + 1)))
    (tmp_path / "w.safetensors").write_bytes(weights_to_bytes(source.get_weights()))
    target.set_weights(weights_from_bytes((tmp_path / "w.safetensors").read_bytes()))
    assert np.array_equal(source.predict_proba(rows(5)), target.predict_proba(rows(5)))
    with pytest.raises(WeightsError, match="not a readable safetensors payload"):
        weights_from_bytes(b"\x00" * 16)


def test_set_weights_checks_names_and_shapes_before_assigning_anything():
    bundle = ModelBundle(SMALL, seed=1)
    before = bundle.get_weights()
    bad = {k: v + 1 for k, v in before.items()}
    bad["output/bias"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match=r"tensor 'output/bias' has shape \(3,\), model 'small' expects \(2,\)"):
        bundle.set_weights(bad)
    assert all(np.array_equal(before[k], v) for k, v in bundle.get_weights().items())
    with pytest.raises(WeightsError, match=r"missing \['output/bias'\], unknown \['extra'\]"):
        bundle.set_weights({**{k: v for k, v in before.items() if k != "output/bias"}, "extra": np.zeros(1)})


def test_standardisation_is_part_of_the_model_and_travels_with_the_weights():
    x = rows(200) * 5 + 3
    fitted, plain = ModelBundle(SMALL, seed=1), ModelBundle(SMALL, seed=1)
    fitted.set_weights(fitted.get_weights() | standardisation_weights(*fit_standardisation(x)))
    standardised = (x - x.mean(axis=0)) / x.std(axis=0)
    assert np.allclose(fitted.predict_proba(x), plain.predict_proba(standardised), atol=1e-5)
    stats = {"mean": x.mean(axis=0).tolist(), "std": x.std(axis=0).tolist()}
    from_spec = ModelBundle(ModelSpec.model_validate(SMALL.model_dump() | {"standardisation": stats}), seed=1)
    assert np.allclose(from_spec.predict_proba(x), fitted.predict_proba(x), atol=1e-5)


def test_train_on_batch_learns_and_honours_sample_weights():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 10)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    bundle = ModelBundle(SMALL, seed=1)
    before = bundle.get_weights()
    bundle.train_on_batch(x, y, sample_weight=np.zeros(len(y)))  # zero weights: zero gradient, no momentum in `small`
    assert all(np.array_equal(before[k], v) for k, v in bundle.get_weights().items())
    losses = [bundle.train_on_batch(x, y) for _ in range(60)]
    assert isinstance(losses[0], float) and losses[-1] < 0.6 * losses[0]
    assert (bundle.predict_proba(x).argmax(axis=1) == y).mean() > 0.9
