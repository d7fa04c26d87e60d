"""Producer throughput: streamfit's producer next to a bare kafka-python send loop, same payloads, same run.

``python -m bench.produce [--events N] [--impl noida|tansu]`` prints one JSON object;
``ratio`` = streamfit events/s / bare events/s (target >= 0.8).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from pipeline.broker import EmbeddedBroker
from pipeline.kafka import ensure_topics, producer
from producers.sender import Sender, synthetic_events
from producers.synthetic import synthetic_rows


def streamfit_run(bootstrap: str, topic: str, n: int) -> tuple[float, list]:
    """The real producer path: generate, encode, send, account for every acknowledgement."""
    kafka = producer(bootstrap)
    sender = Sender(kafka, topic, topic + ".dlq")
    payloads = []
    started = time.perf_counter()
    for message in synthetic_events(itertools.islice(synthetic_rows("higgs", seed=7), n), "bench"):
        sender.send(message)
        payloads.append((message.key, message.value))
    summary = sender.close()
    elapsed = time.perf_counter() - started
    kafka.close()
    assert summary.acknowledged == n and summary.failed == 0, summary.as_dict()
    return n / elapsed, payloads


def bare_run(bootstrap: str, topic: str, payloads: list) -> float:
    """A bare kafka-python loop with the same producer configuration: send all, flush, check every future."""
    kafka = producer(bootstrap)
    started = time.perf_counter()
    futures = [kafka.send(topic, key=key, value=value) for key, value in payloads]
    kafka.flush()
    for future in futures:
        future.get()
    elapsed = time.perf_counter() - started
    kafka.close()
    return len(payloads) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--impl", default="noida", choices=["noida", "tansu"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, EmbeddedBroker(args.impl, data_dir=Path(home)) as broker:
        ensure_topics(broker.bootstrap, {"bench-streamfit": 3, "bench-bare": 3})
        streamfit_eps, bare_eps = [], []
        for _ in range(args.rounds):
            eps, payloads = streamfit_run(broker.bootstrap, "bench-streamfit", args.events)
            streamfit_eps.append(eps)
            bare_eps.append(bare_run(broker.bootstrap, "bench-bare", payloads))
    best_streamfit, best_bare = max(streamfit_eps), max(bare_eps)
    print(json.dumps({
        "benchmark": "produce", "broker": args.impl, "events": args.events, "payload_bytes": len(payloads[0][1]),
        "streamfit_events_per_s": round(best_streamfit), "bare_kafka_python_events_per_s": round(best_bare),
        "ratio": round(best_streamfit / best_bare, 3), "target_ratio": 0.8,
        "rounds": {"streamfit": [round(x) for x in streamfit_eps], "bare": [round(x) for x in bare_eps]},
    }))


if __name__ == "__main__":
    main()
