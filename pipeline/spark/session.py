"""A Spark session that works on a fresh machine, and the choice of Kafka connector.

Python workers run the venv's interpreter and are reused across tasks (so a model
loaded once per worker stays loaded); memory and shuffle settings suit a 2-core box.

Jobs are scheduled FAIR between two pools, so queries sharing one driver do not queue behind each
other: ``predict`` (weight 4, a minimum share of 2 task slots) and ``train`` (weight 1). A query
joins a pool by being started inside :func:`scheduler_pool`; one started outside runs in Spark's
default pool.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StreamfitError
from pipeline.settings import Settings
from pipeline.spark import class_archive
from pipeline.spark.source import NAME as PYTHON_SOURCE, ROWS_PER_BATCH, KafkaDataSource

log = logging.getLogger(__name__)


class SparkSetupError(StreamfitError, RuntimeError):
    """Spark cannot start here; the message says what is missing."""


def _check_java() -> tuple[str, str]:
    """Spark 4 needs Java 17 or newer; say so plainly instead of a py4j gateway error. Returns the
    ``java`` binary and its ``-version`` text."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.path.exists(java):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no `java` on PATH"
        raise SparkSetupError(
            f"Spark needs Java 17 or 21 ({where}): install a JDK (e.g. `apt-get install "
            "openjdk-17-jre-headless`) or point JAVA_HOME at one"
        )
    answer = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    found = re.search(r'version "(\d+)(?:\.(\d+))?', answer)
    major = found and (int(found.group(2) or 0) if found.group(1) == "1" else int(found.group(1)))
    if major and major < 17:
        raise SparkSetupError(
            f"Spark 4 needs Java 17 or 21, {java} is Java {major}: install a newer JDK or point JAVA_HOME at one"
        )
    return java, answer


LOCAL_CHECKPOINTS = "org.apache.spark.sql.execution.streaming.checkpointing.FileSystemBasedCheckpointFileManager"
"""Spark's default checkpoint writer goes through Hadoop's FileContext, which on a local disk without
Hadoop's native library forks a ``chmod`` and ``readlink`` process for every file it writes: four per
micro-batch and query, ~40 process starts a second at two queries and 0.5 s triggers, a large share of
the driver's CPU. The FileSystem-based writer (Spark's own fallback) creates and renames the same files
without them."""


LEAN_JVM = ["-Xms128m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
"""A local streaming driver runs the executors too, on a box it shares with the broker and the Python
workers, and its micro-batches hold seconds of events: a 1 GB heap (:data:`LEAN_CONF`) that starts at 128 MB,
C1-only JIT (C2 kept recompiling Spark's per-micro-batch planning code, most of a core), and the serial
collector (the smallest footprint). Measured with ``bench.e2e``: JVM RSS 834 to 558 MB, its CPU per
1,000 events 0.67 to 0.40 s, latency unchanged. With the default initial heap (1/64 of the machine's
memory) the RSS kept rising for the best part of an hour as promoted garbage first touched the old
generation (``bench.soak``: +5 MB a minute); from 128 MB it levels off within minutes."""


LEAN_WORKER_ENV = {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}
"""The lean session's Python workers: two glibc malloc arenas instead of one per thread (Kafka clients
run several), and Arrow buffers from malloc rather than a jemalloc pool that keeps what it freed: 95 MB
less over the four workers of ``streamfit up``."""
LEAN_STATUS_STORE = {
    "spark.ui.retainedJobs": "100",
    "spark.ui.retainedStages": "100",
    "spark.ui.retainedTasks": "2000",
    "spark.sql.ui.retainedExecutions": "50",
}
"""Spark's status store keeps jobs, stages, tasks and SQL executions for its UI even with the UI off
(1,000 / 1,000 / 100,000 / 1,000 by default). Two queries run several jobs a second: at the defaults
the driver's heap would hold the last hours of tasks, which nobody looks at here."""
LEAN_CONF = {
    "spark.driver.memory": "1g",
    **LEAN_STATUS_STORE,
    **{f"spark.executorEnv.{name}": value for name, value in LEAN_WORKER_ENV.items()},
}
"""What a lean session sets besides :data:`LEAN_JVM`; any other session gets a 2 GB driver."""


POOLS = {"predict": (4, 2), "train": (1, 0)}
"""Scheduler pools: name -> (weight, minimum share of task slots)."""


def _pools_file(home: Path) -> Path:
    """Spark reads FAIR pools from an XML file: written under ``home`` from :data:`POOLS`."""
    pools = "".join(
        f'<pool name="{name}"><schedulingMode>FIFO</schedulingMode><weight>{weight}</weight>'
        f"<minShare>{share}</minShare></pool>"
        for name, (weight, share) in POOLS.items()
    )
    path = home / "spark" / "fairscheduler.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<?xml version="1.0"?><allocations>{pools}</allocations>\n')
    return path


@contextlib.contextmanager
def scheduler_pool(spark, pool: str) -> Iterator[None]:
    """Queries started inside run their micro-batches' jobs in ``pool`` (a query's thread inherits the
    starting thread's local properties)."""
    if pool not in POOLS:
        raise ValueError(f"unknown scheduler pool {pool!r}; known: {sorted(POOLS)}")
    context = spark.sparkContext
    before = context.getLocalProperty("spark.scheduler.pool")
    context.setLocalProperty("spark.scheduler.pool", pool)
    try:
        yield
    finally:
        context.setLocalProperty("spark.scheduler.pool", before)


def spark_session(
    settings: Settings, app_name: str = "streamfit", *, streaming: bool = False, write_class_archive: bool = False
):
    """The process's Spark session, with the streamfit Kafka data source registered. A ``streaming``
    session on a local master gets the lean driver JVM (:data:`LEAN_JVM`); a batch job such as
    ``fit`` caches its data in the driver's heap and keeps 2 GB and the full JIT. A local driver maps
    the machine's archive of Spark's classes (:mod:`pipeline.spark.class_archive`); with
    ``write_class_archive`` and no archive yet, its JVM writes one as it exits (see ``class_archive.save``)."""
    java = _check_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    if settings.spark_master.startswith("local"):  # one machine: the driver and its UI on loopback only
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    lean = streaming and settings.spark_master.startswith("local")
    java_options = ["-Dio.netty.tryReflectionSetAccessible=true"] + (LEAN_JVM if lean else [])
    if settings.spark_class_archive and settings.spark_master.startswith("local"):
        java_options += class_archive.jvm_options(class_archive.archive_path(*java), write=write_class_archive)
    spark = (
        SparkSession.builder.master(settings.spark_master)
        .appName(app_name)
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.shuffle.partitions", str(max(2, settings.workers)))
        .config("spark.default.parallelism", str(max(2, settings.workers)))
        .config(map=LEAN_CONF if lean else {"spark.driver.memory": "2g"})
        .config("spark.scheduler.mode", "FAIR")
        .config("spark.scheduler.allocation.file", str(_pools_file(settings.home)))
        .config("spark.ui.enabled", str(settings.spark_ui).lower())
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(ROWS_PER_BATCH))
        .config("spark.sql.streaming.stopTimeout", "30s")
        .config("spark.sql.streaming.checkpointFileManagerClass", LOCAL_CHECKPOINTS)
        .config("spark.hadoop.fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
        .config("spark.driver.extraJavaOptions", " ".join(java_options))
        .config(map=settings.spark_conf)  # the user's word last: a cluster's executor sizes, cores, driver host
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    spark.dataSource.register(KafkaDataSource)
    return spark


@contextlib.contextmanager
def spark_in_background(settings: Settings, app_name: str) -> Iterator[Callable[[], Any]]:
    """Start a streaming session in a thread while the caller starts everything else (the JVM's start
    is seconds of a cold start); yields a function that waits for the session. It is stopped on exit,
    even when nobody waited for it. (Started off the main thread, pyspark leaves SIGINT alone.)"""
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="spark-start") as pool:
        future = pool.submit(spark_session, settings, app_name, streaming=True, write_class_archive=True)
        warming = pool.submit(_warm_when_up, future)
        try:
            yield future.result
        finally:
            warming.result()
            if future.exception() is None:  # a failure was raised to whoever waited, or nobody needed it
                future.result().stop()
                class_archive.save()


def _warm_when_up(session: concurrent.futures.Future) -> None:
    """Start the Python workers as soon as the session is up, while the caller plans its queries
    (:mod:`pipeline.spark.warm_workers`). A failure here only loses the head start: it is logged."""
    from pipeline.spark.warm_workers import warm

    if session.exception() is None:
        try:
            warm(session.result())
        except Exception as exc:  # noqa: BLE001 - the queries start their own workers anyway
            log.warning("could not start Python workers ahead of the first micro-batch: %s", exc)


def native_kafka_available(spark) -> bool:
    """True when Spark's JVM Kafka connector is on the classpath (as in the docker image)."""
    try:
        spark.sparkContext._jvm.java.lang.Class.forName("org.apache.spark.sql.kafka010.KafkaSourceProvider")
        return True
    except Exception:  # noqa: BLE001 - py4j raises a generic Py4JJavaError for ClassNotFoundException
        return False


def kafka_format(spark, settings: Settings) -> str:
    """The format name to read/write Kafka with: ``kafka`` (JVM connector) or ``streamfit-kafka``."""
    if settings.kafka_source == "python":
        return PYTHON_SOURCE
    native = native_kafka_available(spark)
    if settings.kafka_source == "native" and not native:
        raise SparkSetupError(
            "kafka_source=native but Spark's Kafka connector (spark-sql-kafka-0-10) is not on the "
            "classpath; use kafka_source=auto or python"
        )
    return "kafka" if native else PYTHON_SOURCE


def events_stream(
    spark, settings: Settings, bootstrap: str, starting_offsets: str | None = None, min_partitions: int | None = None
):
    """The events topic as a streaming DataFrame, read alike by both consumers (Spark's Kafka columns)."""
    from pipeline.kafka_properties import java_options, spark_options

    kafka = kafka_format(spark, settings)
    properties = (java_options if kafka == "kafka" else spark_options)(settings.kafka, "consumer")
    reader = (
        spark.readStream.format(kafka)
        .option("kafka.bootstrap.servers", bootstrap)
        .options(**properties)
        .option("subscribe", settings.topic_events)
        .option("startingOffsets", starting_offsets or settings.starting_offsets)
        .option("failOnDataLoss", str(settings.fail_on_data_loss).lower())
    )
    if min_partitions:
        reader = reader.option("minPartitions", str(min_partitions))
    if settings.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(settings.max_offsets_per_trigger))
    return reader.load()


def every(settings: Settings, default_s: float) -> dict:
    """The processing-time trigger of a query: ``trigger_interval_s`` when set, else the query's own default."""
    seconds = default_s if settings.trigger_interval_s is None else settings.trigger_interval_s
    return {"processingTime": f"{seconds} seconds"}


def stop_between_batches(query, timeout_s: float = 60.0) -> None:
    """Stop ``query`` once its running micro-batch (if any) has committed, waiting at most ``timeout_s``.

    ``query.stop()`` interrupts a running micro-batch: its tasks die mid-write (Spark logs the
    interruption as a failure, with long JVM traces) and a restart replays the batch. Stopping in
    the gap between triggers avoids both.
    """
    deadline = time.monotonic() + timeout_s
    while query.isActive and query.status.get("isTriggerActive") and time.monotonic() < deadline:
        time.sleep(0.05)
    query.stop()
