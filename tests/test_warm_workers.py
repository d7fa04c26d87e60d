"""Python workers started ahead of a query serve its tasks with their modules already imported."""

from __future__ import annotations

import os

import pyarrow as pa

from pipeline.spark.warm_workers import STREAMING_MODULES, import_streaming_modules, warm


def test_workers_started_by_warm_serve_the_next_job_with_the_streaming_modules_imported(spark, tmp_path):
    """The next job's tasks run in workers the warm-up ran in (reused, not forked anew): each warm-up task
    leaves its worker's pid in ``tmp_path``, each task of the next job reports its own."""
    warmed = tmp_path

    def warm_and_sign(batches):
        (warmed / str(os.getpid())).touch()
        yield from import_streaming_modules(batches)

    def report(batches):
        import sys

        for _ in batches:
            pass
        imported = all(name in sys.modules for name in STREAMING_MODULES)
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "imported": [imported]})

    slots = spark.sparkContext.defaultParallelism
    assert warm(spark, warm_and_sign) > 0
    warm_pids = {int(p.name) for p in warmed.iterdir()}
    rows = spark.range(slots, numPartitions=slots).mapInArrow(report, "pid long, imported boolean").collect()
    assert len(rows) == slots and all(row.imported for row in rows)
    assert {row.pid for row in rows} <= warm_pids, (rows, warm_pids)
