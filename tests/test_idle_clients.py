"""Kafka clients that wait for records must not spin. noida-db answers a fetch for records it does not
have at once, ignoring the fetch's max wait, so a kafka-python poll that waits on the broker busy-loops
its network thread for the whole timeout: the console's topic feed took a core of ``streamfit up``'s
process, and every end-offset lookup 50 ms of CPU. Measured per thread (/proc), so other threads of the
test session do not count."""

from __future__ import annotations

import os
import threading
import time

from console.feeds import TopicFeed
from pipeline.kafka import ensure_topics
from pipeline.spark.offsets import KafkaOffsetReader


def threads_cpu_s(*prefixes: str) -> float:
    """CPU seconds used so far by this process's threads whose names start with one of ``prefixes``."""
    ticks = 0
    for thread in threading.enumerate():
        if thread.name.startswith(prefixes) and thread.native_id is not None:
            try:
                with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:  # ended meanwhile
                continue
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def test_an_idle_topic_feed_sleeps_between_reads(kafka, topic):
    ensure_topics(kafka, {topic: 3})
    feed = TopicFeed(lambda: kafka, {topic: 10}).start()
    try:
        time.sleep(1.0)  # connected, positioned, nothing to read
        assert feed.problem is None
        before, started = threads_cpu_s("console-feed", "kafka-io-streamfit-console"), time.monotonic()
        time.sleep(3.0)
        used = threads_cpu_s("console-feed", "kafka-io-streamfit-console") - before
    finally:
        feed.stop()
    assert used < 0.3 * (time.monotonic() - started), f"{used:.2f} s of CPU in 3 s idle"  # a spin takes ~1 s per s


def test_end_offsets_cost_milliseconds_of_cpu(kafka, topic):
    ensure_topics(kafka, {topic: 3})
    reader = KafkaOffsetReader(kafka, [topic], 5.0)
    try:
        reader.latest()
        before = time.thread_time() + threads_cpu_s("kafka-io-streamfit-offsets")
        for _ in range(20):
            reader.latest()
        used = time.thread_time() + threads_cpu_s("kafka-io-streamfit-offsets") - before
    finally:
        reader.close()
    assert used < 20 * 0.02, f"{1000 * used / 20:.1f} ms of CPU per end-offset lookup"  # was 50 ms each
