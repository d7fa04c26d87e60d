"""Cheap task turnover in reused Spark Python workers.

PySpark's daemon runs a full ``gc.collect()`` after every task of a reused worker. A worker that has
imported pyarrow, numpy and kafka-python tracks ~80,000 objects, so that collection costs 50-100 ms of
CPU per task: with two streaming queries, each micro-batch a few Python stages on every task slot,
it was most of a core on two cores even when hardly any events flowed. :func:`freeze`, called as a
task starts, moves everything alive at that moment (modules, the loaded model, cached Kafka clients)
into the permanent generation, so the collection after the task scans only what the task made.

Frozen objects are still freed by reference counting; only a reference cycle that was alive when a
task started and dies later stays until the worker exits (Spark recycles idle workers).
"""

from __future__ import annotations

import gc


def freeze() -> None:
    """Exempt what is alive now from the daemon's collection after this task (call first in a task)."""
    gc.freeze()
