"""One bounded ``streamfit up`` run, watched from outside the way a user or an operator would.

``python -m bench.e2e [--seconds S] [--rate R]`` runs ``streamfit up --duration S`` in a fresh home
on its embedded broker and prints one JSON object: events in/s, predictions out/s, training
events/s, median and p99 event-to-prediction latency (``predicted_at - event_ts`` of every
prediction), publish-to-serve freshness p50/p99 (from a champion move seen in the registry to
the serving app answering with it, polled every 20 ms), final prequential accuracy, and the peak
resident memory of all the run's processes together (every process carrying the run's
``STREAMFIT_HOME``: broker, parameter server, Spark JVM and Python workers, serving, producer).

:class:`UpRun` is also what the end-to-end test uses to watch its runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
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


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class UpRun:
    """``streamfit up`` in a subprocess, plus watchers: champion vs served version, topics, memory."""

    def __init__(self, home: Path, duration_s: float, *, rate: float = 400, model: str = "small",
                 env: dict[str, str] | None = None, args: tuple[str, ...] = (), topics: tuple[str, ...] = TOPICS):
        """``topics``: the topics whose every record is kept in :attr:`records` (none for a long run: they
        would fill this process's memory)."""
        self.home, self.model, self.topics = home, model, topics
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the topic reader outlives the broker by a moment
        self.serve_port, self.ps_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.serve_port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFIT_")}
        environment.update({"STREAMFIT_HOME": str(home), **(env or {})})
        command = [sys.executable, "-m", "pipeline.cli", "up", "--duration", str(duration_s), "--rate", str(rate),
                   "--model", model, "--port", str(self.serve_port), "--ps-port", str(self.ps_port), *args]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.output: list[str] = []
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.champion_seen: dict[int, float] = {}
        self.served_seen: dict[int, float] = {}
        self.records: dict[str, list] = {topic: [] for topic in TOPICS}
        self.peak_rss = 0
        self.request_errors: list[str] = []
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=target, daemon=True)
                         for target in (self._read_output, self._watch_versions, self._watch_memory)]
        for thread in self._threads:
            thread.start()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self._stopped.set()
            for thread in self._threads:
                thread.join(timeout=10)

    def stop(self, timeout_s: float) -> int:
        """Ask ``up`` to stop in order (SIGTERM: pyspark's own SIGINT handler turns a Ctrl-C into a
        KeyboardInterrupt once Spark is up) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        for pid in processes_of(self.home):
            try:
                os.kill(pid, 9)
            except OSError:
                pass

    def _read_output(self) -> None:
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            if line.startswith("serving "):
                self.ready.set()
            elif line.startswith("stopping"):
                self.stopping.set()
        self.ready.set()  # ended: nobody should wait for readiness any more

    def _watch_versions(self) -> None:
        """Every 20 ms: the registry's champion and the version the serving app answers with."""
        registry = Registry(self.home / "registry")
        reader = None
        row = None
        with httpx.Client(base_url=self.url, timeout=5) as client:
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
                    if reader is None and self.topics:
                        reader = self._topic_reader()
                if reader is not None:
                    for records in reader.poll(timeout_ms=0, max_records=5000).values():
                        for record in records:
                            self.records[record.topic].append(record)
                time.sleep(0.02)
        if reader is not None:
            reader.close()

    def _topic_reader(self):
        try:
            bootstrap = json.loads((self.home / "broker.json").read_text())["bootstrap"]
        except (OSError, ValueError, KeyError):
            return None
        reader = consumer(bootstrap, fetch_max_bytes=16 * 1024 * 1024)
        reader.assign([TopicPartition(topic, p) for topic in self.topics
                       for p in (reader.partitions_for_topic(topic) or ())])
        reader.seek_to_beginning()
        return reader

    def _watch_memory(self) -> None:
        while not self._stopped.is_set() and self.process.poll() is None:
            self.peak_rss = max(self.peak_rss, resident_bytes(processes_of(self.home)))
            time.sleep(1.0)

    # ----------------------------------------------------------------------------------------- figures

    def values(self, topic: str) -> list[dict]:
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


def rate(records: list) -> float | None:
    """Records per second over the span of their Kafka timestamps."""
    if len(records) < 2:
        return None
    stamps = [r.timestamp for r in records]
    return round(len(records) / max(1e-3, (max(stamps) - min(stamps)) / 1000), 1)


def summary(run: UpRun, seconds: float) -> dict:
    predictions = run.values("predictions")
    metrics = run.values("training-metrics")
    latency = np.array([p["predicted_at"] - p["event_ts"] for p in predictions], dtype=float)
    fresh = np.array(run.freshness())
    trained = sum(m.get("trained_rows", 0) for m in metrics)
    span = [m["ts"] for m in metrics]
    accuracy = [m["window_accuracy"] for m in metrics if "window_accuracy" in m]

    def pct(values: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(values, q)), 3) if len(values) else None

    return {
        "benchmark": "e2e", "seconds": seconds, "model": run.model,
        "events": len(run.records["events"]), "events_in_per_s": rate(run.records["events"]),
        "predictions": len(predictions), "predictions_out_per_s": rate(run.records["predictions"]),
        "dead_letters": len(run.records["events.dlq"]),
        "training_events_per_s": round(trained / ((span[-1] - span[0]) / 1000), 1) if len(span) > 1 else None,
        "trained_events": trained,
        "event_to_prediction_ms": {"p50": pct(latency, 50), "p99": pct(latency, 99)},
        "publish_to_serve_s": {"p50": pct(fresh, 50), "p99": pct(fresh, 99), "swaps": len(fresh)},
        "final_prequential_accuracy": round(accuracy[-1], 4) if accuracy else None,
        "champions": len(run.champion_seen), "served_versions": len(run.served_seen),
        "peak_memory_mb": round(run.peak_rss / 2**20, 1),
        "request_errors": len(run.request_errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the up run (after start-up)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s the producer sends")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="streamfit-e2e-") as tmp:
        run = UpRun(Path(tmp) / "home", args.seconds, rate=args.rate, env={"STREAMFIT_PS_PUBLISH_EVERY_S": "10"})
        try:
            status = run.wait(args.seconds + 600)
        finally:
            run.kill()
        if status != 0:
            sys.exit("streamfit up failed:\n" + "\n".join(run.output[-30:]))
        print(json.dumps(summary(run, args.seconds)))


if __name__ == "__main__":
    main()
