"""Offline training from a file, the dist-keras way: Spark partitions are workers of a parameter server.

The file (CSV or Parquet with one column per feature, or JSON lines in the ``events`` shape) becomes a
DataFrame of ``features``/``label``; rows that fail the model's schema are counted and left out. A
parameter server runs in this process (on a cluster, on the driver's address), seeded with the
registry's ``champion`` (whose standardisation is fitted to the data when it has none yet); the
DataFrame is repartitioned into ``workers`` partitions, each trained by
:func:`pipeline.training.arrow_trainer`; the center variable is then registered as a new version and
becomes the ``candidate``.

Commits are tagged like a streaming query's: query id = the run's id, batch id 0 (the whole file
is one batch), worker id = partition, and a sequence number, so a Spark task that is retried (or
speculatively run twice) re-sends tags the server already applied, and they are skipped.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.bundle import (
    Standardisation,
    has_identity_standardisation,
    standardisation_from_moments,
    standardisation_weights,
)
from pipeline.errors import StreamfitError
from pipeline.ps.algorithms import algorithm_class
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.publishing import register_trained
from pipeline.registry import Registry
from pipeline.settings import Settings
from pipeline.spec import ModelSpec
from pipeline.training import REPORT_DDL, TrainingPlan, arrow_trainer, rows_of
from producers.files import Columns, file_format


class FitError(StreamfitError, ValueError):
    """The data or the request cannot be trained on; the message says why."""


@dataclass
class FitResult:
    """What a fit did: the versions registered (the first is the candidate), held-out metrics, counts,
    and the parameter server's traffic."""

    run_id: str
    versions: list[int]
    holdout: dict[str, float]
    rows: int
    invalid_rows: int
    updates: int
    seconds: float
    workers: list[dict] = field(default_factory=list)
    bytes_in: int = 0  # frames the parameter server received (commits, pulls' requests) and sent
    bytes_out: int = 0


def training_frame(spark, path: str | Path, spec: ModelSpec, label_column: str = "label"):
    """``(frame of features array<float> + label int, number of invalid rows)`` read from ``path``."""
    from pyspark.sql import functions as F

    path = Path(path)
    try:
        kind = file_format(path)
    except ValueError as exc:
        raise FitError(str(exc)) from None
    if not path.exists():
        raise FitError(f"{path}: no such file")
    reader = spark.read.option("header", "true").option("inferSchema", "true") if kind == "csv" else spark.read
    raw = getattr(reader, kind)(str(path.absolute()))  # executors read it from their own directories
    if label_column not in raw.columns:
        raise FitError(f"{path}: no label column {label_column!r} (columns: {', '.join(raw.columns)})")
    features = _features_column(raw, spec, label_column, path)
    n = spec.n_features
    finite = F.forall(features, lambda v: v.isNotNull() & ~F.isnan(v) & (F.abs(v) != float("inf")))
    valid = (
        (F.size(features) == n)
        & finite
        & F.col(label_column).isNotNull()
        & (F.col(label_column) >= 0)
        & (F.col(label_column) < spec.n_classes)
        & (F.col(label_column) == F.col(label_column).cast("int"))
    )
    checked = raw.select(
        features.alias("features"), F.col(label_column).alias("label"), F.coalesce(valid, F.lit(False)).alias("valid")
    ).cache()
    invalid = checked.filter(~F.col("valid")).count()
    return checked.filter("valid").select("features", F.col("label").cast("int").alias("label")), invalid


def _features_column(raw, spec: ModelSpec, label_column: str, path: Path):
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, StructType

    if "features" in raw.columns:
        kind = raw.schema["features"].dataType
        if isinstance(kind, StructType):  # JSON objects {name: value}
            missing = [name for name in spec.feature_names if name not in kind.fieldNames()]
            if missing:
                raise FitError(f"{path}: features lack {', '.join(missing[:5])}")
            return F.array(*(F.col(f"features.`{name}`") for name in spec.feature_names)).cast("array<float>")
        if isinstance(kind, ArrayType):
            return F.col("features").cast("array<float>")
        raise FitError(f"{path}: column 'features' is {kind.simpleString()}, expected a list or an object")
    columns = Columns(label_column=label_column).features_of(raw.columns, spec.feature_names)
    if len(columns) != spec.n_features:
        raise FitError(
            f"{path}: model {spec.name!r} needs {spec.n_features} feature columns "
            f"(named {spec.feature_names[0]}..{spec.feature_names[-1]}, or all columns but "
            f"{label_column!r}, id, ts); found {len(columns)}"
        )
    return F.array(*(F.col(f"`{c}`").cast("float") for c in columns))


def standardisation_of(frame, cardinalities: Sequence[int | None]) -> Standardisation:
    """Per-feature mean and population std, computed by Spark (:func:`pipeline.bundle.standardisation_from_moments`;
    categorical features, by the spec's ``cardinalities``, keep the identity)."""
    from pyspark.sql import functions as F

    n_features = len(cardinalities)
    aggregates = [F.avg(F.col("features")[i]) for i in range(n_features)]
    aggregates += [F.stddev_pop(F.col("features")[i]) for i in range(n_features)]
    values = np.array(frame.agg(*aggregates).first(), dtype=np.float64)
    return standardisation_from_moments(values[:n_features], values[n_features:], cardinalities)


def fit(
    spark,
    settings: Settings,
    registry: Registry,
    data: str | Path,
    *,
    holdout: float = 0.1,
    label_column: str = "label",
    promote: bool = False,
    progress: Callable[[dict], None] | None = None,
    run_id: str | None = None,
) -> FitResult:
    """Train ``settings.model`` on ``data`` with ``settings.algorithm`` over ``settings.workers``
    Spark partitions; register the result (see the module docstring). ``progress`` gets the server's
    stats about once a second. ``run_id`` (default: a fresh ``fit-<hex>``) tags the commits."""
    started = time.monotonic()
    run_id = run_id or f"fit-{uuid.uuid4().hex[:12]}"
    model = settings.model
    spec = registry.spec(model)
    parent, weights = registry.weights(model, "champion")
    frame, invalid = training_frame(spark, data, spec, label_column)
    train, held = frame.randomSplit([1.0 - holdout, holdout], seed=settings.seed) if holdout > 0 else (frame, None)
    train = train.repartition(settings.workers).cache()
    rows = train.count()
    if rows == 0:
        raise FitError(f"{data}: no valid labelled rows to train on ({invalid} invalid)")
    if has_identity_standardisation(weights):
        weights |= standardisation_weights(*standardisation_of(train, spec.cardinalities))
    plan = _plan(settings, spec, rows, run_id)
    state = CenterState(weights, plan.algorithm().rule())
    secret = secrets.token_hex(16)
    with ParameterServer(
        state,
        host=_ps_host(spark, settings),
        port=0,
        secret=secret.encode(),
        max_frame_bytes=settings.ps_max_frame_bytes,
        link_bytes_per_s=settings.ps_link_mbps * 1e6 if settings.ps_link_mbps else None,
    ) as server:
        plan = plan.model_copy(update={"addresses": [server.address], "secret": secret})
        job = train.mapInArrow(arrow_trainer(plan), REPORT_DDL, barrier=plan.synchronous)
        reports = _collect_with_progress(job, state, progress)
        traffic = server.stats()
    published, updates, _ = state.publication()
    holdout_rows = rows_of(held.toArrow().to_batches(), spec.n_features) if held is not None else None
    versions, metrics = register_trained(
        registry, model, published, parent=parent, algorithm=plan.algorithm_name, updates=updates, holdout=holdout_rows
    )
    registry.set_alias(model, "candidate", versions[0])
    if promote:
        registry.promote(model, versions[0])
    registry.retain(model, settings.registry_keep)
    train.unpersist()
    return FitResult(
        run_id=run_id,
        versions=versions,
        holdout=metrics,
        rows=rows,
        invalid_rows=invalid,
        updates=updates,
        seconds=time.monotonic() - started,
        workers=sorted(reports, key=lambda r: r["worker_id"]),
        bytes_in=traffic["bytes_in"],
        bytes_out=traffic["bytes_out"],
    )


def _ps_host(spark, settings: Settings) -> str:
    """Where the in-process parameter server listens: ``ps_host`` on a local master; on a cluster the
    driver's address, which Spark's executors reach (the frames carry the run's random HMAC secret)."""
    if settings.spark_master.startswith("local"):
        return settings.ps_host
    return spark.sparkContext.getConf().get("spark.driver.host")


def _plan(settings: Settings, spec: ModelSpec, rows: int, run_id: str) -> TrainingPlan:
    params = {name: getattr(settings, name) for name in ("communication_window", "rho", "workers")}
    steps = None
    try:
        synchronous = algorithm_class(settings.algorithm).synchronous
    except ValueError as exc:
        raise FitError(str(exc)) from exc
    if synchronous:
        steps = rows // settings.workers // settings.batch_size  # every worker must take the same rounds
        if steps == 0:
            raise FitError(
                f"{settings.algorithm} needs at least workers x batch_size = "
                f"{settings.workers * settings.batch_size} rows"
            )
        params["global_batch_size"] = settings.workers * settings.batch_size
    try:
        return TrainingPlan.create(
            spec,
            algorithm=settings.algorithm,
            addresses=[],
            learning_rate=settings.learning_rate,
            momentum=settings.momentum,
            algorithm_params=params,
            batch_size=settings.batch_size,
            epochs=settings.epochs,
            steps_per_epoch=steps,
            seed=settings.seed,
            io_timeout_s=settings.ps_io_timeout_s,
            encoding=settings.ps_encoding,
            topk_fraction=settings.ps_topk_fraction,
            query_id=run_id,
            batch_id=0,
        )
    except ValueError as exc:
        raise FitError(str(exc)) from exc


def _collect_with_progress(job, state: CenterState, progress: Callable[[dict], None] | None) -> list[dict]:
    done = threading.Event()
    if progress is not None:

        def report():
            while not done.wait(1.0):
                progress(state.stats())

        threading.Thread(target=report, name="fit-progress", daemon=True).start()
    try:
        return [row.asDict() for row in job.collect()]
    finally:
        done.set()
