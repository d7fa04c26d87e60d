"""The pipeline as separate real processes (broker, parameter server, serving, both Spark consumers,
a producer) that a test can kill with SIGKILL and start again, plus a load on serving that records
every answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pipeline.broker import free_port
from tests.helpers import STREAMFIT
from tests.waiting import wait_until


class Part:
    """One ``streamfit`` command in its own process group, its output appended to ``<logs>/<name>.log``.
    ``kill()`` is a crash: SIGKILL to the whole group (the command and what it started, e.g. the
    Spark JVM and its Python workers, or the broker binary)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path, ready, cwd: Path | None = None):
        self.name, self.args, self.env, self.ready, self.cwd = name, args, env, ready, cwd
        self.log = logs / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.kills = 0

    def start(self, timeout_s: float = 180.0) -> None:
        self.launch()
        self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the process, without waiting for it to be ready."""
        with self.log.open("ab") as sink:
            sink.write(f"\n=== start {time.strftime('%X')} ===\n".encode())
            sink.flush()
            self.process = subprocess.Popen(
                [*STREAMFIT, *self.args],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> None:

        def ready() -> bool:
            assert self.process.poll() is None, f"{self.name} exited ({self.process.returncode}):\n{self.tail()}"
            return self.ready(self)

        wait_until(
            ready,
            timeout_s,
            interval_s=0.25,
            message=lambda: f"{self.name} not ready within {timeout_s:g} s:\n{self.tail()}",
        )

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        self.kills += 1

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of its group left behind
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def logged_since_start(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace").rsplit("=== start", 1)[-1]


def listening(port: int):
    def ready(_part: Part) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    return ready


def logged(text: str):
    return lambda part: part.logged_since_start(text)


def http_ready(url: str):
    def ready(_part: Part) -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


@dataclass
class ServingLoad:
    """Posts one prediction request every ``every_s`` from a thread; records each outcome with the
    time it came (a request cut off by a kill of serving fails after the kill, not before)."""

    url: str
    body: dict
    every_s: float = 0.05
    outcomes: list[tuple[float, int | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ServingLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(self.every_s):
                try:
                    outcome: int | str = client.post(self.url, json=self.body).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.outcomes.append((time.monotonic(), outcome))


@dataclass
class Cluster:
    home: Path
    env: dict[str, str]
    bootstrap: str
    ps_port: int
    serve_url: str
    parts: dict[str, Part]


@pytest.fixture
def cluster(tmp_path, cli_env):
    """Ports, environment and the parts (not started) of one pipeline under ``tmp_path``."""
    home, logs = tmp_path / "home", tmp_path / "logs"
    logs.mkdir()
    broker_port, ps_port, serve_port = (free_port("127.0.0.1") for _ in range(3))
    bootstrap = f"127.0.0.1:{broker_port}"
    env = {
        **cli_env,
        "STREAMFIT_HOME": str(home),
        "STREAMFIT_MODEL": "small",
        "STREAMFIT_PS_PORT": str(ps_port),
        "STREAMFIT_SERVE_PORT": str(serve_port),
        "STREAMFIT_TRIGGER_INTERVAL_S": "1",
        "STREAMFIT_MAX_OFFSETS_PER_TRIGGER": "3000",
        "STREAMFIT_SPARK_MASTER": "local[1]",
        "STREAMFIT_WORKERS": "2",
        "STREAMFIT_PS_PUBLISH_EVERY_S": "5",
        "STREAMFIT_KAFKA_TIMEOUT_S": "10",
        "STREAMFIT_TOPIC_RETENTION_MS": "-1",  # the test audits every topic from its start when it ends
    }
    broker_env = {**env, "STREAMFIT_BROKER_PORT": str(broker_port)}
    env["STREAMFIT_KAFKA_BOOTSTRAP"] = bootstrap
    url = f"http://127.0.0.1:{serve_port}"
    parts = {
        "broker": Part("broker", ["broker"], broker_env, logs, listening(broker_port)),
        "ps": Part("ps", ["ps"], env, logs, listening(ps_port)),
        "serve": Part("serve", ["serve"], env, logs, http_ready(url)),
        "train": Part("train", ["train"], env, logs, logged("Ctrl-C stops")),
        "predict": Part("predict", ["predict"], env, logs, logged("Ctrl-C stops")),
    }
    cluster = Cluster(home, env, bootstrap, ps_port, url, parts)
    yield cluster
    for part in reversed(list(parts.values())):
        part.stop()
