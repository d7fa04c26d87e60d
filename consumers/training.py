"""The training consumer: a Spark streaming query on ``events`` that trains the parameter server.

Each micro-batch is one Spark job (every extra job costs ~0.25 s on a small box): the events are
spread over ``workers`` partitions, and each worker validates its share (the same validator as
prediction and serving), then test-then-trains on the labelled events against the parameter server
(:func:`pipeline.training.train_rows`, the code ``streamfit fit`` runs): each minibatch is scored
by the worker's model (the center it last pulled plus its own steps since) just before it trains on
it, the way river's online learners are scored one event at a time. Unlabelled and invalid events
pass through a worker untouched. The driver collects the result: it dead-letters the invalid
events, feeds the per-event errors to a river ADWIN drift detector and keeps the labelled events
for the promotion gate, which scores a new ``candidate`` against the ``champion`` on the most
recent of them. The policies themselves live in :mod:`pipeline.policies`, free of Spark: prequential
scoring and drift (:mod:`~pipeline.policies.prequential`), the drift boost
(:mod:`~pipeline.policies.drift_boost`) and the promotion gate (:mod:`~pipeline.policies.promotion`).
The first labelled micro-batch of a model without standardisation is read once more before
training, to fit it. Commits are tagged with (query id, batch id, worker id, seq), so a
micro-batch Spark replays after a crash is skipped by the server; its dead letters are not written
again either: the driver enters every micro-batch through a dead-letter fence
(:mod:`pipeline.dlq_fence`), which tells a replay the events an earlier attempt dead-lettered, and
drops those (``replayed_dead_letters``). One record per micro-batch goes to ``training-metrics``.

On drift the workers' learning rate is multiplied by ``drift_boost`` until ``drift_boost_events``
labelled events after the drift point have trained (:class:`~pipeline.policies.drift_boost.DriftBoost`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import orjson
import pyarrow as pa

from pipeline.bundle import Standardisation, fit_standardisation, has_identity_standardisation
from pipeline.dlq import MAX_RAW_BYTES, dead_letter
from pipeline.dlq_fence import DeadLetterFence, source
from pipeline.errors import StreamfitError
from pipeline.events import Event, FeatureSchema, Rejection, ddl, standardisation_problems, validate
from pipeline.policies.drift_boost import DriftBoost
from pipeline.policies.prequential import BatchScore, Prequential
from pipeline.policies.promotion import PromotionGate
from pipeline.ps.algorithms import ALGORITHMS, STREAMABLE, WorkerReport, algorithm_class
from pipeline.ps.client import ServerError
from pipeline.ps.protocol import CommitTag, settings_secret
from pipeline.settings import Settings
from pipeline.spark import worker_heap
from pipeline.training import Scores, TrainingPlan, local_model, poisonous_rows, report_fields, rows_of, train_rows

if TYPE_CHECKING:
    from pipeline.spark.offsets import KafkaOffsetReader

log = logging.getLogger(__name__)

QUERY_NAME = "streamfit-training"
TRIGGER_S = 2.0
"""Default seconds between training micro-batches: fewer, larger batches cost less Spark overhead per event,
and training is not waited on the way predictions are."""
# arrival_us: the Kafka record's timestamp in microseconds, which orders events across partitions
CHECK_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("features", pa.list_(pa.float32())),
        ("label", pa.int64()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("arrival_us", pa.int64()),
        ("dead", pa.binary()),
    ]
)
CHECK_DDL = ddl(CHECK_SCHEMA)
ARRIVAL_ORDER = [("arrival_us", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
# a worker's output: its events (scored if labelled) and one row of kind "report" (its WorkerReport as JSON)
STEP_SCHEMA = pa.schema(
    [*CHECK_SCHEMA, ("correct", pa.bool_()), ("label_probability", pa.float32()), ("report", pa.string())]
)
STEP_DDL = ddl(STEP_SCHEMA)
STANDARDISE_WORKER = 2**32 - 1  # the worker id of the driver's one standardisation commit (workers are partitions)


class TrainingError(StreamfitError, RuntimeError):
    """The training consumer cannot run as configured; the message says why."""


def check_partition(
    batches: Iterator[pa.RecordBatch],
    schema: FeatureSchema,
    standardisation: Standardisation | None = None,
    max_raw_bytes: int = MAX_RAW_BYTES,
) -> Iterator[pa.RecordBatch]:
    """Validate Kafka rows (in a Spark Python worker): each row becomes ``train``
    (features and label), ``unlabelled`` (nothing else kept) or ``dead`` (its DLQ record). With the
    model's ``standardisation`` (mean, std), a labelled event it makes non-finite is dead too: the
    same rule as prediction and serving."""
    worker_heap.freeze()
    for batch in batches:
        rows = {"kind": [], "features": [], "label": [], "partition": [], "offset": [], "arrival_us": [], "dead": []}
        columns = [batch.column(c).to_pylist() for c in ("value", "topic", "partition", "offset")]
        columns.append(batch.column("timestamp").cast(pa.int64()).to_pylist())
        verdicts = [validate(raw, schema) for raw in columns[0]]
        if standardisation is not None:
            labelled = [i for i, v in enumerate(verdicts) if isinstance(v, Event) and v.label is not None]
            if labelled:
                x = np.array([verdicts[i].features for i in labelled], np.float32)
                for i, problem in zip(labelled, standardisation_problems(x, *standardisation, schema.names)):
                    verdicts[i] = Rejection(problem) if problem else verdicts[i]
        for verdict, raw, topic, partition, offset, arrival in zip(verdicts, *columns):
            if isinstance(verdict, Rejection):
                kind, features, label = "dead", None, None
                dead = dead_letter("train", verdict.reason, raw, topic, partition, offset, max_raw_bytes)
            else:
                kind = "unlabelled" if verdict.label is None else "train"
                features, label, dead = (
                    (verdict.features, verdict.label, None) if kind == "train" else (None, None, None)
                )
            for name, value in zip(rows, (kind, features, label, partition, offset, arrival, dead)):
                rows[name].append(value)
        yield pa.RecordBatch.from_pydict(rows, schema=CHECK_SCHEMA)


def score_and_train(
    batches: Iterator[pa.RecordBatch],
    plan: TrainingPlan,
    schema: FeatureSchema,
    topic: str,
    standardisation: Standardisation | None = None,
    max_raw_bytes: int = MAX_RAW_BYTES,
    skip: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[pa.RecordBatch]:
    """One worker's share of a micro-batch of Kafka rows (runs in a Spark Python worker): validate
    them, then test-then-train on the labelled events in arrival order (each scored by the worker's
    model just before it trains on it); every event is passed on (labelled ones with their score),
    then one ``report`` row. Validating here rather than in a step of its own saves a Python worker
    hop. Spark's round-robin repartition delivers a worker's share in no particular order, and a
    concept that moves during the micro-batch must be learned in the order it moved."""
    from pyspark import TaskContext

    checked = check_partition(batches, schema, standardisation, max_raw_bytes)
    table = pa.Table.from_batches(list(checked), schema=CHECK_SCHEMA).sort_by(ARRIVAL_ORDER)
    if skip:  # poison events the driver dead-letters: the other rows keep their places, so their commit tags too
        keys = zip(table.column("partition").to_pylist(), table.column("offset").to_pylist())
        table = table.filter(pa.array([key not in skip for key in keys]))
    is_train = pa.compute.equal(table.column("kind"), "train").to_numpy(zero_copy_only=False)
    x, y = rows_of(table.filter(is_train).to_batches(), plan.spec.n_features)
    worker_id = TaskContext.get().partitionId()
    plan = plan.model_copy(update={"commit_meta": {"offsets": _offsets_through(table, topic)}})
    if plan.synchronous:  # barrier rounds: every worker takes the same number of steps
        from pyspark import BarrierTaskContext

        fewest = min(int(n) for n in BarrierTaskContext.get().allGather(str(len(y))))
        plan = plan.model_copy(update={"steps_per_epoch": fewest // plan.batch_size})
    scores, rejected = Scores(len(y)), None
    try:
        report = train_rows(plan, x, y, worker_id, scores) if len(y) and plan.steps_per_epoch != 0 else WorkerReport()
    except ServerError as exc:  # the server refused a commit for its content: the driver retries, then quarantines
        if exc.code != "rejected":
            raise
        report, rejected, scores = WorkerReport(), str(exc), Scores(len(y))
    if len(y) and not report.steps:  # nothing trained (a sync round too small): the current center scores them
        model = local_model(plan.spec)
        with plan.client() as client:
            model.set_weights(client.pull(worker_id=worker_id)[0])
        scores.record(model.predict_proba(x), y)
    correct, label_probability = np.zeros(len(is_train), bool), np.zeros(len(is_train), np.float32)
    correct[is_train], label_probability[is_train] = scores.correct, scores.label_probability
    scored = pa.Table.from_arrays(
        [
            *table.columns,
            pa.array(correct, mask=~is_train),
            pa.array(label_probability, mask=~is_train),
            pa.nulls(len(is_train), pa.string()),
        ],
        schema=STEP_SCHEMA,
    )
    yield from scored.to_batches()
    fields = {**report_fields(worker_id, len(y) if report.steps else 0, report), "rejected": rejected}
    yield pa.RecordBatch.from_pylist([{"kind": "report", "report": orjson.dumps(fields).decode()}], schema=STEP_SCHEMA)


def warm_worker(batches: Iterator[pa.RecordBatch], spec) -> Iterator[pa.RecordBatch]:
    """Build this Python worker's model and trace its inference and training steps (a training step
    with zero sample weight changes nothing), passing the rows on."""
    worker_heap.freeze()
    model = local_model(spec)
    zeros = np.zeros((1, spec.n_features), np.float32)
    model.predict_proba(zeros)
    model.train_on_batch(zeros, np.zeros(1, np.int64), sample_weight=np.zeros(1, np.float32))
    yield from batches


class TrainingGauges:
    """Each ``training-metrics`` record as Prometheus series (``streamfit_train_*``), in their own
    registry: counters wherever a scrape could miss a micro-batch (prequential accuracy is
    ``rate(_correct_events_total) / rate(_scored_events_total)``, mean log loss
    ``rate(_log_loss_total) / rate(_scored_events_total)``), gauges for what is a state (the sliding
    window's accuracy, the learning rate), and the query's lag measured with ``reader`` (:mod:`pipeline.spark.lag`)."""

    GAUGES = {
        "batch_id": ("batch_id", "id of the last trained micro-batch"),
        "window_accuracy_ratio": ("window_accuracy", "prequential accuracy over the sliding window"),
        "learning_rate": ("learning_rate", "workers' learning rate"),
    }
    COUNTERS = {
        "events": ("events", "events consumed"),
        "trained_rows": ("rows", "labelled events trained on"),
        "scored_events": ("scored", "labelled events scored before training on them (prequential)"),
        "correct_events": ("correct", "scored events the model predicted right"),
        "log_loss": ("log_loss_sum", "log loss summed over the scored events"),
        "invalid_events": ("invalid", "events dead-lettered"),
        "unlabelled_events": ("unlabelled", "unlabelled events skipped"),
        "applied_updates": ("updates", "updates applied"),
        "drifts": ("drift", "drifts flagged"),
        "promotions": ("promoted", "candidates promoted by the gate"),
        "batch_retries": ("retries", "micro-batch tries repeated after the parameter server refused a commit"),
        "poison_events": ("poison", "events dead-lettered because training on them broke the model"),
    }

    def __init__(self, reader: Callable[[], KafkaOffsetReader] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        import pipeline.metrics  # noqa: F401  (no *_created series)
        from pipeline.spark.lag import QueryLag

        self.registry = registry = CollectorRegistry()
        self.gauges = {
            name: Gauge(f"streamfit_train_{name}", doc, registry=registry) for name, (_, doc) in self.GAUGES.items()
        }
        self.counters = {
            field: Counter(f"streamfit_train_{name}", doc, registry=registry)
            for name, (field, doc) in self.COUNTERS.items()
        }
        self.batch_duration = Histogram(
            "streamfit_train_batch_duration_seconds",
            "wall time of a training micro-batch",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.restarts = Counter(
            "streamfit_train_query_restarts",
            "restarts of the training query after a failure (broker or parameter server unreachable)",
            registry=registry,
        )
        self.lag = QueryLag("streamfit_train", reader)
        registry.register(self.lag)

    def update(self, record: dict) -> None:
        for (field, _), gauge in zip(self.GAUGES.values(), self.gauges.values()):
            if record.get(field) is not None:
                gauge.set(record[field])
        scored = record["rows"] if "accuracy" in record else 0
        values = {
            **record,
            "promoted": bool(record.get("gate") and record["gate"]["promoted"]),
            "scored": scored,
            "correct": round(record.get("accuracy", 0) * scored),
            "log_loss_sum": record.get("log_loss", 0) * scored,
        }
        for field, counter in self.counters.items():
            counter.inc(float(values.get(field) or 0))
        self.batch_duration.observe(record["seconds"])


class TrainingMetrics(TypedDict, total=False):
    """One training micro-batch's record on ``training-metrics`` (JSON), as README's table documents it.
    The score and training figures are there only when the micro-batch had labelled rows."""

    model: str
    batch_id: int
    rows: int  # labelled rows trained
    events: int
    invalid: int
    unlabelled: int
    retries: int
    poison: int
    replayed_dead_letters: int
    accuracy: float
    log_loss: float
    window_accuracy: float
    drift: bool
    drift_at_event: int | None
    counter_before: int
    counter_after: int
    updates: int
    replayed_commits: int
    trained_rows: int
    staleness_mean: float
    staleness_max: int
    learning_rate: float
    gate: dict | None
    versions_published: list[int]
    seconds: float
    phases: dict[str, float]
    ts: int


class TrainingJob:
    """Builds and starts the training query; ``history`` keeps the last micro-batches' metrics."""

    def __init__(self, spark, settings: Settings, bootstrap: str, registry=None):
        from pipeline.bundle import ModelBundle
        from pipeline.kafka import producer
        from pipeline.ps.client import connect
        from pipeline.registry import Registry
        from pipeline.spark.lag import LAG_TIMEOUT_S
        from pipeline.spark.offsets import KafkaOffsetReader
        from pipeline.spark.progress import ProgressReporter

        algorithm = ALGORITHMS.get(settings.algorithm)  # an unknown one is reported when the first plan is made
        if algorithm is not None and not algorithm.streamable:
            raise TrainingError(
                f"{settings.algorithm} trains offline only: use `streamfit fit`, or one of "
                f"{', '.join(STREAMABLE)} for streaming training"
            )
        self.spark, self.settings, self.bootstrap = spark, settings, bootstrap
        self.registry = registry or Registry(settings.registry_url)
        self.spec = self.registry.spec(settings.model)
        self.schema = FeatureSchema.of(self.spec, settings.max_event_bytes)
        self.client = connect(settings)
        self.bundle = ModelBundle(self.spec)
        self.prequential = Prequential(settings.prequential_window, settings.drift_delta)
        self.gate = PromotionGate(
            self.registry,
            settings.model,
            window=settings.gate_window,
            margin=settings.promotion_margin,
            auto_promote=settings.auto_promote,
            min_agreement=settings.gate_min_shadow_agreement,
            min_rows=settings.gate_min_shadow_rows,
            serving_url=settings.gate_serving_url,
            description_length=settings.gate_description_length,
        )
        self.producer = producer(bootstrap, settings.kafka_timeout_s, settings.kafka, client_id="streamfit-train")
        self.history: deque[TrainingMetrics] = deque(maxlen=1000)
        self.gauges = TrainingGauges(
            lambda: KafkaOffsetReader(bootstrap, [settings.topic_events], LAG_TIMEOUT_S, settings.kafka)
        )
        self.reporter = ProgressReporter(QUERY_NAME, self.gauges.lag, lambda _: None)
        spark.streams.addListener(self.reporter)
        self.boost = DriftBoost(settings.drift_boost, settings.drift_boost_events)
        self.warm_up_s = 0.0
        self._standardisation_of: tuple[str, Standardisation] | None = None  # (server incarnation, its value)
        self.fence: DeadLetterFence | None = None  # set by start_query(): it lives in the query's checkpoint
        self._known_versions = set(self.registry.versions(settings.model))

    def _process(self, frame, batch_id: int) -> None:
        started = time.monotonic()
        s = self.settings
        raw = frame.select("value", "topic", "partition", "offset", "timestamp")
        phases, mark = {}, [started]

        def lap(name: str) -> None:  # seconds per phase, for the record: where a micro-batch's time goes
            now = time.monotonic()
            phases[name], mark[0] = round(now - mark[0], 3), now

        dead_lettered = self.fence.enter(batch_id)  # before any dead letter: a replay skips what it wrote
        stats = self.client.stats()
        counter, incarnation = stats["counter"], stats["incarnation"]
        standardisation, standardised = self._standardisation(raw, batch_id, incarnation)
        if standardised:
            lap("standardise")
        boosted = self.boost.active
        plan = self._plan(batch_id, self._query_id(), boosted)
        table, poison, tries = self._train(raw, plan, batch_id, standardisation)
        lap("spark_job")
        table = table.sort_by(ARRIVAL_ORDER)  # reports (no arrival) last
        by_kind = {
            kind: table.filter(pa.compute.equal(table.column("kind"), kind))
            for kind in ("report", "dead", "unlabelled", "train")
        }
        reports = [orjson.loads(r) for r in by_kind["report"].column("report").to_pylist()]
        dead = by_kind["dead"].column("dead").to_pylist() + poison
        fresh = [value for value in dead if source(value) not in dead_lettered] if dead_lettered else dead
        futures = [self.producer.send(s.topic_dlq, value=value) for value in fresh]
        labelled = by_kind["train"]
        x, y = rows_of(labelled.to_batches(), self.spec.n_features)
        record: TrainingMetrics = {
            "model": s.model,
            "batch_id": batch_id,
            "rows": len(y),
            "events": table.num_rows - len(reports) + len(poison),  # poison events left the table
            "invalid": len(dead),
            "unlabelled": by_kind["unlabelled"].num_rows,
            "retries": tries - 1,
            "poison": len(poison),
            "replayed_dead_letters": len(dead) - len(fresh),
        }
        if len(y):
            score = self.prequential.score(
                labelled.column("correct").to_numpy(zero_copy_only=False),
                labelled.column("label_probability").to_numpy(zero_copy_only=False),
            )
            record.update(dataclasses.asdict(score))
            record.update(counter_before=counter, **self._training_figures(reports, plan))
            record["updates"] += standardised
            self.boost.trained(len(y))
            self._react_to_drift(score)
            self.gate.remember(x, y)
        for future in futures:
            future.get(timeout=s.kafka_timeout_s)  # dead letters acknowledged before the batch commits
        self._make_durable(batch_id, incarnation)
        lap("driver")
        record["gate"] = self.gate.review(self.bundle)
        versions = set(self.registry.versions(s.model))
        record["versions_published"] = sorted(versions - self._known_versions)
        self._known_versions = versions
        lap("gate")
        record.update(seconds=round(time.monotonic() - started, 3), phases=phases, ts=int(time.time() * 1000))
        self.producer.send(s.topic_training_metrics, key=s.model.encode(), value=orjson.dumps(record)).get(
            timeout=s.kafka_timeout_s
        )
        self.history.append(record)
        self.gauges.update(record)
        log.info(
            "batch %d: %d labelled (%d unlabelled, %d invalid), prequential %.3f (window %.3f), %d updates, drift=%s",
            batch_id,
            record["rows"],
            record["unlabelled"],
            record["invalid"],
            record.get("accuracy", float("nan")),
            record.get("window_accuracy", float("nan")),
            record.get("updates", 0),
            record.get("drift", False),
        )

    def _run_workers(
        self, raw, plan: TrainingPlan, standardisation: Standardisation, skip: frozenset[tuple[int, int]] = frozenset()
    ) -> pa.Table:
        # no `self` in what Spark ships to the workers
        step = functools.partial(
            score_and_train,
            plan=plan,
            schema=self.schema,
            topic=self.settings.topic_events,
            standardisation=standardisation,
            max_raw_bytes=self.settings.dlq_max_raw_bytes,
            skip=skip,
        )
        return raw.repartition(self.settings.workers).mapInArrow(step, STEP_DDL, barrier=plan.synchronous).toArrow()

    def _train(
        self, raw, plan: TrainingPlan, batch_id: int, standardisation: Standardisation
    ) -> tuple[pa.Table, list[bytes], int]:
        """The workers' output table, the dead letters of poison events, and the tries it took.

        When the server refuses a commit (its content: non-finite weights, say), the micro-batch is
        tried again, ``batch_attempts`` times in all (the tags make the server skip what it already
        applied). Then the events that break training are found on the driver
        (:func:`~pipeline.training.poisonous_rows`), dead-lettered, and the rest trained once more, the
        workers dropping the poison rows themselves: every other row keeps its worker and its commit
        tag, so what the refused tries applied is skipped, not trained twice. If even that is refused,
        the micro-batch's labelled events are dead-lettered with the refusal.
        A micro-batch never blocks the query for its content."""
        s = self.settings
        for attempt in range(1, s.batch_attempts + 1):
            table = self._run_workers(raw, plan, standardisation)
            refusal = _refusal(table)
            if refusal is None:
                return table, [], attempt
            log.warning(
                "batch %d: the parameter server refused a commit (%s); try %d of %d",
                batch_id,
                refusal,
                attempt,
                s.batch_attempts,
            )
        rows = raw.toArrow()
        poison = self._poison_events(rows, standardisation)
        log.error(
            "batch %d: refused %d times; %d poison event(s) dead-lettered, the rest trained again",
            batch_id,
            s.batch_attempts,
            len(poison),
        )
        table = self._run_workers(raw, plan, standardisation, frozenset(poison))
        refusal = _refusal(table)
        limit = s.dlq_max_raw_bytes
        dead = [
            dead_letter("train", reason, value, topic, partition, offset, limit)
            for (partition, offset), (reason, value, topic) in poison.items()
        ]
        if refusal is not None:
            log.error(
                "batch %d: still refused (%s); its labelled events go to the dead-letter topic", batch_id, refusal
            )
            train = table.filter(pa.compute.equal(table.column("kind"), "train"))
            reason = (
                f"training micro-batch {batch_id} was refused by the parameter server {s.batch_attempts + 1} "
                f"times ({refusal}); this event may be partly trained"
            )
            values = _values_by_key(rows)
            dead += [
                dead_letter("train", reason, values[key][0], values[key][1], *key, limit)
                for key in zip(train.column("partition").to_pylist(), train.column("offset").to_pylist())
            ]
            table = table.filter(pa.compute.not_equal(table.column("kind"), "train"))
        return table, dead, s.batch_attempts + 1

    def _poison_events(
        self, rows: pa.Table, standardisation: Standardisation
    ) -> dict[tuple[int, int], tuple[str, bytes, str]]:
        """``(partition, offset) -> (reason, raw value, topic)`` of the labelled events one SGD step on
        which, from the current center, leaves non-finite weights."""
        from pipeline.bundle import ModelBundle

        checked = check_partition(rows.to_batches(), self.schema, standardisation, self.settings.dlq_max_raw_bytes)
        checked = pa.Table.from_batches(list(checked), schema=CHECK_SCHEMA)
        train = checked.filter(pa.compute.equal(checked.column("kind"), "train"))
        x, y = rows_of(train.to_batches(), self.spec.n_features)
        optimizer = self.spec.optimizer.model_copy(update={"momentum": 0.0})  # no state a bad step could taint
        screen = ModelBundle(self.spec.model_copy(update={"optimizer": optimizer}))
        bad = poisonous_rows(screen, self.client.pull()[0], x, y, self.settings.batch_size)
        keys = list(zip(train.column("partition").to_pylist(), train.column("offset").to_pylist()))
        values = _values_by_key(rows)
        reason = "training on this event makes the model's weights non-finite (the parameter server refuses them)"
        return {keys[i]: (reason, *values[keys[i]]) for i in bad}

    def _make_durable(self, batch_id: int, incarnation: str) -> None:
        """Before Spark commits this micro-batch, the parameter server checkpoints what it trained:
        a crash of the server after this point loses none of it. If the server restarted during
        the micro-batch (its checkpoint may predate some of the micro-batch's commits), fail it:
        the query is restarted, the micro-batch replayed, and the server skips what it kept."""
        try:
            now = self.client.checkpoint().incarnation
        except ServerError as exc:
            if exc.code != "no_checkpoint":
                raise
            now = self.client.stats()["incarnation"]  # a server that keeps no checkpoint: nothing to make durable
        if now != incarnation:
            raise TrainingError(f"the parameter server restarted during micro-batch {batch_id}; it is replayed")

    def _react_to_drift(self, score: BatchScore) -> None:
        """On drift, the next micro-batches train with a boosted learning rate until ``drift_boost_events``
        labelled events since the drift point have trained (those of this micro-batch included)."""
        if score.drift:
            trained_since = self.boost.drifted(score.drift_at_event, self.prequential.events)
            reaction = (
                f"learning rate x{self.boost.factor:g} for the next {self.boost.left} labelled events"
                if self.boost.active
                else "no boost, the workers have trained through it"
            )
            log.warning(
                "drift detected at labelled event %d (%d trained since): %s",
                score.drift_at_event,
                trained_since,
                reaction,
            )

    def _standardisation(self, raw, batch_id: int, incarnation: str) -> tuple[Standardisation, int]:
        """The model's standardisation (mean, std) and the updates fitting it applied (0 or 1).

        It changes only at the commit below, so it is pulled once per parameter-server incarnation,
        not every micro-batch (a pull is the whole model: 4 MB for ``higgs``); a restarted server
        may have lost that commit, and is asked again. A model no data has been seen by yet
        (identity standardisation) gets its standardisation from the first labelled micro-batch, as
        ``streamfit fit`` does from the file: one commit, tagged like a worker's so a replayed batch
        does not apply it twice. An algorithm whose server takes no ``driver_commits`` (synchronous
        rounds only take workers' commits) keeps what the model has."""
        if self._standardisation_of is not None and self._standardisation_of[0] == incarnation:
            return self._standardisation_of[1], 0
        center, applied = self.client.pull()[0], 0
        if has_identity_standardisation(center) and algorithm_class(self.settings.algorithm).driver_commits:
            check = functools.partial(check_partition, schema=self.schema)
            labelled = raw.mapInArrow(check, CHECK_DDL).filter("kind = 'train'").select("features", "label")
            x, _ = rows_of(labelled.toArrow().to_batches(), self.spec.n_features)
            if not len(x):  # nothing to fit it on yet: the next micro-batch looks again
                return (center["standardise/mean"], center["standardise/std"]), 0
            x = _without_outliers(x.astype(np.float64))  # float64: squares of valid float32s near its limit overflow
            mean, std = fit_standardisation(x, self.spec.cardinalities)
            delta = {"standardise/mean": mean.astype(np.float32), "standardise/std": (std - 1.0).astype(np.float32)}
            applied = int(
                self.client.commit(delta, tag=CommitTag(self._query_id(), batch_id, STANDARDISE_WORKER)).status
                == "applied"
            )
            log.info("batch %d: standardisation fitted from %d labelled events", batch_id, len(x))
            center = self.client.pull()[0]  # as the server holds it: the workers standardise with that
        self._standardisation_of = incarnation, (center["standardise/mean"], center["standardise/std"])
        return self._standardisation_of[1], applied

    def _plan(self, batch_id: int, query_id: str, boosted: bool = False) -> TrainingPlan:
        """What every worker of a micro-batch needs; ``boosted`` after a drift (a larger learning rate)."""
        return micro_batch_plan(self.settings, self.spec, batch_id, query_id, self.boost if boosted else None)

    @staticmethod
    def _training_figures(reports: list[dict], plan: TrainingPlan) -> dict:
        commits = sum(r["commits"] for r in reports)
        skipped = sum(r["skipped"] for r in reports)
        return {
            "updates": commits - skipped,
            "replayed_commits": skipped,
            "trained_rows": sum(r["rows"] for r in reports),
            "staleness_mean": sum(r["total_staleness"] for r in reports) / commits if commits else 0.0,
            "staleness_max": max((r["max_staleness"] for r in reports), default=0),
            "counter_after": max((r["counter"] for r in reports), default=0),
            "learning_rate": plan.spec.optimizer.learning_rate,
        }

    def _query_id(self) -> str:
        """The streaming query's id: it survives restarts from the same checkpoint, so replayed
        batches carry the same tags, and a fresh checkpoint never collides with an old one's."""
        for query in self.spark.streams.active:
            if query.name == QUERY_NAME:
                return str(query.id)
        raise TrainingError("the training query is not active")

    def check_parameter_server(self) -> int:
        """The server's update counter, waiting up to ``ps_wait_s`` for one that is starting or
        restarting; a clear error when it stays unreachable."""
        deadline = time.monotonic() + self.settings.ps_wait_s
        while True:
            try:
                return self.client.stats()["counter"]
            except OSError as exc:
                if time.monotonic() < deadline:
                    log.info("parameter server not reachable yet (%s); retrying", exc)
                    time.sleep(0.5)
                    continue
                s = self.settings
                raise TrainingError(
                    f"parameter server at {s.ps_host}:{s.ps_port} ({s.ps_shards} shard(s)) is not "
                    f"reachable ({exc}): start it with `streamfit ps --model {s.model}`"
                ) from exc

    def warm_workers(self) -> float:
        """Start Spark's Python workers and build the model in each, before the first micro-batch:
        otherwise the first micro-batches wait ~4-8 s per worker for TensorFlow
        (:mod:`pipeline.spark.warm_workers`). Returns the seconds it took."""
        from pipeline.spark.warm_workers import warm

        return warm(self.spark, functools.partial(warm_worker, spec=self._plan(0, "").spec))

    def start(self, checkpoint: str, trigger: dict | None = None, starting_offsets: str | None = None):
        """Check the parameter server, warm the workers, then start the query."""
        self.check_parameter_server()
        self.warm_up_s = self.warm_workers()
        return self.start_query(checkpoint, trigger, starting_offsets)

    def start_query(self, checkpoint: str, trigger: dict | None = None, starting_offsets: str | None = None):
        """Start (or, after a failure, restart) the streaming query from ``checkpoint``."""
        from pipeline.spark.session import events_stream, every

        s = self.settings
        writer = (
            events_stream(self.spark, s, self.bootstrap, starting_offsets)
            .writeStream.queryName(QUERY_NAME)
            .foreachBatch(self._process)
            .option("checkpointLocation", checkpoint)
        )
        if self.fence is not None:  # a restarted query gets a new fence
            self.fence.close()
        self.fence = DeadLetterFence(
            checkpoint, self.bootstrap, s.topic_dlq, "train", timeout_s=s.kafka_timeout_s, properties=s.kafka
        )
        query = writer.trigger(**(trigger or every(s, TRIGGER_S))).start()
        self.reporter.query_id = str(query.id)
        return query

    def close(self) -> None:
        self.producer.close(timeout=self.settings.kafka_timeout_s)
        self.client.close()
        self.gauges.lag.close()
        if self.fence is not None:
            self.fence.close()


def micro_batch_plan(
    settings: Settings, spec, batch_id: int, query_id: str, boost: DriftBoost | None = None
) -> TrainingPlan:
    """What every worker of micro-batch ``batch_id`` needs; with a ``boost`` (after a drift), the
    learning rate it makes of the configured one."""
    s = settings
    algorithm = algorithm_class(s.algorithm)
    learning_rate = s.learning_rate or spec.optimizer.learning_rate
    if boost is not None:
        learning_rate = boost.learning_rate(learning_rate, largest=algorithm.largest_learning_rate(s.rho))
    params = {name: getattr(s, name) for name in ("communication_window", "rho", "workers")}
    if algorithm.synchronous:
        params["global_batch_size"] = s.workers * s.batch_size
    return TrainingPlan.create(
        spec,
        algorithm=s.algorithm,
        addresses=_addresses(s),
        learning_rate=learning_rate,
        momentum=s.momentum,
        algorithm_params=params,
        batch_size=s.batch_size,
        epochs=s.epochs,
        seed=s.seed + batch_id,
        io_timeout_s=s.ps_io_timeout_s,
        encoding=s.ps_encoding,
        topk_fraction=s.ps_topk_fraction,
        secret=secret.decode() if (secret := settings_secret(s)) else None,  # a plan carries text
        query_id=query_id,
        batch_id=batch_id,
    )


def _addresses(settings: Settings) -> list[tuple[str, int]]:
    from pipeline.ps.sharding import addresses

    return addresses(settings.ps_host, settings.ps_port, settings.ps_shards)


def _without_outliers(x: np.ndarray, spread: float = 1000.0) -> np.ndarray:
    """The rows of ``x`` within ``spread`` median absolute deviations of every feature's median: one
    extreme event (3e38 among values in [0, 1]) must not become the standardisation of the model.

    >>> x = np.array([[0.1], [0.5], [0.9], [3e38]])
    >>> _without_outliers(x).ravel().tolist()
    [0.1, 0.5, 0.9]
    """
    median = np.median(x, axis=0)
    deviation = np.abs(x - median)
    scale = np.median(deviation, axis=0)
    keep = (deviation <= spread * np.where(scale > 0, scale, np.abs(median) + 1.0)).all(axis=1)
    return x[keep] if keep.any() else x


def _refusal(table: pa.Table) -> str | None:
    """The first refusal a worker reported in its report row, or None."""
    reports = table.filter(pa.compute.equal(table.column("kind"), "report")).column("report").to_pylist()
    return next((r["rejected"] for r in map(orjson.loads, reports) if r.get("rejected")), None)


def _values_by_key(rows: pa.Table) -> dict[tuple[int, int], tuple[bytes, str]]:
    """``(partition, offset) -> (raw value, topic)`` of Kafka rows."""
    columns = (rows.column(c).to_pylist() for c in ("partition", "offset", "value", "topic"))
    return {(p, o): (v, t) for p, o, v, t in zip(*columns)}


def _offsets_through(table: pa.Table, topic: str) -> dict:
    """``{topic: {partition: next offset}}`` of a worker's events: what its commits are trained through."""
    through: dict[str, int] = {}
    for partition, offset in zip(table.column("partition").to_pylist(), table.column("offset").to_pylist()):
        through[str(partition)] = max(through.get(str(partition), 0), offset + 1)
    return {topic: through}
