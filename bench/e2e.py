"""Bounded ``streamfit up`` runs, watched from outside the way a user or an operator would.

``python -m bench.e2e [--seconds 240] [--rate 1000] [--models small,higgs] [--warm-up 60]`` runs
``streamfit up --duration S`` once per model, each in a fresh home on its embedded broker, and
prints one JSON object with, per model:

- cold start: seconds from launching ``up`` to the first prediction and to the first trained
  micro-batch (the predictions' ``predicted_at`` and the training metrics' ``ts`` against the launch);
- steady state, over the window from ``--warm-up`` seconds after launch to the end: event-to-prediction
  latency p50/p95/p99 (``predicted_at - event_ts`` of the window's events), events in/s and predictions
  out/s, and both queries' lag (events produced minus the events of the query's last committed
  micro-batch, sampled every 2 s): mean, max and at the end, in events and in seconds of traffic;
- publish-to-serve: from a champion move seen in the registry to serving answering with it (polled every 20 ms);
- every process of the run, by role (``up`` driver, broker, ps, serve, Spark JVM, Spark Python workers,
  producer): peak RSS, steady RSS (mean over the window), and CPU seconds per 1,000 events in the window;
  the peak RSS of all of them together;
- final prequential accuracy and failed serving probes.

``targets`` checks the ``small`` run against issue 16's: p50 <= 1 s, p99 <= 3 s, first prediction
<= 15 s, peak memory of all processes <= 3 GB, and both queries keeping up (their lag at the end of
the window under 5 s of traffic).

:class:`UpRun` is also what the end-to-end tests and ``bench.soak`` use to watch their runs.
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

from bench.processes import EventCount, committed_events, processes_of, snapshot
from pipeline.broker import free_port
from pipeline.kafka import consumer
from pipeline.registry import Registry, RegistryError

TOPICS = ("events", "events.dlq", "predictions", "training-metrics", "model-updates")


class UpRun:
    """``streamfit up`` in a subprocess, plus watchers: champion vs served version, topics, memory."""

    def __init__(
        self,
        home: Path,
        duration_s: float,
        *,
        rate: float = 400,
        model: str = "small",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        topics: tuple[str, ...] = TOPICS,
    ):
        """``topics``: the topics whose every record is kept in :attr:`records` (none for a long run: they
        would fill this process's memory)."""
        self.home, self.model, self.topics = home, model, topics
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the topic reader outlives the broker by a moment
        self.serve_port, self.ps_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.serve_port}"
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
        self.started, self.launched_at = time.monotonic(), time.time()
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        self.stopped_at: float | None = None  # when up began to stop (wall clock)
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.champion_seen: dict[int, float] = {}
        self.served_seen: dict[int, float] = {}
        self.records: dict[str, list] = {topic: [] for topic in TOPICS}
        self.samples: list[dict] = []  # every 2 s: t (s since launch), roles (bench.processes.snapshot), lag
        self.request_errors: list[str] = []
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=target, daemon=True)
            for target in (self._read_output, self._watch_versions, self._read_topics, self._watch_processes)
        ]
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
                self.stopped_at = self.stopped_at or time.time()
                self.stopping.set()
        self.ready.set()  # ended: nobody should wait for readiness any more

    def _watch_versions(self) -> None:
        """Every 20 ms: the registry's champion and the version the serving app answers with."""
        registry = Registry(self.home / "registry")
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
                time.sleep(0.02)

    def _read_topics(self) -> None:
        """Every 0.5 s, whatever the run wrote to :attr:`topics` since (records carry their own times, so
        reading late changes no figure, and a slow poll keeps this watcher's load on the broker small)."""
        reader = None
        while self.topics and not self._stopped.wait(0.5) and self.process.poll() is None:
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
            [TopicPartition(topic, p) for topic in self.topics for p in (reader.partitions_for_topic(topic) or ())]
        )
        reader.seek_to_beginning()
        return reader

    def _watch_processes(self) -> None:
        """Every 2 s: each role's memory and CPU, and how many events each query is behind."""
        produced, checkpoints = EventCount(self.home), self.home / "checkpoints"
        try:
            while not self._stopped.wait(2.0) and self.process.poll() is None:
                events = produced()
                lag = {
                    query: events - done if events is not None and done is not None else None
                    for query, done in (
                        ("predict", committed_events(checkpoints / "inference")),
                        ("train", committed_events(checkpoints / "training")),
                    )
                }
                self.samples.append(
                    {
                        "t": time.time() - self.launched_at,
                        "produced": events,
                        "lag": lag,
                        "roles": snapshot(self.home, self.process.pid),
                    }
                )
        finally:
            produced.close()

    @property
    def peak_rss_mb(self) -> float:
        """The most memory all the run's processes held together at one sample."""
        return max((sum(r["rss_mb"] for r in sample["roles"].values()) for sample in self.samples), default=0.0)

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


def _pct(values, q: float, scale: float = 1.0) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 3) if len(values) else None


def summary(run: UpRun, rate_per_s: float, warm_up_s: float) -> dict:
    """The figures of one finished run (see the module docstring)."""
    launched = run.launched_at * 1000
    begin, end = launched + warm_up_s * 1000, (run.stopped_at or time.time()) * 1000 - 5000
    predictions, metrics = run.values("predictions"), run.values("training-metrics")
    answered = {p["id"] for p in predictions} | {
        (d["partition"], d["offset"]) for d in run.values("events.dlq") if d.get("stage") == "predict"
    }
    window_events = [r for r in run.records["events"] if begin <= r.timestamp < end]
    unanswered = sum(
        1
        for r in window_events
        if (r.key or b"").decode(errors="replace") not in answered and (r.partition, r.offset) not in answered
    )
    latency = np.array([p["predicted_at"] - p["event_ts"] for p in predictions if begin <= p["event_ts"] < end], float)
    trained = [m for m in metrics if m.get("rows")]
    fresh = np.array(run.freshness())
    accuracy = [m["window_accuracy"] for m in metrics if "window_accuracy" in m]
    window = [sample for sample in run.samples if begin <= sample["t"] * 1000 + launched < end]
    return {
        "model": run.model,
        "cold_start_s": {
            "first_prediction": round(min(p["predicted_at"] for p in predictions) / 1000 - run.launched_at, 1)
            if predictions
            else None,
            "first_trained_batch": round(min(m["ts"] for m in trained) / 1000 - run.launched_at, 1)
            if trained
            else None,
        },
        "steady": {
            "window_s": [warm_up_s, round(end / 1000 - run.launched_at, 1)],
            "event_to_prediction_s": {f"p{q}": _pct(latency, q, 1e-3) for q in (50, 95, 99)},
            "events": len(window_events),
            "unanswered_events": unanswered,
            "events_in_per_s": rate(window_events),
            "predictions_out_per_s": rate([r for r in run.records["predictions"] if begin <= r.timestamp < end]),
            "lag": {
                query: _lag([sample["lag"][query] for sample in window], rate_per_s) for query in ("predict", "train")
            },
        },
        "trained_events": sum(m.get("trained_rows", 0) for m in metrics),
        "publish_to_serve_s": {"p50": _pct(fresh, 50), "p99": _pct(fresh, 99), "swaps": len(fresh)},
        "processes": _processes(window),
        "peak_memory_mb": round(run.peak_rss_mb, 1),
        "final_prequential_accuracy": round(accuracy[-1], 4) if accuracy else None,
        "request_errors": len(run.request_errors),
    }


def _lag(series: list[int | None], rate_per_s: float) -> dict:
    """Mean, max and last lag over the window, in events and in seconds of traffic."""
    known = [v for v in series if v is not None]
    if not known:
        return {}
    return {
        "mean_events": round(sum(known) / len(known)),
        "max_events": max(known),
        "end_events": known[-1],
        "end_s": round(known[-1] / rate_per_s, 2),
    }


def _processes(window: list[dict]) -> dict:
    """Per role: peak RSS, mean RSS and CPU seconds per 1,000 events over the window."""
    if len(window) < 2 or None in (window[0]["produced"], window[-1]["produced"]):
        return {}
    events = max(1, window[-1]["produced"] - window[0]["produced"])
    roles = {}
    for role in window[-1]["roles"]:
        rss = [sample["roles"][role]["rss_mb"] for sample in window if role in sample["roles"]]
        cpu = window[-1]["roles"][role]["cpu_s"] - window[0]["roles"].get(role, {"cpu_s": 0.0})["cpu_s"]
        roles[role] = {
            "peak_rss_mb": max(rss),
            "steady_rss_mb": round(sum(rss) / len(rss)),
            "cpu_s_per_1000_events": round(1000 * cpu / events, 3),
        }
    return roles


def targets(small: dict) -> dict:
    """Issue 16's targets for ``small`` at 1,000 events/s."""
    steady, latency = small["steady"], small["steady"]["event_to_prediction_s"]
    behind = {query: steady["lag"].get(query, {}).get("end_s") for query in ("predict", "train")}
    checks = {
        "p50_le_1s": latency["p50"] is not None and latency["p50"] <= 1.0,
        "p99_le_3s": latency["p99"] is not None and latency["p99"] <= 3.0,
        "first_prediction_le_15s": (small["cold_start_s"]["first_prediction"] or float("inf")) <= 15.0,
        "peak_memory_le_3gb": small["peak_memory_mb"] <= 3 * 1024,
        "queries_keep_up": all(v is not None and v < 5.0 for v in behind.values())
        and steady["unanswered_events"] <= 0.01 * max(1, steady["events"]),
    }
    return {**checks, "met": all(checks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=240.0, help="length of each up run after start-up (default 240)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s the producer sends (default 1000)")
    parser.add_argument(
        "--models", default="small,higgs", help="comma-separated models, one run each (default small,higgs)"
    )
    parser.add_argument(
        "--warm-up", type=float, default=60.0, help="seconds after launch before the steady window (default 60)"
    )
    args = parser.parse_args()
    results = {}
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="streamfit-e2e-") as tmp:
            run = UpRun(
                Path(tmp) / "home",
                args.seconds,
                rate=args.rate,
                model=model,
                env={"STREAMFIT_PS_PUBLISH_EVERY_S": "10"},
            )
            try:
                status = run.wait(args.seconds + 600)
            finally:
                run.kill()
            if status != 0:
                sys.exit(f"streamfit up --model {model} failed:\n" + "\n".join(run.output[-30:]))
            results[model] = summary(run, args.rate, args.warm_up)
    print(
        json.dumps(
            {
                "benchmark": "e2e",
                "seconds": args.seconds,
                "rate": args.rate,
                "warm_up_s": args.warm_up,
                "models": results,
                "targets": targets(results["small"]) if "small" in results else None,
            }
        )
    )


if __name__ == "__main__":
    main()
