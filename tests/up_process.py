"""``streamfit up`` in a subprocess, for the tests that run the whole pipeline as a user does."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
from kafka import TopicPartition

from pipeline.broker import free_port
from pipeline.kafka import consumer
from pipeline.registry import Registry, RegistryError

TOPICS = ("events", "events.dlq", "predictions", "training-metrics", "model-updates")


def processes_of(home: Path) -> list[int]:
    """PIDs of live processes whose environment has ``STREAMFIT_HOME=home`` (what a run started)."""
    marker = f"STREAMFIT_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                pass
    return found


class UpProcess:
    """``streamfit up --duration S`` with its own ``STREAMFIT_HOME`` and free ports; every line of its
    output is kept in :attr:`output`, and :attr:`ready` is set at the ``serving ...`` line (or when the
    output ends, so nobody waits for a run that is over); :attr:`stopping` at the ``stopping`` line."""

    def __init__(
        self,
        home: Path,
        duration_s: float,
        *,
        rate: float = 400,
        model: str = "small",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ):
        self.home, self.model = home, model
        self.serve_port, self.ps_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFIT_")}
        environment.update({"STREAMFIT_HOME": str(home), **(env or {})})
        command = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "up",
            "--duration",
            str(duration_s),
            "--rate",
            str(rate),
            "--model",
            model,
            "--port",
            str(self.serve_port),
            "--ps-port",
            str(self.ps_port),
            *args,
        ]
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        self.ready, self.stopping = threading.Event(), threading.Event()
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=target, daemon=True) for target in self._watchers()]
        for thread in self._threads:
            thread.start()

    def _watchers(self) -> list:
        return [self._read_output]

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            if line.startswith("serving "):
                self.ready.set()
            elif line.startswith("stopping"):
                self.stopping.set()
        self.ready.set()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self._stopped.set()
            for thread in self._threads:
                thread.join(timeout=10)

    def kill(self) -> None:
        """SIGKILL ``up`` and whatever of the run is still alive."""
        if self.process.poll() is None:
            self.process.kill()
        for pid in processes_of(self.home):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


class WatchedUp(UpProcess):
    """:class:`UpProcess`, watched from outside the way a user would: every 20 ms the registry's champion
    and the version serving answers with (when each was first seen: :attr:`champion_seen`,
    :attr:`served_seen`; failed requests in :attr:`request_errors`), and every record of :data:`TOPICS`
    (:attr:`records`)."""

    def __init__(self, home: Path, duration_s: float, **kwargs):
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the topic reader outlives the broker by a moment
        self.champion_seen: dict[int, float] = {}
        self.served_seen: dict[int, float] = {}
        self.records: dict[str, list] = {topic: [] for topic in TOPICS}
        self.request_errors: list[str] = []
        super().__init__(home, duration_s, **kwargs)

    def _watchers(self) -> list:
        return [*super()._watchers(), self._watch_versions, self._read_topics]

    def _watch_versions(self) -> None:
        registry = Registry(self.home / "registry")
        row = None
        with httpx.Client(base_url=f"http://127.0.0.1:{self.serve_port}", timeout=5) as client:
            while not self._stopped.is_set() and self.process.poll() is None:
                now = time.monotonic()
                try:
                    self.champion_seen.setdefault(registry.resolve(self.model, "champion"), now)
                    row = row or [[0.0] * registry.spec(self.model).n_features]
                except (RegistryError, OSError, ValueError):
                    pass
                if self.ready.is_set() and row is not None:
                    try:
                        answer = client.post(f"/v1/models/{self.model}:predict", json={"instances": row})
                        if answer.status_code == 200:
                            self.served_seen.setdefault(answer.json()["model_version"], time.monotonic())
                        elif self.process.poll() is None:
                            self.request_errors.append(f"{answer.status_code} {answer.text[:200]}")
                    except httpx.TransportError as exc:
                        if self.process.poll() is None and not self.stopping.is_set():
                            self.request_errors.append(repr(exc))
                time.sleep(0.02)

    def _read_topics(self) -> None:
        """Every 0.5 s, whatever the run wrote to the topics since (records carry their own times)."""
        reader = None
        while not self._stopped.wait(0.5) and self.process.poll() is None:
            if reader is None and self.ready.is_set():
                reader = self._topic_reader()
            for records in (reader.poll(timeout_ms=0, max_records=50_000) if reader else {}).values():
                for record in records:
                    self.records[record.topic].append(record)
        if reader is not None:
            reader.close()

    def _topic_reader(self):
        try:
            bootstrap = json.loads((self.home / "broker.json").read_text())["bootstrap"]
        except (OSError, ValueError, KeyError):
            return None
        reader = consumer(bootstrap, fetch_max_bytes=16 * 1024 * 1024)
        reader.assign(
            [TopicPartition(topic, p) for topic in TOPICS for p in (reader.partitions_for_topic(topic) or ())]
        )
        reader.seek_to_beginning()
        return reader

    def values(self, topic: str) -> list[dict]:
        """The JSON values of the records of ``topic`` read so far."""
        out = []
        for record in self.records[topic]:
            try:
                out.append(orjson.loads(record.value))
            except orjson.JSONDecodeError:
                pass
        return out

    def freshness(self) -> list[float]:
        """Seconds from each champion (after the first) appearing to the server answering with it; only
        versions that stayed champion long enough to be served (a newer one may supersede them first)."""
        order = sorted(self.champion_seen.items(), key=lambda kv: kv[1])
        delays = []
        for (version, seen), following in zip(order[1:], order[2:] + [(None, float("inf"))]):
            served = self.served_seen.get(version)
            if served is not None:
                delays.append(max(0.0, served - seen))
            elif following[1] - seen > 1.0:
                delays.append(float("inf"))  # champion for over a second and never served
        return delays
