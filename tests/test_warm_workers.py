"""Python workers started ahead of a query serve its tasks with their modules already imported."""

from __future__ import annotations

import pyarrow as pa

from pipeline.spark.warm_workers import STREAMING_MODULES, warm


def test_workers_started_by_warm_serve_the_next_job_with_the_streaming_modules_imported(spark):
    def report(batches):
        import os
        import sys

        for _ in batches:
            pass
        imported = all(name in sys.modules for name in STREAMING_MODULES)
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "imported": [imported]})

    slots = spark.sparkContext.defaultParallelism
    assert warm(spark) > 0
    rows = spark.range(slots, numPartitions=slots).mapInArrow(report, "pid long, imported boolean").collect()
    assert len(rows) == slots and all(row.imported for row in rows)
