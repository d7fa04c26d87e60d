"""Producer throughput: streamfit's producer path next to bare kafka-python and bare confluent-kafka
send loops, same payloads, same broker, rounds alternating.

``python -m bench.produce [--events N] [--rounds 5] [--impl noida|tansu] [--client auto|confluent|kafka-python]
[--bootstrap HOST:PORT]`` prints one JSON object with the median events/s and CPU µs per event (this process,
client threads included; not the broker's) of each side over the rounds; ``ratio`` = streamfit / bare kafka-python (the
issue's reference, target >= 0.8), ``ratio_vs_confluent`` = streamfit / bare confluent-kafka. The bare
loops send payloads made beforehand; streamfit's path also generates and encodes its events, so
``generate_only_events_per_s`` (the same events made and dropped) is its ceiling.

Every side uses the ``kafka`` setting's client properties (``STREAMFIT_KAFKA__COMPRESSION_TYPE=lz4``,
``..._LINGER_MS``, TLS and SASL, see the README), so a tuning is measured on all sides alike; with
``--bootstrap`` the rounds run against that cluster (its topics ``bench-*`` are created if missing)
instead of an embedded broker.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import confluent_kafka

from pipeline.broker import EmbeddedBroker
from pipeline.kafka import KAFKA_CLIENTS, confluent_config, ensure_topics, fast_producer, producer
from pipeline.kafka_properties import KafkaProperties
from pipeline.settings import load_settings
from producers.sender import Sender, synthetic_events
from producers.synthetic import synthetic_rows


class Clock:
    """Wall and CPU time of one side's run: ``events_per_s`` and ``cpu_us`` per event once stopped."""

    def __init__(self, events: int):
        self.events, self.wall, self.cpu = events, time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return self.events / wall, cpu / self.events * 1e6


def _events(n: int):
    return synthetic_events(itertools.islice(synthetic_rows("higgs", seed=7), n), "bench")


def streamfit_run(
    bootstrap: str, topic: str, n: int, client: str, properties: KafkaProperties
) -> tuple[tuple[float, float], list]:
    """The real producer path (``streamfit produce``): generate, encode, send, account for every acknowledgement."""
    kafka = fast_producer(bootstrap, client=client, properties=properties)
    sender = Sender(kafka, topic, topic + ".dlq")
    payloads = []
    clock = Clock(n)
    for message in _events(n):
        sender.send(message)
        payloads.append((message.key, message.value))
    summary = sender.close()
    measured = clock.stop()
    kafka.close()
    assert summary.acknowledged == n and summary.failed == 0, summary.as_dict()
    return measured, payloads


def generate_run(n: int) -> tuple[float, float]:
    """The same events generated and encoded, not sent: the streamfit path's ceiling."""
    clock = Clock(n)
    for _ in _events(n):
        pass
    return clock.stop()


def bare_kafka_python_run(
    bootstrap: str, topic: str, payloads: list, properties: KafkaProperties
) -> tuple[float, float]:
    """A bare kafka-python loop with streamfit's producer configuration: send all, flush, check every future."""
    kafka = producer(bootstrap, properties=properties)
    clock = Clock(len(payloads))
    futures = [kafka.send(topic, key=key, value=value) for key, value in payloads]
    kafka.flush()
    for future in futures:
        future.get()
    measured = clock.stop()
    kafka.close()
    return measured


def bare_confluent_run(bootstrap: str, topic: str, payloads: list, properties: KafkaProperties) -> tuple[float, float]:
    """A bare confluent-kafka loop with the same librdkafka configuration: produce all (serving delivery
    reports as it goes), flush, count the failures."""
    kafka = confluent_kafka.Producer(confluent_config(bootstrap, properties=properties))
    failed = []

    def report(err, msg):
        if err is not None:
            failed.append(err)

    clock = Clock(len(payloads))
    for key, value in payloads:
        while True:
            try:
                kafka.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                kafka.poll(0.01)
        kafka.poll(0)
    kafka.flush()
    measured = clock.stop()
    kafka.close()
    assert not failed, failed[:3]
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--impl", default="noida", choices=["noida", "tansu"])
    parser.add_argument("--client", default="auto", choices=KAFKA_CLIENTS, help="client of streamfit's path")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median of each side is reported")
    parser.add_argument("--bootstrap", help="a Kafka cluster to measure against (default: an embedded broker)")
    args = parser.parse_args()
    properties = load_settings().kafka
    sides = ("streamfit", "bare_kafka_python", "bare_confluent", "generate_only")
    rounds: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    with contextlib.ExitStack() as stack:
        if args.bootstrap:
            bootstrap = args.bootstrap
        else:
            home = stack.enter_context(tempfile.TemporaryDirectory())
            bootstrap = stack.enter_context(EmbeddedBroker(args.impl, data_dir=Path(home))).bootstrap
        ensure_topics(bootstrap, {f"bench-{side}": 3 for side in sides[:3]}, properties=properties)
        for _ in range(args.rounds):
            measured, payloads = streamfit_run(bootstrap, "bench-streamfit", args.events, args.client, properties)
            rounds["streamfit"].append(measured)
            rounds["bare_kafka_python"].append(
                bare_kafka_python_run(bootstrap, "bench-bare_kafka_python", payloads, properties)
            )
            rounds["bare_confluent"].append(bare_confluent_run(bootstrap, "bench-bare_confluent", payloads, properties))
            rounds["generate_only"].append(generate_run(args.events))
    eps = {side: statistics.median(e for e, _ in values) for side, values in rounds.items()}
    print(
        json.dumps(
            {
                "benchmark": "produce",
                "broker": args.bootstrap or args.impl,
                "kafka_properties": properties.redacted(),
                "events": args.events,
                "rounds_run": args.rounds,
                "payload_bytes": len(payloads[0][1]),
                "streamfit_client": args.client,
                **{f"{side}_events_per_s": round(eps[side]) for side in sides},
                "ratio": round(eps["streamfit"] / eps["bare_kafka_python"], 3),
                "target_ratio": 0.8,
                "ratio_vs_confluent": round(eps["streamfit"] / eps["bare_confluent"], 3),
                "cpu_us_per_event": {
                    side: round(statistics.median(c for _, c in values), 2) for side, values in rounds.items()
                },
                "rounds": {side: [round(e) for e, _ in values] for side, values in rounds.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
