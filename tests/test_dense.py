"""The numpy engine (pipeline/dense.py) against the TensorFlow one: same predictions for every built-in
and random dense spec, same verdicts on extreme inputs, and processes that predict or train never import
TensorFlow (training's own tests: tests/test_dense_training.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline import dense
from pipeline.bundle import ModelBundle, fit_standardisation, standardisation_weights
from pipeline.events import probability_problems, standardisation_problems
from pipeline.spec import BUILTIN_SPECS, ModelSpec
from tests.helpers import ROOT

TIGHT = {"rtol": 1e-5, "atol": 1e-6}  # float32: the engines differ only in summation order


def random_spec(rng: np.random.Generator) -> ModelSpec:
    """Half of them with some categorical features (one-hot encoded inside the model)."""
    hidden = rng.integers(1, 80, size=rng.integers(1, 5)).tolist()
    names = [f"x{i}" for i in range(rng.integers(1, 40))]
    categorical = {name: int(rng.integers(2, 13)) for name in names if rng.random() < 0.3} if rng.random() < 0.5 else {}
    return ModelSpec(
        name="random",
        feature_names=names,
        categorical=categorical,
        classes=list(range(rng.integers(2, 7))),
        builder_args={"hidden": hidden, "dropout": float(rng.choice([0.0, 0.3]))},
    )


def random_weights(spec: ModelSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights at the scales of a trained model (kernels ~ 1/sqrt(fan-in), so logits stay in
    the tens, where float32 rounding is ~1e-6), with a fitted (non-identity) standardisation."""
    weights = {
        name: rng.normal(scale=rng.uniform(0.3, 3) / np.sqrt(shape[0] if len(shape) == 2 else 4), size=shape).astype(
            np.float32
        )
        for name, shape in spec.weight_shapes.items()
    }
    weights["standardise/mean"] *= 100
    weights["standardise/std"] = rng.uniform(1e-3, 1e3, spec.n_features).astype(np.float32)
    return weights


def engines(spec: ModelSpec, weights: dict[str, np.ndarray]) -> tuple[ModelBundle, ModelBundle]:
    pair = ModelBundle(spec), ModelBundle(spec, engine="tensorflow")
    for bundle in pair:
        bundle.set_weights(weights)
    return pair


def inputs(spec: ModelSpec, weights: dict[str, np.ndarray], rng: np.random.Generator, n: int = 300) -> np.ndarray:
    """Rows around the standardisation's mean, a few of them far out; every category's code in turn."""
    z = rng.standard_t(3, size=(n, spec.n_features))
    x = (weights["standardise/mean"] + z * weights["standardise/std"]).astype(np.float32)
    for j, k in enumerate(spec.cardinalities):
        if k is not None:
            x[:, j] = np.arange(n) % k
    return x


def test_builtin_specs_run_in_numpy_and_start_from_the_same_weights_in_both_engines():
    for spec in BUILTIN_SPECS.values():
        numpy_bundle, tf_bundle = ModelBundle(spec, seed=4), ModelBundle(spec, seed=4, engine="tensorflow")
        assert numpy_bundle.engine == "numpy" and dense.supports(spec)
        a, b = numpy_bundle.get_weights(), tf_bundle.get_weights()
        assert list(a) == list(spec.weight_shapes) and all(np.array_equal(a[k], b[k]) for k in a)
        assert numpy_bundle.n_parameters == tf_bundle.n_parameters == sum(v.size for v in a.values())
        kernel = a["hidden_0/kernel"]  # Glorot-uniform, zero biases
        assert np.abs(kernel).max() <= np.sqrt(6 / sum(kernel.shape)) and not np.any(a["hidden_0/bias"])
        with pytest.raises(AttributeError, match="engine='tensorflow'"):
            numpy_bundle.model  # noqa: B018 - the attribute access itself must raise


@pytest.mark.parametrize("name", sorted(BUILTIN_SPECS))
def test_builtin_specs_predict_the_same_in_numpy_and_tensorflow(name):
    spec, rng = BUILTIN_SPECS[name], np.random.default_rng(1)
    weights = random_weights(spec, rng)
    numpy_bundle, tf_bundle = engines(spec, weights)
    for n in (1, 7, 1000):
        x = inputs(spec, weights, rng, n)
        np.testing.assert_allclose(numpy_bundle.predict_proba(x), tf_bundle.predict_proba(x), **TIGHT)
    x = inputs(spec, weights, rng)
    fitted = standardisation_weights(*fit_standardisation(x))
    for bundle in (numpy_bundle, tf_bundle):
        bundle.set_weights(bundle.get_weights() | fitted)
    for got, want in zip(numpy_bundle.standardisation(), tf_bundle.standardisation()):
        assert np.array_equal(got, want)
    np.testing.assert_allclose(numpy_bundle.predict_proba(x), tf_bundle.predict_proba(x), **TIGHT)


@pytest.mark.parametrize("seed", range(12))
def test_random_specs_predict_the_same_in_numpy_and_tensorflow(seed):
    rng = np.random.default_rng(seed)
    spec = random_spec(rng)
    weights = random_weights(spec, rng)
    numpy_bundle, tf_bundle = engines(spec, weights)
    x = inputs(spec, weights, rng)
    got, want = numpy_bundle.predict_proba(x), tf_bundle.predict_proba(x)
    assert got.dtype == want.dtype == np.float32 and got.shape == (len(x), spec.n_classes)
    np.testing.assert_allclose(got, want, **TIGHT)
    assert all(np.array_equal(numpy_bundle.get_weights()[k], v) for k, v in tf_bundle.get_weights().items())


def test_categorical_features_are_one_hot_not_magnitudes_in_both_engines():
    """A categorical feature's code selects its own first-layer weights: codes 0 and 2 are as far apart as
    0 and 1 (a magnitude would put 2 twice as far), and its standardisation statistics are not applied."""
    spec = BUILTIN_SPECS["stagger"]
    weights = random_weights(spec, np.random.default_rng(3))
    x = np.array([[a, b, c] for a in range(3) for b in range(3) for c in range(3)], np.float32)
    for bundle in engines(spec, weights):
        first = bundle.predict_proba(x)
        bundle.set_weights(weights | {"standardise/mean": np.full(3, 7.0, np.float32)})
        np.testing.assert_array_equal(bundle.predict_proba(x), first)
    kernel = weights["hidden_0/kernel"]
    hidden = np.maximum(
        kernel[x[:, 0].astype(int)]
        + kernel[3 + x[:, 1].astype(int)]
        + kernel[6 + x[:, 2].astype(int)]
        + weights["hidden_0/bias"],
        0,
    )
    logits = hidden @ weights["output/kernel"] + weights["output/bias"]
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(first, expected / expected.sum(axis=1, keepdims=True), **TIGHT)


def overflow_free(weights: dict[str, np.ndarray], standardised: np.ndarray) -> np.ndarray:
    """Rows no layer can overflow in float32 whatever the order of its sums: every partial sum is at most
    ``|h| @ |kernel| + |bias|`` (in float64), kept under the float32 maximum."""
    h, free = standardised.astype(np.float64), np.ones(len(standardised), bool)
    kernels = [name for name in weights if name.endswith("/kernel")]
    for i, name in enumerate(kernels):
        kernel, bias = weights[name].astype(np.float64), weights[name.replace("kernel", "bias")].astype(np.float64)
        free &= (np.abs(h) @ np.abs(kernel) + np.abs(bias)).max(axis=1) < 0.99 * np.finfo(np.float32).max
        h = np.nan_to_num(h @ kernel + bias)
        h = np.maximum(h, 0) if i < len(kernels) - 1 else h
    return free


@pytest.mark.parametrize("seed", range(4))
def test_extreme_valid_inputs_get_the_same_verdicts_in_both_engines(seed):
    """Inputs at the edges of float32 (what the event validator lets through): the standardisation check
    is the same arithmetic in both engines; rows no layer can overflow are predicted alike; where a layer
    can overflow, whether it does depends on the order of a float32 sum (BLAS's or oneDNN's), so the two
    engines agree on most such rows, not all -- either way a non-finite row is refused, never answered."""
    spec, rng = BUILTIN_SPECS["small"], np.random.default_rng(seed)
    weights = random_weights(spec, rng) | {
        "standardise/mean": np.zeros(10, np.float32),
        "standardise/std": np.ones(10, np.float32),
    }
    weights["standardise/std"][3] = 1e-20  # f3 = 1e20 overflows once standardised; 3e38 elsewhere in the layers
    numpy_bundle, tf_bundle = engines(spec, weights)
    edges = np.array([3.4e38, -3.4e38, 3e38, -1e30, 1e20, 1e10, -1e-45, 1e-38, 0.0, 1.0], np.float32)
    x = rng.choice(edges, size=(3000, spec.n_features)).astype(np.float32)
    x[:1000] = rng.normal(size=(1000, spec.n_features))  # ordinary rows with one edge value each
    x[np.arange(1000), rng.integers(spec.n_features, size=1000)] = rng.choice(edges, size=1000)
    problems = standardisation_problems(x, *numpy_bundle.standardisation(), spec.feature_names)
    x = x[[p is None for p in problems]]
    assert 1000 < len(x) < 3000
    with np.errstate(all="raise"):  # the numpy engine computes inf/NaN silently, as TensorFlow does
        got = numpy_bundle.predict_proba(x)
    want = tf_bundle.predict_proba(x)
    refused = np.array([p is not None for p in probability_problems(got)])
    agree = refused == np.array([p is not None for p in probability_problems(want)])
    free = overflow_free(weights, (x - weights["standardise/mean"]) / weights["standardise/std"])
    assert free.sum() > 500 and not refused[free].any() and agree[free].all()
    np.testing.assert_allclose(got[free], want[free], **TIGHT)
    assert refused.sum() > 500 and agree[~free].mean() > 0.95
    np.testing.assert_allclose(got[~refused].sum(axis=1), 1, atol=1e-6)


def test_numpy_runs_only_dense_architectures_and_engines_are_named():
    with pytest.raises(ValueError, match="unknown engine 'jax'"):
        ModelBundle(BUILTIN_SPECS["small"], engine="jax")
    assert ModelBundle(BUILTIN_SPECS["small"], engine="tensorflow").engine == "tensorflow"


SERVING_AND_TRAINING_PROCESS = """
import sys, time, numpy as np, pyarrow as pa, orjson
from fastapi.testclient import TestClient
from pipeline.bundle import ModelBundle
from pipeline.events import FeatureSchema
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS

spec = BUILTIN_SPECS["small"]
settings = load_settings(home=sys.argv[1], model="small", kafka_bootstrap="127.0.0.1:1", registry_poll_s=30)
registry = Registry(settings.registry_url)
registry.create_model(spec)
registry.set_alias("small", "champion", registry.register("small", ModelBundle(spec, seed=1).get_weights()))
x = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int64)

# the serving app
from serving.app import create_app
with TestClient(create_app(settings)) as client:
    while client.get("/readyz").status_code != 200:  # the champion loads on the swap thread
        time.sleep(0.05)
    answer = client.post("/v1/models/small:predict", json={"instances": x[:3].tolist()})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3, answer.text

# a Spark inference worker's partition function, run here on one Arrow batch
from consumers.inference import predict_partition
events = [orjson.dumps({"id": str(i), "ts": 1, "features": row.tolist()}) for i, row in enumerate(x)]
batch = pa.RecordBatch.from_pydict({"value": events, "topic": ["t"] * 50, "partition": [0] * 50,
                                    "offset": list(range(50))})
out = pa.Table.from_batches(list(predict_partition(iter([batch]), settings.registry_url, "small", 1,
                                                   FeatureSchema(tuple(spec.feature_names), 2, 65536), "p", "d",
                                                   False, 4096)))
assert out.num_rows == 50 and set(out.column("topic").to_pylist()) == {"p"}

# the parameter server's held-out evaluation, the training driver's promotion gate
from pipeline.publishing import register_trained
from consumers.training import PromotionGate
versions, metrics = register_trained(registry, "small", ModelBundle(spec, seed=2).get_weights(), parent=1,
                                     algorithm="downpour", updates=1, holdout=(x, y))
assert 0 <= metrics["accuracy"] <= 1
registry.set_alias("small", "candidate", versions[0])
gate = PromotionGate(registry, "small", window=50, margin=0.0, auto_promote=False)
gate.remember(x, y)
assert gate.review(ModelBundle(spec))["events"] == 50

# a training worker's share against a parameter server, and the driver's search for poison events
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.training import TrainingPlan, local_model, poisonous_rows, train_rows
plan = TrainingPlan.create(spec, algorithm="downpour", addresses=[], batch_size=16)
with ParameterServer(CenterState(ModelBundle(spec).get_weights(), plan.algorithm().rule())) as server:
    report = train_rows(plan.model_copy(update={"addresses": [server.address]}), x, y, worker_id=0)
    assert report.steps == 4 and report.commits > 0
poison = np.concatenate([x[:20], np.full((1, 10), 3e38, np.float32)])
assert poisonous_rows(local_model(spec), ModelBundle(spec).get_weights(), poison, y[:21], 16) == [20]
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
"""


def test_processes_that_predict_and_train_never_import_tensorflow(tmp_path):
    """A fresh process runs serving, an inference worker's partition, held-out evaluation, the gate and a
    training worker on a real registry and parameter server; neither TensorFlow nor Keras is imported."""
    script = textwrap.dedent(SERVING_AND_TRAINING_PROCESS)
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
