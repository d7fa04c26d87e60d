"""The producer's Prometheus counters, scraped over HTTP: they say exactly what the sender did, and
``streamfit produce --metrics-port`` serves them while it runs."""

from __future__ import annotations

import itertools
import signal
import time
from subprocess import PIPE

from pipeline.kafka import ensure_topics, fast_producer
from pipeline.metrics import serve
from producers.metrics import producer_registry
from producers.sender import Outgoing, Sender, synthetic_events
from producers.synthetic import synthetic_rows
from tests.helpers import STREAMFIT, scrape, start_with_metrics
from tests.kafka_reader import read_topic
from tests.waiting import wait_until


def test_counters_are_the_senders_accounting(kafka, topic):
    ensure_topics(kafka, {topic: 2, topic + ".dlq": 1})
    producer = fast_producer(kafka, timeout_s=15)
    sender = Sender(producer, topic, topic + ".dlq")
    exporter = serve(producer_registry(sender.summary), 0, host="127.0.0.1")
    try:
        assert scrape(exporter.server_port)["streamfit_produce_sent_total"] == 0
        for message in synthetic_events(itertools.islice(synthetic_rows("hyperplane", 1), 1_000), "m"):
            sender.send(message)
        for n in range(7):
            sender.send(Outgoing(None, b'{"stage": "produce", "n": %d}' % n, dead=True))
        summary = sender.close(15)
        samples = scrape(exporter.server_port)
    finally:
        exporter.shutdown()
        producer.close(timeout=5)
    assert samples == {
        "streamfit_produce_sent_total": 1_007,
        "streamfit_produce_acknowledged_total": 1_007,
        "streamfit_produce_failed_total": 0,
        "streamfit_produce_resent_total": 0,
        "streamfit_produce_dead_lettered_total": 7,
    }
    assert summary.acknowledged == 1_007
    assert len(read_topic(kafka, topic, expected=1_000)) == 1_000


def test_streamfit_produce_serves_its_counters_while_it_runs(kafka, topic, cli_env):
    ensure_topics(kafka, {topic: 1})
    env = {**cli_env, "STREAMFIT_KAFKA_BOOTSTRAP": kafka, "STREAMFIT_TOPIC_EVENTS": topic}
    argv = [*STREAMFIT, "produce", "--source", "synth:hyperplane", "--limit", "0", "--rate", "200"]
    process, _, port = start_with_metrics([*argv, "--metrics-port", "0", "--no-progress"], env, "stderr", stdout=PIPE)
    try:
        wait_until(lambda: scrape(port)["streamfit_produce_acknowledged_total"] >= 100, 60)
        first, started = scrape(port), time.monotonic()
        time.sleep(3)
        second, elapsed = scrape(port), time.monotonic() - started
    finally:
        process.send_signal(signal.SIGINT)
        out = process.stdout.read()
        process.wait(timeout=60)
    assert process.returncode == 0, out
    rate = (second["streamfit_produce_acknowledged_total"] - first["streamfit_produce_acknowledged_total"]) / elapsed
    assert 100 <= rate <= 260, rate  # --rate 200, as PromQL's rate() would see it
    final = dict(field.split("=") for field in out.split()[:5])
    assert int(final["acknowledged"]) >= second["streamfit_produce_acknowledged_total"]
    assert second["streamfit_produce_sent_total"] >= second["streamfit_produce_acknowledged_total"]
    assert second["streamfit_produce_failed_total"] == 0 == second["streamfit_produce_dead_lettered_total"]
