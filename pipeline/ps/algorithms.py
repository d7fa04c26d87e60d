"""Distributed training algorithms, each one class: a worker loop (:meth:`Algorithm.run`) and the
server half, an :class:`UpdateRule` (:meth:`Algorithm.rule`) that the parameter server applies to
commits without knowing which algorithm sent them.

A worker drives any :class:`LocalModel` (a model bundle, or the numpy
:class:`pipeline.ps.softmax.SoftmaxRegression`) against any :class:`~pipeline.ps.client.ClientApi` (TCP,
sharded, or in-process). Every commit carries the caller's tag (query id, batch id, worker id) and a
sequence number counted from ``tag.seq``, so a replayed Spark micro-batch is recognised by the server and
not trained twice.

Learned from dist-keras (``distkeras/workers.py``, ``parameter_servers.py``), with its bugs fixed:
DOWNPOUR there measured the delta before training the batch in hand and dropped the last partial
window; DynSGD's server read weights from a model object its commits never updated; nothing locked
the center variable consistently; errors were ``print(e)``-ed and training went on. Here deltas are
taken after the step, a partial window is committed at the end, the server's state is behind one
lock, and errors propagate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Protocol

import numpy as np

from pipeline.ps.protocol import Ack, CommitTag

if TYPE_CHECKING:  # the client module builds on the update rules here
    from pipeline.ps.client import ClientApi

Weights = Mapping[str, np.ndarray]


class CommitRejected(ValueError):
    """A well-formed commit the server will not apply (unknown tensor, wrong shape, out of round)."""


# ---------------------------------------------------------------------------------------------- contracts


class LocalModel(Protocol):
    """What a worker trains. ``train_on_batch`` takes one step of the model's own optimizer (plain SGD
    at ``learning_rate`` for the algorithms' math to hold) on ``mean_i(sample_weight_i * loss_i)`` --
    Keras's default ``sum_over_batch_size`` reduction. ``get_weights`` returns arrays the caller may
    keep; ``set_weights`` copies, it never keeps the caller's arrays."""

    def get_weights(self) -> dict[str, np.ndarray]: ...

    def set_weights(self, weights: Weights) -> None: ...

    def train_on_batch(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> Any: ...


# ------------------------------------------------------------------------------------- server-side rules


class UpdateRule:
    """The server half of an algorithm; this base rule adds the committed delta to the center.

    Called under the server's lock. ``center`` arrays are read-only and must not be changed: ``apply``
    returns a new dict (unchanged tensors may be shared) or ``None`` to hold the commit (pending).
    ``delta`` arrays are only valid during the call; copy what must be kept.
    """

    name: ClassVar[str] = "add"

    def apply(self, center: Weights, delta: Weights, *, worker_id: int, staleness: int) -> dict[str, np.ndarray] | None:
        return _added(center, delta)

    def view(self, center: Weights, worker_id: int) -> Weights:
        """What a pull by ``worker_id`` returns."""
        return center

    def published(self, center: Weights) -> Weights:
        """The weights handed to the publish callback."""
        return center

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Tensors and JSON the rule needs back after a restart (copies: saved outside the lock)."""
        return {}, {}

    def restore(self, tensors: Weights, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state`."""


class StalenessScaled(UpdateRule):
    """DynSGD's rule: the delta is scaled by ``1 / (staleness + 1)`` before it is added."""

    name = "staleness_scaled"

    def apply(self, center, delta, *, worker_id, staleness):
        return _added(center, delta, 1.0 / (staleness + 1))


class SynchronousRound(UpdateRule):
    """Holds commits until each of ``workers`` distinct workers committed once, then adds their SUM as
    one update. A commit based on an older round, or a second one from the same worker, is rejected."""

    name = "synchronous_round"

    def __init__(self, workers: int):
        self.workers = workers
        self._sum: dict[str, np.ndarray] = {}
        self._committed: set[int] = set()

    def apply(self, center, delta, *, worker_id, staleness):
        if staleness:
            raise CommitRejected(f"worker {worker_id} committed a delta {staleness} round(s) old")
        if worker_id in self._committed:
            raise CommitRejected(f"worker {worker_id} already committed in this round")
        for name, value in delta.items():
            if name in self._sum:
                self._sum[name] += value
            else:
                self._sum[name] = np.array(value)  # a copy in the center's precision
        self._committed.add(worker_id)
        if len(self._committed) < self.workers:
            return None
        total, self._sum, self._committed = self._sum, {}, set()
        return _added(center, total)

    def state(self):
        return {name: value.copy() for name, value in self._sum.items()}, {"committed": sorted(self._committed)}

    def restore(self, tensors, state):
        self._sum = {name: np.array(value, dtype=np.float32) for name, value in tensors.items()}
        self._committed = set(state.get("committed", []))


class ReplicaSlots(UpdateRule):
    """Ensemble's rule: each worker id owns a replica (its slot), starting from the center; a pull
    returns the caller's replica and a commit moves only that one. The published weights are the
    members, named ``member<worker_id>/<tensor>``; the center itself stays the common start."""

    name = "replica_slots"

    def __init__(self) -> None:
        self._slots: dict[int, Weights] = {}

    def apply(self, center, delta, *, worker_id, staleness):
        self._slots[worker_id] = _added(self._slots.get(worker_id, center), delta)
        return dict(center)

    def view(self, center, worker_id):
        return self._slots.get(worker_id, center)

    def published(self, center):
        members = {
            f"member{w}/{name}": value for w, slot in sorted(self._slots.items()) for name, value in slot.items()
        }
        return members or center

    def state(self):
        return {f"{w}/{name}": value for w, slot in self._slots.items() for name, value in slot.items()}, {}

    def restore(self, tensors, state):
        slots: dict[int, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            worker, name = key.split("/", 1)
            value.flags.writeable = False
            slots.setdefault(int(worker), {})[name] = value
        self._slots = {**slots}


def _added(center: Weights, delta: Weights, scale: float = 1.0) -> dict[str, np.ndarray]:
    new = dict(center)
    for name, value in delta.items():
        step = value if scale == 1.0 else value * np.float32(scale)
        new[name] = center[name] + step
        new[name].flags.writeable = False
    return new


def _difference(a: Weights, b: Weights, scale: float = 1.0) -> dict[str, np.ndarray]:
    """``(a - b) * scale`` for each tensor of ``b``."""
    if scale == 1.0:
        return {name: a[name] - b[name] for name in b}
    return {name: (a[name] - b[name]) * np.float32(scale) for name in b}


# ------------------------------------------------------------------------------------------ worker side


@dataclass
class WorkerReport:
    """What one worker run did: local steps, commits sent, how many the server skipped as replays,
    the largest and the summed staleness of its commits, and the last update counter it heard of."""

    steps: int = 0
    commits: int = 0
    skipped: int = 0
    max_staleness: int = 0
    total_staleness: int = 0
    counter: int = 0


class _Session:
    """One worker run: pulls into the model, tags commits with consecutive sequence numbers, tallies."""

    def __init__(self, model: LocalModel, client: ClientApi, tag: CommitTag, meta: Mapping[str, Any] | None):
        self.model = model
        self.client = client
        self.tag = tag
        self.meta = meta
        self.report = WorkerReport()
        self._rows = 0  # rows trained since the last commit: the server counts them per query

    def pull(
        self, *, into_model: bool = True, min_counter: int = 0, wait_s: float = 0.0
    ) -> tuple[dict[str, np.ndarray], int]:
        weights, counter = self.client.pull(worker_id=self.tag.worker_id, min_counter=min_counter, wait_s=wait_s)
        self.report.counter = counter
        if into_model:
            self.model.set_weights(weights)
        return weights, counter

    def train(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> None:
        self.model.train_on_batch(x, y, sample_weight=sample_weight)
        self.report.steps += 1
        self._rows += len(x) if sample_weight is None else int(np.count_nonzero(sample_weight))

    def commit(self, delta: Weights) -> Ack:
        ack = self.client.commit(delta, tag=self._next_tag(), meta=self._commit_meta())
        return self._tally(ack)

    def finish(self) -> WorkerReport:
        """End the run: commit what the client's encoding held back (error feedback, nothing lost)."""
        if self.report.commits and (ack := self.client.flush(tag=self._next_tag(), meta=self._commit_meta())):
            self._tally(ack)
        return self.report

    def _next_tag(self) -> CommitTag:
        return replace(self.tag, seq=self.tag.seq + self.report.commits)

    def _commit_meta(self) -> dict[str, Any]:
        return {**(self.meta or {}), "rows": self._rows}

    def _tally(self, ack: Ack) -> Ack:
        self._rows = 0
        self.report.commits += 1
        self.report.skipped += ack.status == "skipped"
        self.report.max_staleness = max(self.report.max_staleness, ack.staleness)
        self.report.total_staleness += ack.staleness
        self.report.counter = ack.counter
        return ack


@dataclass(frozen=True, kw_only=True)
class Algorithm(ABC):
    """A distributed training algorithm: ``run`` is one worker's loop, ``rule`` the server half.

    Parameters are dataclass fields named like the settings (``communication_window``,
    ``learning_rate``, ``rho``, ``momentum``, ``workers``) so :func:`from_settings` can fill them.

    Class-level capabilities tell the rest of the pipeline how to run an algorithm, so no caller
    compares algorithm names: ``synchronous`` (barrier rounds: every worker of a Spark job must run
    at once and take the same number of steps), ``streamable`` (the streaming training consumer can
    run it), ``owns_momentum`` (its worker loop keeps its own momentum, so the worker optimizer
    gets none), ``driver_commits`` (the server applies a commit from outside the workers, such as the
    standardisation the streaming driver fits), ``replica_per_worker`` (the server keeps a replica per
    worker id, so the model cannot be split over shards) and :meth:`largest_learning_rate`.
    """

    name: ClassVar[str]
    synchronous: ClassVar[bool] = False
    streamable: ClassVar[bool] = True
    owns_momentum: ClassVar[bool] = False
    driver_commits: ClassVar[bool] = True
    replica_per_worker: ClassVar[bool] = False

    @classmethod
    def largest_learning_rate(cls, rho: float) -> float:
        """The largest learning rate the algorithm accepts (with ``rho``, for the elastic ones)."""
        return float("inf")

    def rule(self) -> UpdateRule:
        return UpdateRule()

    @abstractmethod
    def run(
        self,
        model: LocalModel,
        client: ClientApi,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        tag: CommitTag = CommitTag(),
        meta: Mapping[str, Any] | None = None,
    ) -> WorkerReport:
        """Train ``model`` on ``batches`` (``(x, y)`` minibatches) against the server behind ``client``.

        Commits carry ``tag`` with ``seq`` counting up from ``tag.seq`` and ``meta`` (JSON, e.g. the
        Kafka offsets this run trains through) plus ``rows``: the rows trained since the last commit."""


@dataclass(frozen=True, kw_only=True)
class Sequential(Algorithm):
    """Plain local SGD on a single worker: pull once, train on every batch, commit the whole delta.

    The baseline every distributed method is measured against (dist-keras's ``SingleTrainer``; Bottou,
    "Large-Scale Machine Learning with Stochastic Gradient Descent", COMPSTAT 2010). With several
    workers it degenerates into DOWNPOUR with one commit per run.

    >>> from pipeline.ps.client import LocalClient
    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=2, classes=2)
    >>> client = LocalClient.serving(model.get_weights(), Sequential().rule())
    >>> Sequential().run(model, client, [(np.eye(2), np.array([0, 1]))] * 3)
    WorkerReport(steps=3, commits=1, skipped=0, max_staleness=0, total_staleness=0, counter=1)
    """

    name = "sequential"

    def run(self, model, client, batches, tag=CommitTag(), meta=None):
        session = _Session(model, client, tag, meta)
        start, _ = session.pull()
        for x, y in batches:
            session.train(x, y)
        if session.report.steps:
            session.commit(_difference(model.get_weights(), start))
        return session.finish()


@dataclass(frozen=True, kw_only=True)
class Ensemble(Sequential):
    """Independent replicas, no averaging: each worker id trains its own member of an ensemble.

    The server keeps one slot per worker id (:class:`ReplicaSlots`): a pull returns the caller's member
    (the center the first time), a commit moves only that member, and the published weights are all
    members (``member<id>/<tensor>``), to be combined by averaging their predicted probabilities.
    Worker ids must therefore be stable across runs (the Spark partition index). Bagging-style
    ensembles of independently trained networks: Hansen & Salamon, "Neural Network Ensembles",
    IEEE TPAMI 12(10), 1990; Breiman, "Bagging Predictors", Machine Learning 24, 1996.

    >>> from pipeline.ps.client import LocalClient
    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=2, classes=2)
    >>> client = LocalClient.serving(model.get_weights(), Ensemble().rule())
    >>> _ = Ensemble().run(model, client, [(np.eye(2), np.array([0, 1]))], tag=CommitTag(worker_id=7))
    >>> sorted(client.state.publication()[0])
    ['member7/bias', 'member7/kernel']
    """

    name = "ensemble"
    streamable = False  # members train independently, offline (``streamfit fit``)
    replica_per_worker = True
    driver_commits = False  # a commit moves only the committer's replica, never the center

    def rule(self) -> UpdateRule:
        return ReplicaSlots()


@dataclass(frozen=True, kw_only=True)
class Downpour(Algorithm):
    """DOWNPOUR SGD: train locally; every ``communication_window`` minibatches commit the accumulated
    delta ``W_local - W_pulled`` (measured after the step), then pull the center and continue from it.
    The server adds each delta as it arrives. A last partial window is committed too.

    Dean et al., "Large Scale Distributed Deep Networks", NIPS 2012.

    >>> from pipeline.ps.client import LocalClient
    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=2, classes=2)
    >>> client = LocalClient.serving(model.get_weights(), Downpour().rule())
    >>> Downpour(communication_window=2).run(model, client, [(np.eye(2), np.array([0, 1]))] * 5).commits
    3
    """

    communication_window: int = 5
    name = "downpour"

    def __post_init__(self) -> None:
        if self.communication_window < 1:
            raise ValueError("communication_window must be >= 1")

    def run(self, model, client, batches, tag=CommitTag(), meta=None):
        session = _Session(model, client, tag, meta)
        base, _ = session.pull()
        steps = 0
        for x, y in batches:
            session.train(x, y)
            steps += 1
            if steps == self.communication_window:
                session.commit(self._residual(model.get_weights(), base, steps))
                base, _ = session.pull()
                steps = 0
        if steps:
            session.commit(self._residual(model.get_weights(), base, steps))
        return session.finish()

    def _residual(self, weights: Weights, base: Weights, steps: int) -> dict[str, np.ndarray]:
        return _difference(weights, base)


@dataclass(frozen=True, kw_only=True)
class ADAG(Downpour):
    """Asynchronous Distributed Adaptive Gradients: DOWNPOUR whose accumulated delta is divided by the
    number of local steps in it (the communication window; a last partial window by its own length),
    so a commit is the average per-step update and stale commits disturb the center less.

    Hermans, "On Scalable Deep Learning and Parallelizing Gradient Descent", MSc thesis, Maastricht
    University / CERN, 2017.

    >>> from pipeline.ps.client import LocalClient
    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=2, classes=2)
    >>> client = LocalClient.serving(model.get_weights(), ADAG().rule())
    >>> ADAG(communication_window=4).run(model, client, [(np.eye(2), np.array([0, 1]))] * 4).counter
    1
    """

    name = "adag"

    def _residual(self, weights, base, steps):
        return _difference(weights, base, 1.0 / steps)


@dataclass(frozen=True, kw_only=True)
class DynSGD(Downpour):
    """DynSGD: DOWNPOUR workers, and a server that scales each commit by ``1 / (staleness + 1)`` where
    staleness = server counter - the counter the worker last pulled, so stale work counts for less.

    Jiang, Cui, Zhang, Yu, "Heterogeneity-aware Distributed Parameter Servers", SIGMOD 2017.

    >>> from pipeline.ps.client import LocalClient
    >>> client = LocalClient.serving({"w": np.zeros(1, np.float32)}, DynSGD().rule())
    >>> _ = client.pull()
    >>> _ = client.commit({"w": np.ones(1, np.float32)})            # staleness 0: adds 1
    >>> client.commit({"w": np.ones(1, np.float32)}, pulled=0).staleness   # 1 update since: adds 1/2
    1
    >>> client.pull()[0]["w"]
    array([1.5], dtype=float32)
    """

    name = "dynsgd"

    def rule(self) -> UpdateRule:
        return StalenessScaled()


@dataclass(frozen=True, kw_only=True)
class AEASGD(Algorithm):
    """Asynchronous Elastic Averaging SGD: workers explore locally; every ``communication_window``
    minibatches (and at the end of a run) a worker pulls the center, computes the elastic force
    ``E = alpha * (W - center)`` with ``alpha = learning_rate * rho``, moves ``W -= E`` and commits
    ``E``, which the server adds (``center += E``).

    Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NIPS 2015 (Algorithm 1).

    >>> from pipeline.ps.client import LocalClient
    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=2, classes=2)
    >>> algo = AEASGD(communication_window=2, learning_rate=0.1, rho=2.0)
    >>> client = LocalClient.serving(model.get_weights(), algo.rule())
    >>> algo.run(model, client, [(np.eye(2), np.array([0, 1]))] * 4).commits
    2
    """

    communication_window: int = 32
    learning_rate: float = 0.01
    rho: float = 5.0
    name = "aeasgd"

    def __post_init__(self) -> None:
        if self.communication_window < 1 or not 0 < self.alpha <= 1:
            raise ValueError(
                f"need communication_window >= 1 and 0 < learning_rate * rho <= 1 (alpha is {self.alpha:g})"
            )

    @property
    def alpha(self) -> float:
        return self.learning_rate * self.rho

    @classmethod
    def largest_learning_rate(cls, rho: float) -> float:
        return 1.0 / rho  # alpha = learning_rate * rho <= 1

    def run(self, model, client, batches, tag=CommitTag(), meta=None):
        session = _Session(model, client, tag, meta)
        session.pull()
        step = self._stepper(session)
        steps = 0
        for x, y in batches:
            step(x, y)
            steps += 1
            if steps == self.communication_window:
                self._elastic_exchange(session)
                steps = 0
        if steps:
            self._elastic_exchange(session)
        return session.finish()

    def _elastic_exchange(self, session: _Session) -> None:
        center, _ = session.pull(into_model=False)
        weights = session.model.get_weights()
        force = _difference(weights, center, self.alpha)
        session.model.set_weights(_difference(weights, force))
        session.commit(force)

    def _stepper(self, session: _Session) -> Callable[[np.ndarray, np.ndarray], None]:
        """The local update for one minibatch: a plain step here."""
        return session.train


@dataclass(frozen=True, kw_only=True)
class EAMSGD(AEASGD):
    """Asynchronous EAMSGD: AEASGD whose local steps use Nesterov momentum ``delta = momentum``:
    ``v = delta * v - lr * grad(W + delta * v); W += v`` (the gradient at the look-ahead point; the
    model's own SGD step there gives exactly ``W + v``). The elastic exchange is unchanged.

    Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NIPS 2015 (Algorithm 2).

    >>> from pipeline.ps.client import LocalClient
    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=2, classes=2)
    >>> algo = EAMSGD(communication_window=2, learning_rate=0.1, rho=2.0, momentum=0.9)
    >>> client = LocalClient.serving(model.get_weights(), algo.rule())
    >>> algo.run(model, client, [(np.eye(2), np.array([0, 1]))] * 3).commits
    2
    """

    momentum: float = 0.9
    name = "eamsgd"
    owns_momentum = True

    def _stepper(self, session):
        velocity: dict[str, np.ndarray] = {}

        def nesterov_step(x, y):
            weights = session.model.get_weights()
            if velocity:
                session.model.set_weights({k: w + np.float32(self.momentum) * velocity[k] for k, w in weights.items()})
            session.train(x, y)
            velocity.update(_difference(session.model.get_weights(), weights))

        return nesterov_step


@dataclass(frozen=True, kw_only=True)
class SynchronousAveraging(Algorithm):
    """Synchronous data-parallel SGD: in each round every one of ``workers`` workers pulls the center,
    takes one step on its share of the round's global batch and commits its delta; the server holds
    the commits (:class:`SynchronousRound`) and adds their SUM once all arrived, and workers wait for
    that before the next round.

    Each sample weighs ``1 / global_batch_size`` in the loss, so N deltas from an uneven split sum to
    exactly the full-batch gradient step. The worker passes ``sample_weight = len(x) /
    global_batch_size`` because the local loss is a mean over its own batch. Without
    ``global_batch_size`` (equal shares assumed) each worker's step is divided by ``workers`` and
    the SUM is the plain average of the workers' updates (model averaging).

    Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting Distributed Synchronous SGD", ICLR workshop
    2016 (arXiv:1604.00981); the averaging default: Zinkevich, Weimer, Smola, Li, "Parallelized
    Stochastic Gradient Descent", NIPS 2010.

    >>> from pipeline.ps.client import LocalClient
    >>> from pipeline.ps.softmax import SoftmaxRegression
    >>> model = SoftmaxRegression(features=2, classes=2)
    >>> algo = SynchronousAveraging(workers=1)
    >>> client = LocalClient.serving(model.get_weights(), algo.rule())
    >>> algo.run(model, client, [(np.eye(2), np.array([0, 1]))] * 3).counter
    3
    """

    workers: int = 2
    global_batch_size: int | None = None
    wait_s: float = 300.0
    name = "sync"
    synchronous = True
    driver_commits = False  # a round only completes with one commit from each worker

    def rule(self) -> UpdateRule:
        return SynchronousRound(self.workers)

    def run(self, model, client, batches, tag=CommitTag(), meta=None):
        session = _Session(model, client, tag, meta)
        next_round = 0
        for x, y in batches:
            start, counter = session.pull(min_counter=next_round, wait_s=self.wait_s)
            share = len(x) / self.global_batch_size if self.global_batch_size else 1.0 / self.workers
            session.train(x, y, np.full(len(x), share))  # float64: engines cast to their own precision
            session.commit(_difference(model.get_weights(), start))
            next_round = counter + 1
        if session.report.commits and client.lossy:  # one more round, of every worker's held-back residual
            session.pull(into_model=False, min_counter=next_round, wait_s=self.wait_s)
        return session.finish()


ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Sequential, SynchronousAveraging, Ensemble, Downpour, ADAG, DynSGD, AEASGD, EAMSGD)
}


STREAMABLE: tuple[str, ...] = tuple(sorted(name for name, cls in ALGORITHMS.items() if cls.streamable))
"""The algorithms the streaming training consumer runs (``streamfit train`` and ``up`` offer these)."""


def algorithm_class(name: str) -> type[Algorithm]:
    """The algorithm called ``name``; a ValueError listing the known ones otherwise.

    >>> algorithm_class("sync").synchronous, algorithm_class("ensemble").streamable
    (True, False)
    """
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}") from None


def from_settings(settings, **overrides: Any) -> Algorithm:
    """The algorithm named by ``settings.algorithm``, its parameters taken from same-named settings."""
    cls = algorithm_class(settings.algorithm)
    params = {f.name: getattr(settings, f.name) for f in fields(cls) if getattr(settings, f.name, None) is not None}
    return cls(**{**params, **overrides})
