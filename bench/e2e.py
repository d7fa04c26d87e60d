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

:class:`UpRun` (the tests' :class:`tests.up_process.WatchedUp` plus memory, CPU and lag samples) is
also what ``bench.soak`` uses to watch its runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.processes import EventCount, committed_events, snapshot
from tests.up_process import TOPICS, WatchedUp


class UpRun(WatchedUp):
    """:class:`tests.up_process.WatchedUp` (``up`` in a subprocess; champion vs served version; topics)
    plus what a benchmark measures: every 2 s each role's memory and CPU and each query's lag."""

    def __init__(self, home: Path, duration_s: float, *, topics: tuple[str, ...] = TOPICS, **kwargs):
        """``topics``: keep every record of the run's topics (``()`` for a long run: they would fill
        this process's memory)."""
        self.keep_records = bool(topics)
        self.samples: list[dict] = []  # every 2 s: t (s since launch), roles (bench.processes.snapshot), lag
        self.stopped_at: float | None = None  # when up began to stop (wall clock)
        self.started, self.launched_at = time.monotonic(), time.time()
        super().__init__(home, duration_s, **kwargs)
        self.url = f"http://127.0.0.1:{self.serve_port}"

    def _watchers(self) -> list:
        kept = [w for w in super()._watchers() if self.keep_records or w != self._read_topics]
        return [*kept, self._watch_processes, self._note_stop]

    def stop(self, timeout_s: float) -> int:
        """Ask ``up`` to stop in order (SIGTERM: pyspark's own SIGINT handler turns a Ctrl-C into a
        KeyboardInterrupt once Spark is up) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def _note_stop(self) -> None:
        while not self._stopped.is_set():
            if self.stopping.wait(0.5):
                self.stopped_at = time.time()
                return

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
