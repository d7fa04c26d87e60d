"""Spark Python workers started, their modules imported, before the first micro-batch needs them.

On a cold start each task of a query's first micro-batch would wait for Spark to fork a Python worker
and for that worker to import what the task runs (pyarrow, numpy, the Kafka clients, streamfit's
modules): a few seconds on two cores, spent after the query started. Spark reuses Python workers
(``spark.python.worker.reuse``), so the workers a small job starts while the query is being planned
serve the micro-batches that follow.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterator

import pyarrow as pa

from pipeline.spark import worker_heap

log = logging.getLogger(__name__)

STREAMING_MODULES = ("pipeline.spark.source", "consumers.inference", "pipeline.kafka")
"""What the tasks of an inference micro-batch import: the Kafka reader, the predictor and its writer."""


def import_streaming_modules(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Import :data:`STREAMING_MODULES` in this worker, passing the rows on."""
    for name in STREAMING_MODULES:
        importlib.import_module(name)
    worker_heap.freeze()
    yield from batches


def warm(
    spark, task: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]] = import_streaming_modules
) -> float:
    """Run ``task`` in twice as many Python workers as there are task slots: a micro-batch's Python
    stages (the Kafka read, then the predictor or trainer) each take a worker per task slot. Logs and
    returns the seconds it took."""
    started = time.monotonic()
    slots = spark.sparkContext.defaultParallelism
    spark.range(slots, numPartitions=slots).mapInArrow(task, "id long").mapInArrow(task, "id long").collect()
    seconds = time.monotonic() - started
    log.info("%d Python workers warmed in %.1f s", 2 * slots, seconds)
    return seconds
