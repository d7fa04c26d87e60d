"""The embedded broker's life cycle through the Python API."""

from __future__ import annotations

import pytest

from pipeline.broker import BrokerError, EmbeddedBroker
from pipeline.kafka import describe


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["noida", "tansu"])
def test_start_answers_metadata_then_stop_leaves_no_child(impl, tmp_path):
    with EmbeddedBroker(impl, data_dir=tmp_path) as broker:
        process = broker.process
        assert isinstance(describe(broker.bootstrap), dict)
    assert process.poll() is not None, "broker child still running"


def test_unknown_implementation_is_a_clear_error(tmp_path):
    with pytest.raises(BrokerError, match="unknown broker implementation 'kafka9'"):
        EmbeddedBroker("kafka9", data_dir=tmp_path)


def test_port_in_use_fails_with_the_log(tmp_path, kafka):
    port = int(kafka.rsplit(":", 1)[1])
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker("noida", port=port, data_dir=tmp_path, start_timeout_s=10).start()
