"""Offline training on real Spark: every algorithm, 2 workers, reaches the accuracy the data allows."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.bundle import ModelBundle
from pipeline.fit import FitError, _plan, fit
from pipeline.ps.algorithms import ALGORITHMS
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS
from pipeline.training import train_rows
from tests.helpers import STREAMFIT

SPEC = BUILTIN_SPECS["small"]


def separable(rows: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable labels on shifted, scaled features (so standardisation matters)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, SPEC.n_features)) * 3 + 1).astype(np.float32)
    w = np.random.default_rng(99).normal(size=SPEC.n_features)
    return x, ((x - 1) @ w > 0).astype(np.int64)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    x, y = separable(6000)
    path = tmp_path_factory.mktemp("fit") / "separable.parquet"
    pq.write_table(pa.table({**{name: x[:, i] for i, name in enumerate(SPEC.feature_names)}, "label": y}), path)
    return path


def registry_with_small(root) -> Registry:
    registry = Registry(root)
    registry.create_model(SPEC)
    registry.set_alias("small", "champion", registry.register("small", ModelBundle(SPEC, seed=1).get_weights()))
    return registry


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_converges_with_two_workers(spark, data_file, tmp_path, algorithm):
    registry = registry_with_small(tmp_path / "registry")
    settings = load_settings(
        home=tmp_path, model="small", algorithm=algorithm, workers=2, epochs=4, batch_size=32, communication_window=4
    )
    result = fit(spark, settings, registry, data_file, holdout=0.2)

    assert result.holdout["accuracy"] >= 0.9, result
    assert result.rows + result.holdout["rows"] == 6000 and result.invalid_rows == 0
    assert [r["worker_id"] for r in result.workers] == [0, 1] and all(r["steps"] > 0 for r in result.workers)
    assert result.updates > 0 and all(r["skipped"] == 0 for r in result.workers)
    assert result.run_id.startswith("fit-")
    candidate = registry.resolve("small", "candidate")
    assert candidate == result.versions[0] and registry.aliases("small")["champion"] == 1
    meta = registry.meta("small", candidate)
    assert meta["algorithm"] == algorithm and meta["parent"] == 1 and meta["updates"] == result.updates
    # the registered weights really are the model that scored: re-evaluate them from the registry
    x, y = separable(6000)
    trained = registry.load("small", "candidate")
    assert float(np.mean(trained.predict_proba(x).argmax(axis=1) == y)) >= 0.9
    assert not np.allclose(trained.get_weights()["standardise/mean"], 0)  # fitted from the data


def test_a_retried_fit_task_is_not_applied_twice(tmp_path):
    """Spark re-running a task (lost executor, speculation) re-sends the same tags: all skipped."""
    settings = load_settings(
        home=tmp_path, model="small", algorithm="downpour", workers=2, batch_size=32, communication_window=2
    )
    plan = _plan(settings, SPEC, 320, "fit-run-1")
    state = CenterState(ModelBundle(SPEC, seed=1).get_weights(), plan.algorithm().rule())
    x, y = separable(320)
    with ParameterServer(state) as server:
        plan = plan.model_copy(update={"addresses": [server.address]})
        first = train_rows(plan, x, y, worker_id=1)
        counter = state.counter
        retried = train_rows(plan, x, y, worker_id=1)
    assert first.commits == counter > 0 and first.skipped == 0
    assert retried.commits == retried.skipped == first.commits and state.counter == counter
    assert state.stats()["queries"]["fit-run-1"] == {"offsets": {}, "rows": 320, "batch": 0}


def test_sync_refuses_fewer_rows_than_one_round(spark, tmp_path):
    registry = registry_with_small(tmp_path / "registry")
    x, y = separable(40)
    path = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({**{n: x[:, i] for i, n in enumerate(SPEC.feature_names)}, "label": y}), path)
    settings = load_settings(home=tmp_path, model="small", algorithm="sync", workers=2, batch_size=64)
    with pytest.raises(FitError, match="at least workers x batch_size"):
        fit(spark, settings, registry, path, holdout=0.0)


def test_fit_command_leaves_out_invalid_rows_and_registers_candidate(tmp_path, cli_env):
    x, y = separable(3000)
    lines = ["id," + ",".join(SPEC.feature_names) + ",label"]
    lines += [f"e{i}," + ",".join(f"{v:.5f}" for v in row) + f",{label}" for i, (row, label) in enumerate(zip(x, y))]
    lines += [
        "bad1," + ",".join(["nan"] * 10) + ",1",
        "bad2," + ",".join(["1"] * 10) + ",7",
        "bad3," + ",".join(["1"] * 10) + ",",
    ]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")

    done = subprocess.run(
        [
            *STREAMFIT,
            "fit",
            "--data",
            str(path),
            "--model",
            "small",
            "--algorithm",
            "downpour",
            "--workers",
            "2",
            "--epochs",
            "3",
            "--json",
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["invalid_rows"] == 3 and result["rows"] + result["holdout"]["rows"] == 3000
    assert result["holdout"]["accuracy"] >= 0.9

    shown = subprocess.run([*STREAMFIT, "models", "show", "small"], env=cli_env, capture_output=True, text=True)
    assert shown.returncode == 0 and "candidate" in shown.stdout


def test_fit_command_names_a_missing_label_column(tmp_path, cli_env):
    path = tmp_path / "nolabel.csv"
    path.write_text("a,b\n1,2\n")
    done = subprocess.run(
        [*STREAMFIT, "fit", "--data", str(path), "--model", "small"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "no label column 'label'" in done.stderr
