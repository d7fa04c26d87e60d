"""``make demo``: the whole available pipeline on one machine, on the embedded broker.

Starts the embedded broker, streams a synthetic higgs-like stream with a share of
bad events into Kafka, and reads the topics back to show what arrived where.
Grows into ``streamfit up`` as the consumers and serving land.
"""

from __future__ import annotations

import itertools

from pipeline.broker import kafka_cluster
from pipeline.dlq import dead_letter
from pipeline.kafka import producer
from pipeline.settings import load_settings
from producers.sender import Outgoing, Sender, synthetic_events
from producers.synthetic import synthetic_rows


def main(events: int = 5000, rate: float = 2000.0) -> None:
    settings = load_settings()
    with kafka_cluster(settings) as bootstrap:
        print(f"embedded {settings.broker_impl} broker at {bootstrap}")
        kafka = producer(bootstrap)
        sender = Sender(kafka, settings.topic_events, settings.topic_dlq, rate=rate)
        rows = itertools.islice(synthetic_rows("higgs", seed=1), events)
        for message in synthetic_events(rows, "demo", label_fraction=0.5):
            sender.send(message)
        sender.send(Outgoing(None, dead_letter("produce", "demo: a deliberately broken event", b"{oops"), dead=True))
        summary = sender.close()
        kafka.close()
        print(f"produced: {summary.as_dict()}")
        print(f"try it yourself while a broker runs: streamfit broker & "
              f"streamfit produce --source synth:higgs --rate 1000 --limit 5000")


if __name__ == "__main__":
    main()
