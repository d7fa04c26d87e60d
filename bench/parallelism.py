"""Processes for CPU work, threads for I/O (seed 001): one micro-batch's validation and preprocessing run
serially, with threads and with Spark's Python worker processes, and so does an I/O-bound task.

``python -m bench.parallelism [--events N] [--round-trips N]``. The CPU work is the training consumer's
own :func:`consumers.training.check_partition` (parse each event's JSON, validate it against the higgs
schema, check the standardisation, build the Arrow rows) on N Kafka-shaped rows, 2 % of them invalid;
the I/O work is N blocking round trips to a local TCP server that answers each after 2 ms (a broker's
acknowledgement, a parameter-server reply), where a caller only waits. Each runs serially in this
process, on two threads, and as a Spark job of two partitions on ``local[2]`` (the same two cores;
its per-job overhead is measured too, as the time of the same job over an empty batch), and the I/O
also on more threads. Prints one JSON object: seconds and speedups over serial, side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import socketserver
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from consumers.training import CHECK_DDL, check_partition
from pipeline.bundle import fit_standardisation
from pipeline.events import FeatureSchema
from pipeline.spec import BUILTIN_SPECS
from producers.synthetic import synthetic_rows

SPARK_PARTITIONS = 2
IO_DELAY_S = 0.002
ROWS_PER_BATCH = 5000


def kafka_rows(events: int) -> pa.Table:
    """``events`` Kafka-shaped rows of higgs events (value, topic, partition, offset, timestamp); every
    50th value is not an event (an invalid feature), so the dead-letter path is part of the work."""
    values = []
    for i, (features, label) in enumerate(itertools.islice(synthetic_rows("higgs", seed=3), events)):
        features = ["NaN", *features[1:]] if i % 50 == 49 else features
        values.append(orjson.dumps({"id": f"e{i}", "ts": 1_700_000_000_000 + i, "features": features, "label": label}))
    now = pa.scalar(1_700_000_000_000_000, pa.timestamp("us"))
    return pa.table(
        {
            "value": pa.array(values, pa.binary()),
            "topic": pa.array(["events"] * events),
            "partition": pa.array([i % SPARK_PARTITIONS for i in range(events)], pa.int32()),
            "offset": pa.array(range(events), pa.int64()),
            "timestamp": pa.array([now.value] * events, pa.timestamp("us")),
        }
    )


def checked_rows(batches, schema: FeatureSchema, standardisation) -> int:
    return sum(batch.num_rows for batch in check_partition(iter(batches), schema, standardisation))


def spark_check(frame, schema: FeatureSchema, standardisation) -> None:
    """The consumer's check as a Spark job over ``frame``'s partitions, written nowhere (``noop``)."""
    validate = partial(check_partition, schema=schema, standardisation=standardisation)
    frame.mapInArrow(validate, CHECK_DDL).write.format("noop").mode("overwrite").save()


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return round(time.perf_counter() - started, 3)


class _DelayedEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(64):
            time.sleep(IO_DELAY_S)
            self.request.sendall(data)


def round_trips(address: tuple[str, int], count: int) -> None:
    with socket.create_connection(address) as conn:
        for _ in range(count):
            conn.sendall(b"x")
            conn.recv(64)


def threaded_round_trips(address: tuple[str, int], count: int, threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(round_trips, [address] * threads, [count // threads] * threads))


def _spark_round_trips(address: tuple[str, int], count: int, batches):
    for _ in batches:
        pass
    round_trips(address, count)
    yield pa.RecordBatch.from_pydict({"done": [count]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parallelism", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--round-trips", type=int, default=400)
    args = parser.parse_args(argv)

    from pipeline.settings import load_settings
    from pipeline.spark.session import spark_session

    spec = BUILTIN_SPECS["higgs"]
    schema = FeatureSchema(tuple(spec.feature_names), spec.n_classes)
    table = kafka_rows(args.events)
    standardisation = fit_standardisation(
        np.array([f for f, _ in itertools.islice(synthetic_rows("higgs", seed=3), 1000)])
    )
    batches = table.to_batches(max_chunksize=ROWS_PER_BATCH)
    halves = [batches[: len(batches) // 2], batches[len(batches) // 2 :]]
    check = partial(checked_rows, schema=schema, standardisation=standardisation)

    cpu = {"serial": timed(lambda: check(batches))}
    with ThreadPoolExecutor(SPARK_PARTITIONS) as pool:
        cpu["threads_2"] = timed(lambda: sum(pool.map(check, halves)))

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _DelayedEcho)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = server.server_address[:2]
    io = {"serial": timed(lambda: round_trips(address, args.round_trips))}
    for threads in (2, 8):
        io[f"threads_{threads}"] = timed(partial(threaded_round_trips, address, args.round_trips, threads))

    with tempfile.TemporaryDirectory(prefix="bench-parallelism-") as tmp:
        spark = spark_session(load_settings(home=Path(tmp)), "bench-parallelism")
        try:
            frame = spark.createDataFrame(table.to_pandas()).repartition(SPARK_PARTITIONS).cache()
            frame.count()
            empty = frame.limit(0).repartition(SPARK_PARTITIONS).cache()
            empty.count()
            run = partial(spark_check, schema=schema, standardisation=standardisation)
            run(frame)  # warm: the Python workers start and import streamfit
            cpu["spark_processes_2_job_overhead"] = timed(partial(run, empty))
            cpu["spark_processes_2"] = timed(partial(run, frame))
            share = args.round_trips // SPARK_PARTITIONS
            trips = partial(_spark_round_trips, address, share)
            one_row_each = spark.range(SPARK_PARTITIONS, numPartitions=SPARK_PARTITIONS)
            io["spark_processes_2"] = timed(lambda: one_row_each.mapInArrow(trips, "done long").collect())
        finally:
            spark.stop()
    server.shutdown()
    server.server_close()
    for figures in (cpu, io):
        runs = [name for name in figures if name != "serial" and not name.endswith("overhead")]
        figures.update({f"speedup_{name}": round(figures["serial"] / figures[name], 2) for name in runs})
    print(
        json.dumps(
            {
                "cores": SPARK_PARTITIONS,
                "cpu": {
                    "what": f"check_partition on {args.events} Kafka rows of higgs events (2 % invalid)",
                    "seconds": cpu,
                },
                "io": {
                    "what": f"{args.round_trips} blocking round trips, each answered after {IO_DELAY_S * 1000:g} ms",
                    "seconds": io,
                },
                "reading": "CPU-bound Python holds the GIL: threads do not speed it up, processes do; "
                "an I/O wait releases it: threads overlap the waits at a thread's cost, not a process's",
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
