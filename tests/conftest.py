"""Session-wide real infrastructure: one embedded broker per implementation, shared by all tests."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def broker_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("brokers")


def _broker(impl: str, broker_dir: Path):
    broker = EmbeddedBroker(impl, data_dir=broker_dir)
    broker.start()
    return broker


@pytest.fixture(scope="session")
def kafka(broker_dir):
    """The default embedded broker (noida-db), started once per test session."""
    broker = _broker("noida", broker_dir)
    yield broker.bootstrap
    broker.stop()


@pytest.fixture(scope="session")
def tansu(broker_dir):
    broker = _broker("tansu", broker_dir)
    yield broker.bootstrap
    broker.stop()


@pytest.fixture(params=["noida", "tansu"])
def any_kafka(request):
    """Kafka contract tests run against both brokers."""
    return request.getfixturevalue("kafka" if request.param == "noida" else "tansu")


@pytest.fixture
def topic() -> str:
    """A fresh topic name, so tests sharing a broker never see each other's messages."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running the ``streamfit`` command in a subprocess with its own home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFIT_")}
    env["STREAMFIT_HOME"] = str(tmp_path / "home")
    return env


STREAMFIT = [sys.executable, "-m", "pipeline.cli"]


def uncommit(checkpoint: Path, batch_id: int) -> None:
    """The state a crash leaves after micro-batch ``batch_id`` wrote its output but before Spark
    committed it: no entry in the commit log, so a query restarted from ``checkpoint`` replays it."""
    (checkpoint / "commits" / str(batch_id)).unlink()
    (checkpoint / "commits" / f".{batch_id}.crc").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def spark():
    """One local Spark session for the whole test run, with the streamfit Kafka source registered."""
    from pipeline.settings import load_settings
    from pipeline.spark.session import spark_session

    session = spark_session(load_settings(spark_master="local[2]"), app_name="streamfit-tests")
    yield session
    session.stop()
