"""Session-wide real infrastructure: one embedded broker per implementation, shared by all tests.

Tests in tiers: a test that uses a real broker or Spark (through these fixtures, even indirectly) or
runs the ``streamfit`` command (``cli_env``) is marked ``slow`` here; tests that start their own
broker or ``streamfit up`` carry the mark themselves. ``make test-fast`` runs ``pytest -m "not slow"``.
Helpers the test modules import live in ``tests.helpers`` and ``tests.waiting``, not here.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from pipeline.broker import EmbeddedBroker

SLOW_FIXTURES = frozenset({"kafka", "tansu", "any_kafka", "spark", "cli_env"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that requests (directly or through another fixture) a broker, Spark or the CLI."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def spark():
    """One local Spark session for the whole test run, with the streamfit Kafka source registered."""
    from pipeline.settings import load_settings
    from pipeline.spark.session import spark_session

    session = spark_session(load_settings(spark_master="local[2]"), app_name="streamfit-tests")
    yield session
    session.stop()
