"""``streamfit predict``, ``train`` and ``fit`` on a real Spark standalone cluster: a master and two
workers started from the installed pyspark (:mod:`pipeline.spark.standalone`), each executor its own
JVM with its own Python workers, in its worker's directory.

The commands run as subprocesses with ``--master spark://...`` (this test process keeps its local
session for the other tests) and a *relative* home, so an executor that opened the registry by the
driver's working directory would fail. They are held to what the local tests check: one prediction
per valid event, equal to the model's output, one dead letter per invalid one; every labelled event
trained exactly once (the rows the parameter server applied for the query); and tasks that ran in
the executors of both workers.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess

import numpy as np
import orjson
import pytest

from pipeline.bundle import ModelBundle
from pipeline.kafka import ensure_topics
from pipeline.ps.algorithms import from_settings
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spark.standalone import StandaloneCluster
from pipeline.spec import BUILTIN_SPECS
from producers.sender import synthetic_events
from producers.synthetic import synthetic_rows
from tests.faults.harness import Part, logged
from tests.helpers import STREAMFIT
from tests.kafka_reader import read_topic
from tests.test_fit import separable
from tests.test_inference import _produce
from tests.test_training_consumer import invalid, produce
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

SPEC = BUILTIN_SPECS["small"]
HOME = ".streamfit"  # relative to each command's working directory: executors have their own


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """Master and two workers of one core and 512 MB; afterwards, every daemon (and the executors and
    Python workers in their process groups) is gone."""
    cluster = StandaloneCluster(workers=2, cores=1, memory="512m", directory=tmp_path_factory.mktemp("spark"))
    with cluster:
        pids = cluster.pids()
        yield cluster
    left = [pid for pid in pids if _running(pid)]
    assert not left, f"Spark daemons still running: {left}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def command(kafka, topic, tmp_path, standalone, cli_env):
    """``(env, workdir)`` for a streamfit command on the cluster, on fresh topics, with ``small``
    registered (version 1 champion) in the relative home under ``workdir``."""
    registry = Registry(tmp_path / HOME / "registry")
    registry.create_model(SPEC)
    registry.set_alias("small", "champion", registry.register("small", ModelBundle(SPEC, seed=3).get_weights()))
    ensure_topics(kafka, {topic: 3, topic + ".dlq": 1, topic + ".pred": 3, topic + ".metrics": 1})
    env = {
        **cli_env,
        "STREAMFIT_HOME": HOME,
        "STREAMFIT_MODEL": "small",
        "STREAMFIT_KAFKA_BOOTSTRAP": kafka,
        "STREAMFIT_KAFKA_SOURCE": "python",
        "STREAMFIT_TOPIC_EVENTS": topic,
        "STREAMFIT_TOPIC_DLQ": topic + ".dlq",
        "STREAMFIT_TOPIC_PREDICTIONS": topic + ".pred",
        "STREAMFIT_TOPIC_TRAINING_METRICS": topic + ".metrics",
        "STREAMFIT_TOPIC_RETENTION_MS": "-1",
        "STREAMFIT_MAX_OFFSETS_PER_TRIGGER": "2000",
        "STREAMFIT_SPARK_MASTER": standalone.url,
        "STREAMFIT_SPARK_CONF": json.dumps(standalone.app_conf),
    }
    return env, tmp_path


def _on_both_workers(standalone: StandaloneCluster, app_name: str) -> None:
    """The running application has an executor on each worker, and each ran tasks."""
    state = standalone.state()
    (app,) = [a for a in state["activeapps"] if a["name"] == app_name]
    assert [w["coresused"] for w in state["workers"]] == [1, 1], state["workers"]
    for n in range(2):
        logs = list((standalone.directory / f"worker-{n}" / app["id"]).glob("*/stderr"))
        assert logs and any("Running task" in log.read_text() for log in logs), f"no task ran on worker {n}"


def test_predict_on_the_cluster_answers_every_event_once_with_the_models_output(kafka, topic, standalone, command):
    env, workdir = command
    n, bad_every = 4900, 49  # and 100 invalid events
    x = _produce(kafka, topic, n, bad_every)
    predict = Part("predict", ["predict"], env, workdir, logged("Ctrl-C stops"), cwd=workdir)
    try:
        predict.start(180)
        predictions = [orjson.loads(r.value) for r in read_topic(kafka, topic + ".pred", n, timeout_s=150)]
        _on_both_workers(standalone, "streamfit-predict")
    finally:
        predict.stop()
    assert predict.process.returncode == 0, predict.tail()

    by_id = {p["id"]: p for p in predictions}
    assert len(predictions) == len(by_id) == n, "not exactly one prediction per valid event"
    served = np.array([by_id[f"i-{i}"]["probabilities"] for i in range(n)])
    bundle = Registry(workdir / HOME / "registry").load("small", 1)
    assert np.allclose(served, bundle.predict_proba(x), atol=1e-5)
    assert {p["model_version"] for p in predictions} == {1}
    dead = [orjson.loads(r.value) for r in read_topic(kafka, topic + ".dlq", 100)]
    assert len(dead) == len({(d["partition"], d["offset"]) for d in dead}) == 100
    assert {d["stage"] for d in dead} == {"predict"}


def test_train_on_the_cluster_trains_every_labelled_event_exactly_once(kafka, topic, standalone, command):
    env, workdir = command
    settings = load_settings(algorithm="adag", model="small")
    registry = Registry(workdir / HOME / "registry")
    state = CenterState(registry.weights("small")[1], from_settings(settings).rule())
    rows = itertools.islice(synthetic_rows("hyperplane", seed=4), 6000)
    events = list(synthetic_events(rows, "e", label_fraction=0.8, seed=1))
    labelled = sum(orjson.loads(e.value)["label"] is not None for e in events)
    produce(kafka, topic, itertools.chain(events, (invalid(k) for k in range(40))))

    with ParameterServer(state, port=0) as server:  # reached by address from the executors
        env = {**env, "STREAMFIT_PS_PORT": str(server.address[1]), "STREAMFIT_ALGORITHM": "adag"}
        train = Part("train", ["train", "--workers", "2"], env, workdir, logged("Ctrl-C stops"), cwd=workdir)
        try:
            train.start(180)
            wait_until(
                lambda: sum(q["rows"] for q in state.stats()["queries"].values()) >= labelled,
                150,
                interval_s=0.5,
                message=lambda: f"trained {state.stats()['queries']} of {labelled} labelled events:\n{train.tail()}",
            )
            _on_both_workers(standalone, "streamfit-train")
        finally:
            train.stop()
        assert train.process.returncode == 0, train.tail()
        (query,) = state.stats()["queries"].values()
        counter = state.stats()["counter"]

    assert query["rows"] == labelled, "a labelled event trained twice or not at all"
    metrics = [orjson.loads(r.value) for r in read_topic(kafka, topic + ".metrics", 1)]
    assert sum(m.get("rows", 0) for m in metrics) == sum(m.get("trained_rows", 0) for m in metrics) == labelled
    assert sum(m.get("invalid", 0) for m in metrics) == 40 and sum(m.get("events", 0) for m in metrics) == 6040
    assert counter == sum(m.get("updates", 0) for m in metrics) > 0
    dead = [orjson.loads(r.value) for r in read_topic(kafka, topic + ".dlq", 40)]
    assert len(dead) == 40 and {d["stage"] for d in dead} == {"train"}


def test_fit_on_the_cluster_reaches_its_parameter_server_on_the_drivers_address(command):
    env, workdir = command
    x, y = separable(3000)
    lines = [",".join(SPEC.feature_names) + ",label"]
    lines += [",".join(f"{v:.5f}" for v in row) + f",{label}" for row, label in zip(x, y)]
    (workdir / "train.csv").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [*STREAMFIT, "fit", "--data", "train.csv", "--algorithm", "downpour", "--workers", "2", "--epochs", "3"]
        + ["--json"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] + result["holdout"]["rows"] == 3000 and result["invalid_rows"] == 0
    assert result["holdout"]["accuracy"] >= 0.9
    assert sorted(w["worker_id"] for w in result["workers"]) == [0, 1]
