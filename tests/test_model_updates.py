"""Alias moves are announced on ``model-updates``; a dead broker costs one bounded wait, not one per move."""

from __future__ import annotations

import time

import orjson
import pytest

from pipeline.broker import EmbeddedBroker
from pipeline.kafka import KafkaUnavailable, ensure_topics
from pipeline.model_updates import Announcer
from pipeline.settings import load_settings
from tests.kafka_reader import read_topic


def _move(version: int) -> dict:
    return {
        "model": "small",
        "version": version,
        "alias": "candidate",
        "uri": f"v{version}",
        "created_at": 0.0,
        "metrics": {},
    }


@pytest.mark.slow
def test_after_kafka_fails_moves_go_unannounced_for_a_while_and_close_does_not_wait(tmp_path, topic):
    broker = EmbeddedBroker("noida", data_dir=tmp_path)
    broker.start()
    try:
        ensure_topics(broker.bootstrap, {topic: 1})
        settings = load_settings(
            home=tmp_path / "home", kafka_bootstrap=broker.bootstrap, topic_model_updates=topic, kafka_timeout_s=3
        )
        announcer = Announcer(settings)
        announcer(_move(1))
        assert [orjson.loads(r.value)["version"] for r in read_topic(broker.bootstrap, topic, expected=1)] == [1]
        broker.stop()

        started = time.monotonic()
        announcer(_move(2))  # waits kafka_timeout_s for the acknowledgement, then logs
        failed_after = time.monotonic() - started
        announcer(_move(3))  # within kafka_timeout_s of the failure: not tried
        skipped_after = time.monotonic() - started - failed_after
        announcer.close()
        closed_after = time.monotonic() - started - failed_after - skipped_after
        assert 2.5 < failed_after < 15, failed_after
        assert skipped_after < 0.5 and closed_after < 2, (skipped_after, closed_after)

        broker.start()  # same port: once the window has passed, moves are announced again
        time.sleep(max(0.0, settings.kafka_timeout_s - (time.monotonic() - started - failed_after)))
        announcer(_move(4))
        announcer.close()
        versions = [orjson.loads(r.value)["version"] for r in read_topic(broker.bootstrap, topic, expected=2)]
        assert versions[0] == 1 and versions[-1] == 4 and 3 not in versions, versions
    finally:
        broker.stop()


def test_a_required_announcement_raises_every_time(tmp_path):
    settings = load_settings(home=tmp_path, kafka_bootstrap="127.0.0.1:1", kafka_timeout_s=1)
    announcer = Announcer(settings, required=True)
    for version in (1, 2):
        with pytest.raises(KafkaUnavailable, match="could not announce small candidate"):
            announcer(_move(version))
    announcer.close()
