"""One training worker: labelled rows in, pulls/trains/commits against the parameter server out.

The worker does not know how it is run. :func:`train_rows` takes numpy rows; :func:`arrow_trainer`
wraps it for Spark's ``mapInArrow`` (one partition = one worker, its id the partition index), used
alike by the offline ``streamfit fit`` job and the streaming training consumer. Each Python worker
keeps one model per spec and optimizer across tasks and micro-batches (its momentum included); dense
models train in numpy (:mod:`pipeline.dense`), so a worker never imports TensorFlow.

>>> import numpy as np
>>> from pipeline.bundle import ModelBundle
>>> from pipeline.ps.server import CenterState, ParameterServer
>>> from pipeline.spec import BUILTIN_SPECS
>>> spec = BUILTIN_SPECS["small"]
>>> plan = TrainingPlan.create(spec, algorithm="downpour", addresses=[], batch_size=32)
>>> state = CenterState(ModelBundle(spec).get_weights(), plan.algorithm().rule())
>>> with ParameterServer(state) as server:
...     plan = plan.model_copy(update={"addresses": [server.address]})
...     x = np.random.default_rng(0).normal(size=(320, 10)).astype(np.float32)
...     train_rows(plan, x, (x[:, 0] > 0).astype(np.int64), worker_id=0).steps
10
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from pipeline.events import ddl
from pipeline.ps.algorithms import ALGORITHMS, Algorithm, WorkerReport, algorithm_class
from pipeline.ps.client import Client, ShardedClient, client_for
from pipeline.ps.encoding import Encoding
from pipeline.ps.protocol import CommitTag
from pipeline.spark import worker_heap
from pipeline.spec import ModelSpec

# what a worker reports per partition (a DDL string: mapInArrow wants one)
REPORT_SCHEMA = pa.schema(
    [(name, pa.int64()) for name in ("worker_id", "rows", *(field.name for field in fields(WorkerReport)))]
)
REPORT_DDL = ddl(REPORT_SCHEMA)

_bundles: dict[str, Any] = {}  # per Python worker: one model (and its optimizer's momentum) per (spec, optimizer)


class TrainingPlan(BaseModel):
    """Everything a worker needs, picklable and small: Spark ships it to every task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: ModelSpec
    algorithm_name: str
    algorithm_params: dict[str, Any]
    addresses: list[tuple[str, int]]
    secret: str | None = None
    io_timeout_s: float = 60.0
    encoding: Encoding = "float32"  # how workers send commits (pipeline.ps.encoding)
    topk_fraction: float = 0.05
    batch_size: int = 64
    epochs: int = 1
    steps_per_epoch: int | None = None
    seed: int = 0
    query_id: str = ""
    batch_id: int = 0
    commit_meta: dict[str, Any] = {}  # sent with every commit, e.g. the Kafka offsets trained through

    @classmethod
    def create(
        cls,
        spec: ModelSpec,
        *,
        algorithm: str,
        addresses: list[tuple[str, int]],
        learning_rate: float | None = None,
        momentum: float | None = None,
        **kwargs: Any,
    ) -> TrainingPlan:
        """A plan whose worker optimizer is the spec's, with ``learning_rate``/``momentum`` overriding it.

        EAMSGD's local steps carry their own Nesterov momentum, so its optimizer gets none; the
        algorithm's ``learning_rate`` (EASGD's alpha = learning_rate * rho) is the optimizer's.
        """
        algorithm_cls = algorithm_class(algorithm)
        optimizer = spec.optimizer.model_copy(
            update={
                "learning_rate": learning_rate or spec.optimizer.learning_rate,
                "momentum": 0.0
                if algorithm_cls.owns_momentum
                else (spec.optimizer.momentum if momentum is None else momentum),
            }
        )
        params = {name: value for name, value in kwargs.pop("algorithm_params", {}).items() if value is not None}
        params["learning_rate"] = optimizer.learning_rate
        if momentum is not None:
            params["momentum"] = momentum
        accepted = algorithm_cls.__dataclass_fields__
        plan = cls(
            spec=spec.model_copy(update={"optimizer": optimizer}),
            algorithm_name=algorithm,
            algorithm_params={k: v for k, v in params.items() if k in accepted},
            addresses=addresses,
            **kwargs,
        )
        plan.algorithm()  # parameters are checked here, on the driver, not in a Spark task
        return plan

    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.algorithm_name](**self.algorithm_params)

    @property
    def synchronous(self) -> bool:
        """Whether the workers run in barrier rounds (a Spark barrier stage, equal step counts).

        >>> from pipeline.spec import BUILTIN_SPECS
        >>> def plan(algorithm):
        ...     return TrainingPlan.create(BUILTIN_SPECS["small"], algorithm=algorithm, addresses=[])
        >>> [name for name in ALGORITHMS if plan(algorithm=name).synchronous]
        ['sync']
        """
        return ALGORITHMS[self.algorithm_name].synchronous

    def client(self) -> Client | ShardedClient:
        secret = self.secret.encode() if self.secret else None
        return client_for(
            self.addresses,
            secret=secret,
            timeout_s=self.io_timeout_s,
            encoding=self.encoding,
            topk_fraction=self.topk_fraction,
        )


def local_model(spec: ModelSpec):
    """This Python worker's model for ``spec`` (built once, then reused)."""
    from pipeline.bundle import ModelBundle

    key = spec.model_dump_json()
    if key not in _bundles:
        _bundles[key] = ModelBundle(spec)
    return _bundles[key]


def minibatches(
    x: np.ndarray, y: np.ndarray, *, batch_size: int, epochs: int = 1, seed: int = 0, steps_per_epoch: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``epochs`` shuffled passes over the rows in ``batch_size`` slices (the last one may be short);
    ``steps_per_epoch`` caps each pass (synchronous rounds need every worker to take the same number).

    >>> [len(b) for b, _ in minibatches(np.zeros((5, 1)), np.zeros(5), batch_size=2, epochs=2)]
    [2, 2, 1, 2, 2, 1]
    """
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        starts = range(0, len(x), batch_size)
        for start in list(starts)[:steps_per_epoch]:
            index = order[start : start + batch_size]
            yield x[index], y[index]


class Scores:
    """Prequential outcomes of a worker's rows: each row's correctness and its label's probability
    under the model as it was just before the row trained it (``done`` rows so far, in order)."""

    def __init__(self, rows: int):
        self.correct = np.zeros(rows, bool)
        self.label_probability = np.zeros(rows, np.float32)
        self.done = 0

    def record(self, probabilities: np.ndarray, y: np.ndarray) -> None:
        end = self.done + len(y)
        self.correct[self.done : end] = probabilities.argmax(axis=1) == y
        self.label_probability[self.done : end] = probabilities[np.arange(len(y)), y]
        self.done = end


def test_then_train(
    model,
    x: np.ndarray,
    y: np.ndarray,
    scores: Scores,
    *,
    batch_size: int,
    epochs: int = 1,
    seed: int = 0,
    steps_per_epoch: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A streaming worker's minibatches: the first pass in stream order, each slice scored by the
    model just before it trains on it (what river's ``predict_one`` then ``learn_one`` does, a
    minibatch at a time), then ``epochs - 1`` shuffled passes like :func:`minibatches`."""
    for start in list(range(0, len(x), batch_size))[:steps_per_epoch]:
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        scores.record(model.predict_proba(xb), yb)
        yield xb, yb
    yield from minibatches(x, y, batch_size=batch_size, epochs=epochs - 1, seed=seed, steps_per_epoch=steps_per_epoch)


def train_rows(
    plan: TrainingPlan, x: np.ndarray, y: np.ndarray, worker_id: int, scores: Scores | None = None
) -> WorkerReport:
    """Train this worker's share ``(x, y)`` with the plan's algorithm against the parameter server;
    with ``scores``, test-then-train (:func:`test_then_train`; rows a capped pass never reaches
    are scored by the final model: they were not trained on either).

    Commits are tagged ``(plan.query_id, plan.batch_id, worker_id)``: a replayed task re-sends the
    same tags and the server skips what it already applied.
    """
    model = local_model(plan.spec)
    passes = {
        "batch_size": plan.batch_size,
        "epochs": plan.epochs,
        "seed": plan.seed + worker_id,
        "steps_per_epoch": plan.steps_per_epoch,
    }
    batches = minibatches(x, y, **passes) if scores is None else test_then_train(model, x, y, scores, **passes)
    tag = CommitTag(query_id=plan.query_id, batch_id=plan.batch_id, worker_id=worker_id)
    with plan.client() as client:
        report = plan.algorithm().run(model, client, batches, tag=tag, meta=plan.commit_meta or None)
    if scores is not None and scores.done < len(y):
        scores.record(model.predict_proba(x[scores.done :]), y[scores.done :])
    return report


def rows_of(batches: Iterable[pa.RecordBatch], n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack Arrow batches with ``features: list<float>`` and ``label: int`` into ``(x, y)`` arrays."""
    xs, ys = [], []
    for batch in batches:
        features = batch.column("features")
        xs.append(np.asarray(features.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, n_features))
        ys.append(np.asarray(batch.column("label").to_numpy(zero_copy_only=False), np.int64))
    if not xs:
        return np.zeros((0, n_features), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def arrow_trainer(plan: TrainingPlan):
    """The ``mapInArrow`` function: the partition's rows train one worker; yields its report (``REPORT_DDL``)."""

    def train_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        worker_heap.freeze()
        worker_id = TaskContext.get().partitionId()
        x, y = rows_of(batches, plan.spec.n_features)
        report = train_rows(plan, x, y, worker_id) if len(x) else WorkerReport()
        yield pa.RecordBatch.from_pylist([report_fields(worker_id, len(x), report)])

    return train_partition


def report_fields(worker_id: int, rows: int, report: WorkerReport) -> dict[str, int]:
    """One worker's report as ``REPORT_DDL``'s fields: which worker, how many rows it trained, what it did."""
    return {"worker_id": worker_id, "rows": rows, **vars(report)}


def poisonous_rows(model, center: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, batch_size: int) -> list[int]:
    """The rows one SGD step on which, taken from ``center``, leaves non-finite weights: the events
    a parameter server refuses to be trained with (valid numbers can still overflow a layer).
    Each minibatch that breaks the model is halved until single rows remain, so finding a few poison
    events among n costs about n / batch_size + log2(batch_size) steps. ``model`` must have a
    stateless optimizer (no momentum), or one bad step would taint every later one.

    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=1, classes=2, learning_rate=100.0)
    >>> x = np.array([[0.5], [3e38], [-0.5]], np.float32)  # a valid float32 whose step overflows
    >>> poisonous_rows(model, model.get_weights(), x, np.array([0, 1, 0]), batch_size=2)
    [1]
    """

    def breaks(index: np.ndarray) -> bool:
        model.set_weights(center)
        with np.errstate(all="ignore"):
            model.train_on_batch(x[index], y[index])
        return not all(np.isfinite(w).all() for w in model.get_weights().values())

    poison, pending = [], [np.arange(start, min(start + batch_size, len(x))) for start in range(0, len(x), batch_size)]
    while pending:
        index = pending.pop()
        if not breaks(index):
            continue
        if len(index) == 1:
            poison.append(int(index[0]))
        else:
            pending += [index[: len(index) // 2], index[len(index) // 2 :]]
    model.set_weights(center)
    return sorted(poison)


def evaluate(model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and log loss of ``model.predict_proba`` on labelled rows."""
    if not len(x):
        return {"accuracy": float("nan"), "log_loss": float("nan"), "rows": 0}
    probabilities = np.concatenate([model.predict_proba(x[i : i + 8192]) for i in range(0, len(x), 8192)])
    picked = np.clip(probabilities[np.arange(len(y)), y], 1e-7, 1.0)
    return {
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == y)),
        "log_loss": float(-np.mean(np.log(picked))),
        "rows": int(len(y)),
    }
