"""The training algorithms: exact equivalences, hand-computed updates, and convergence with 2 workers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.bundle import standardisation_weights
from pipeline.dense import DenseEngine, initial_weights
from pipeline.ps.algorithms import (
    ADAG,
    AEASGD,
    ALGORITHMS,
    EAMSGD,
    STREAMABLE,
    Downpour,
    DynSGD,
    Ensemble,
    ReplicaSlots,
    Sequential,
    SynchronousAveraging,
    SynchronousRound,
    algorithm_class,
    from_settings,
)
from pipeline.ps.client import Client, LocalClient
from pipeline.ps.protocol import CommitTag
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.ps.softmax import SoftmaxRegression
from pipeline.settings import Settings
from pipeline.spec import BUILTIN_SPECS

FEATURES, CLASSES = 10, 3
TRUE_KERNEL = np.random.default_rng(42).standard_normal((FEATURES, CLASSES))


def labelled(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A linearly separable sample: the label is the argmax of a fixed linear map."""
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    return x, (x @ TRUE_KERNEL).argmax(axis=1)


def stream(seed: int, batches: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [labelled(rng, batch_size) for _ in range(batches)]


def softmax(learning_rate: float = 0.5) -> SoftmaxRegression:
    return SoftmaxRegression(FEATURES, CLASSES, learning_rate=learning_rate)


class Quadratic:
    """A one-parameter LocalModel with loss 0.5 * (w - target)^2, target = the batch's mean x: one SGD
    step is ``w += lr * (target - w)``, easy to follow by hand."""

    def __init__(self, learning_rate: float):
        self.learning_rate = np.float32(learning_rate)
        self.w = np.zeros(1, np.float32)

    def get_weights(self):
        return {"w": self.w.copy()}

    def set_weights(self, weights):
        self.w = np.array(weights["w"], np.float32)

    def train_on_batch(self, x, y, sample_weight=None):
        self.w = self.w - self.learning_rate * (self.w - np.float32(np.mean(x)))


def target(value: float, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.full(1, value, np.float32), np.zeros(1, np.int64))] * count


@pytest.mark.parametrize(
    "algorithm",
    [
        Downpour(communication_window=1),
        Downpour(communication_window=3),
        ADAG(communication_window=1),
        DynSGD(communication_window=1),
        Sequential(),
    ],
    ids=lambda a: f"{a.name}-{getattr(a, 'communication_window', '')}",
)
def test_one_worker_equals_sequential_sgd(algorithm):
    batches = stream(0, 20, 16)
    reference = softmax()
    for x, y in batches:
        reference.train_on_batch(x, y)
    model = softmax()
    client = LocalClient.serving(model.get_weights(), algorithm.rule())
    report = algorithm.run(model, client, batches)
    center, _ = client.pull()
    assert report.steps == 20
    for name, value in reference.get_weights().items():
        np.testing.assert_allclose(center[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_a_synchronous_round_is_one_sgd_step_on_the_concatenated_minibatch_in_float64(workers):
    """One round of the real worker loop and server rule (numpy engine and center in float64) equals one
    SGD step on all 23 rows, and equals seed 000's allreduce: the shards' gradient sums added and divided
    by the global batch. 23 rows over 4 workers are uneven shards (6, 6, 6, 5): each worker weighs its
    own mean loss by its share of the round, ``rows / 23``."""
    spec = BUILTIN_SPECS["small"]
    rng = np.random.default_rng(7)
    x, y = rng.normal(1.0, 2.0, (23, spec.n_features)), rng.integers(0, spec.n_classes, 23)
    start = initial_weights(spec, seed=5) | standardisation_weights(np.full(10, 1.0), np.full(10, 2.0))
    shards = list(zip(np.array_split(x, workers), np.array_split(y, workers)))

    def engine() -> DenseEngine:
        model = DenseEngine(spec, dtype=np.float64)
        model.set_weights(start)
        return model

    one_step = engine()
    one_step.train_on_batch(x, y)
    gradient_sum = sum(len(xs) * engine().gradients(xs, ys)[1] for xs, ys in shards)  # each shard's mean x rows
    allreduce = trained(start) - spec.optimizer.learning_rate * gradient_sum / len(x)

    algorithm = SynchronousAveraging(workers=workers, global_batch_size=len(x), wait_s=10)
    state = CenterState(start, algorithm.rule(), dtype=np.float64)
    with ThreadPoolExecutor(workers) as pool:
        reports = list(
            pool.map(
                lambda i: algorithm.run(engine(), LocalClient(state), [shards[i]], tag=CommitTag(worker_id=i)),
                range(workers),
            )
        )
    center, counter = state.pull()
    assert counter == 1 and [r.commits for r in reports] == [1] * workers
    assert [len(xs) for xs, _ in shards] == {1: [23], 2: [12, 11], 4: [6, 6, 6, 5]}[workers]
    expected = trained(one_step.get_weights())
    np.testing.assert_allclose(trained(center), expected, rtol=0, atol=1e-13)
    np.testing.assert_allclose(allreduce, expected, rtol=0, atol=1e-13)
    assert np.abs(expected - trained(start)).max() > 1e-2  # a wrong weighting could not hide under the tolerance


def trained(weights) -> np.ndarray:
    """The trained tensors of a dense model's ``weights`` as one vector, in order (its gradient's layout)."""
    return np.concatenate([value.ravel() for name, value in weights.items() if not name.startswith("standardise/")])


def test_synchronous_averaging_without_a_global_batch_size_averages_equal_shares():
    ((x, y),) = stream(2, 1, 8)
    reference = softmax()
    reference.train_on_batch(x, y)
    algorithm = SynchronousAveraging(workers=2, wait_s=10)
    state = CenterState(softmax().get_weights(), algorithm.rule())
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(
                lambda i: algorithm.run(
                    softmax(),
                    LocalClient(state),
                    [(x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4])],
                    tag=CommitTag(worker_id=i),
                ),
                range(2),
            )
        )
    for name, value in reference.get_weights().items():
        np.testing.assert_allclose(state.pull()[0][name], value, rtol=1e-5, atol=1e-6)


def test_dynsgd_scales_a_commit_by_one_over_staleness_plus_one():
    state = CenterState({"w": np.zeros(2, np.float32)}, DynSGD().rule())
    slow, fast = LocalClient(state), LocalClient(state)
    slow.pull()
    for _ in range(3):
        fast.pull()
        assert fast.commit({"w": np.ones(2, np.float32)}).staleness == 0
    ack = slow.commit({"w": np.full(2, 2.0, np.float32)})
    assert (ack.status, ack.staleness, ack.counter) == ("applied", 3, 4)
    np.testing.assert_array_equal(state.pull()[0]["w"], np.full(2, 3.0 + 2.0 / 4, np.float32))


def test_aeasgd_elastic_update_by_hand():
    algorithm = AEASGD(communication_window=2, learning_rate=0.5, rho=1.0)  # alpha = 0.5
    client = LocalClient.serving({"w": np.zeros(1, np.float32)}, algorithm.rule())
    first = Quadratic(0.5)
    algorithm.run(first, client, target(4.0, 2))
    # w: 0 -> 2 -> 3; center 0: E = 0.5 * (3 - 0) = 1.5; w = 1.5, center = 1.5
    assert first.w[0] == 1.5 and client.pull()[0]["w"][0] == 1.5
    second = Quadratic(0.5)
    algorithm.run(second, client, target(4.0, 2))
    # pulls 1.5: w -> 2.75 -> 3.375; E = 0.5 * (3.375 - 1.5) = 0.9375; w = 2.4375, center = 2.4375
    assert second.w[0] == 2.4375 and client.pull()[0]["w"][0] == 2.4375


def test_eamsgd_nesterov_and_elastic_update_by_hand():
    algorithm = EAMSGD(communication_window=2, learning_rate=0.5, rho=1.0, momentum=0.5)
    client = LocalClient.serving({"w": np.zeros(1, np.float32)}, algorithm.rule())
    model = Quadratic(0.5)
    report = algorithm.run(model, client, target(4.0, 3))
    # step 1: v = 0, gradient at 0: w = 2, v = 2
    # step 2: look-ahead 2 + 0.5 * 2 = 3 -> 3.5: v = 1.5, w = 3.5; exchange: E = 0.5 * 3.5 = 1.75, w = center = 1.75
    # step 3: look-ahead 1.75 + 0.75 = 2.5 -> 3.25: v = 1.5, w = 3.25; final exchange: E = 0.5 * (3.25 - 1.75) = 0.75
    assert model.w[0] == 2.5 and client.pull()[0]["w"][0] == 2.5
    assert (report.steps, report.commits) == (3, 2)


def test_a_replayed_run_is_not_applied_twice():
    batches = stream(3, 6, 8)
    algorithm = Downpour(communication_window=2)
    client = LocalClient.serving(softmax().get_weights(), algorithm.rule())
    tag = CommitTag("query-1", batch_id=17, worker_id=0)
    first = algorithm.run(softmax(), client, batches, tag=tag)
    after_first = client.pull()
    replay = algorithm.run(softmax(), client, batches, tag=tag)
    assert (first.commits, first.skipped) == (3, 0) and (replay.commits, replay.skipped) == (3, 3)
    after_replay = client.pull()
    assert after_replay[1] == after_first[1] == 3
    for name in after_first[0]:
        np.testing.assert_array_equal(after_replay[0][name], after_first[0][name])


def test_from_settings_fills_parameters_by_name():
    algorithm = from_settings(
        Settings(algorithm="eamsgd", learning_rate=0.02, rho=4.0, communication_window=7, momentum=0.5)
    )
    assert algorithm == EAMSGD(learning_rate=0.02, rho=4.0, communication_window=7, momentum=0.5)
    assert from_settings(Settings(algorithm="sync", workers=3)).rule().workers == 3
    with pytest.raises(ValueError, match="unknown algorithm"):
        from_settings(Settings(algorithm="hogwild"))
    with pytest.raises(ValueError, match="alpha"):
        AEASGD(learning_rate=0.5, rho=5.0)


TWO_WORKER_CASES = {
    "sequential": Sequential(),
    "sync": SynchronousAveraging(workers=2, global_batch_size=64, wait_s=30),
    "ensemble": Ensemble(),
    "downpour": Downpour(communication_window=3),
    "adag": ADAG(communication_window=3),
    "dynsgd": DynSGD(communication_window=3),
    "aeasgd": AEASGD(communication_window=4, learning_rate=0.5, rho=1.0),
    "eamsgd": EAMSGD(communication_window=4, learning_rate=0.5, rho=1.0, momentum=0.5),
}


@pytest.mark.parametrize("name", TWO_WORKER_CASES)
def test_every_algorithm_learns_a_separable_stream_with_two_workers(name):
    algorithm = TWO_WORKER_CASES[name]
    state = CenterState(softmax().get_weights(), algorithm.rule())
    with ParameterServer(state) as server:

        def worker(index):
            with Client(*server.address) as client:
                return algorithm.run(softmax(), client, stream(100 + index, 40, 32), tag=CommitTag("q", 0, index))

        with ThreadPoolExecutor(2) as pool:
            reports = list(pool.map(worker, range(2)))
    assert all(r.steps == 40 and r.commits >= 1 and r.skipped == 0 for r in reports)
    x, y = labelled(np.random.default_rng(7), 2000)
    evaluator = softmax()
    probabilities = []
    for worker_id in (0, 1) if algorithm.replica_per_worker else (0,):
        evaluator.set_weights(state.pull(worker_id=worker_id)[0])
        probabilities.append(evaluator.predict_proba(x))
    accuracy = float((np.mean(probabilities, axis=0).argmax(axis=1) == y).mean())
    assert accuracy >= 0.9, f"{name}: held-out accuracy {accuracy:.3f}"


# ------------------------------------------------------------------------------------------ capabilities

CAPABILITIES = ("synchronous", "streamable", "owns_momentum", "driver_commits", "replica_per_worker")
EXPECTED_CAPABILITIES = {  # name: the capabilities it has
    "sequential": {"streamable", "driver_commits"},
    "sync": {"synchronous", "streamable"},
    "ensemble": {"replica_per_worker"},
    "downpour": {"streamable", "driver_commits"},
    "adag": {"streamable", "driver_commits"},
    "dynsgd": {"streamable", "driver_commits"},
    "aeasgd": {"streamable", "driver_commits"},
    "eamsgd": {"streamable", "driver_commits", "owns_momentum"},
}


def test_every_algorithm_declares_its_capabilities():
    assert EXPECTED_CAPABILITIES.keys() == ALGORITHMS.keys()
    for name, cls in ALGORITHMS.items():
        assert {c for c in CAPABILITIES if getattr(cls, c)} == EXPECTED_CAPABILITIES[name], name
    assert STREAMABLE == tuple(sorted(set(ALGORITHMS) - {"ensemble"}))


def test_algorithm_class_looks_names_up():
    assert algorithm_class("eamsgd") is EAMSGD and algorithm_class("sync") is SynchronousAveraging
    with pytest.raises(ValueError, match="unknown algorithm 'hogwild'; choose one of sequential, sync"):
        algorithm_class("hogwild")


@pytest.mark.parametrize("name", TWO_WORKER_CASES)
def test_capabilities_agree_with_the_server_rule(name):
    """synchronous: the rule holds commits for a round; replica_per_worker: it keeps per-worker slots;
    driver_commits: a commit from an id no worker has (the driver's) moves the center at once."""
    algorithm = TWO_WORKER_CASES[name]
    rule = algorithm.rule()
    assert algorithm.synchronous == isinstance(rule, SynchronousRound)
    assert algorithm.replica_per_worker == isinstance(rule, ReplicaSlots)
    center = {"w": np.zeros(2, np.float32)}
    moved = rule.apply(center, {"w": np.ones(2, np.float32)}, worker_id=2**32 - 1, staleness=0)
    assert algorithm.driver_commits == (moved is not None and bool(moved["w"].any()))


def test_the_largest_learning_rate_keeps_the_elastic_step_at_most_one():
    for cls in (AEASGD, EAMSGD):
        assert cls.largest_learning_rate(rho=5.0) == pytest.approx(0.2)
        assert cls(learning_rate=cls.largest_learning_rate(rho=5.0), rho=5.0).alpha == pytest.approx(1.0)
    assert all(
        ALGORITHMS[name].largest_learning_rate(rho=5.0) == float("inf")
        for name in ALGORITHMS
        if name not in ("aeasgd", "eamsgd")
    )


def test_a_plan_follows_the_capabilities():
    """An algorithm that owns its momentum gets a worker optimizer without any; only a synchronous one
    makes a barrier plan."""
    from pipeline.spec import BUILTIN_SPECS
    from pipeline.training import TrainingPlan

    spec = BUILTIN_SPECS["small"].model_copy(
        update={"optimizer": BUILTIN_SPECS["small"].optimizer.model_copy(update={"momentum": 0.5})}
    )
    for name, cls in ALGORITHMS.items():
        plan = TrainingPlan.create(spec, algorithm=name, addresses=[], momentum=0.7)
        assert plan.spec.optimizer.momentum == (0.0 if cls.owns_momentum else 0.7), name
        assert plan.synchronous == cls.synchronous, name
    assert TrainingPlan.create(spec, algorithm="adag", addresses=[]).spec.optimizer.momentum == 0.5
    with pytest.raises(ValueError, match="unknown algorithm"):
        TrainingPlan.create(spec, algorithm="hogwild", addresses=[])
