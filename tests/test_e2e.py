"""The whole pipeline as ``streamfit up`` runs it on its own embedded broker, watched from outside:
predictions for the produced events, rising prequential accuracy, champions promoted and served
within a second, dead letters for the broken events, no process left behind, and a second run
that resumes from the first."""

from __future__ import annotations

import re
import time
from collections import Counter

import numpy as np
import pytest

from pipeline.registry import Registry
from tests.up_process import WatchedUp, processes_of
from tests.waiting import wait_until

ENV = {
    "STREAMFIT_PS_PUBLISH_EVERY_S": "4",
    "STREAMFIT_GATE_WINDOW": "1000",
    "STREAMFIT_PREQUENTIAL_WINDOW": "1000",
    "STREAMFIT_MAX_OFFSETS_PER_TRIGGER": "4000",
    "STREAMFIT_PREDICT_METRICS_PORT": "0",
    "STREAMFIT_TRAIN_METRICS_PORT": "0",
}  # bounded micro-batches: the cold-start backlog drains in steps; the queries' metrics on free ports


def _finish(run: WatchedUp, timeout_s: float) -> int:
    try:
        return run.wait(timeout_s)
    finally:
        run.kill()


def _no_process_left(run: WatchedUp) -> None:
    wait_until(
        lambda: not processes_of(run.home),
        15,
        interval_s=0.5,
        message=lambda: f"processes left behind: {processes_of(run.home)}",
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("up") / "home"
    run = WatchedUp(home, 120, rate=300, env=ENV, args=("--drift-at", "0", "--invalid-fraction", "0.02"))
    status = _finish(run, 600)
    return run, status


@pytest.mark.slow
def test_up_runs_the_whole_pipeline(first_run):
    run, status = first_run
    output = "\n".join(run.output)
    assert status == 0, output
    assert "curl -s -H 'Content-Type: application/json' http://127.0.0.1:" in output, output
    assert re.search(r"Prometheus metrics at /metrics: serve :\d+, predict :[1-9]\d*, train :[1-9]\d*", output), output
    assert "Spark UI http://localhost:" in output, output  # a local driver's UI, on loopback only
    last = dict(
        item.split("=", 1) for item in [line for line in run.output if line.startswith("status ")][-1].split()[1:]
    )
    assert int(last["predictions"]) > 0 and int(last["dlq"]) > 0 and last["accuracy"] != "-", last
    assert int(last["champion"]) > 1 and int(last["served"]) > 1, last
    assert float(last["lag_predict_s"]) >= 0 and float(last["lag_train_s"]) >= 0, last  # measured, not "-"
    _no_process_left(run)

    # every prediction answers a produced event, and the events produced early are all predicted
    events = {r.key.decode(): r for r in run.records["events"]}
    predictions = run.values("predictions")
    predicted = Counter(p["id"] for p in predictions)
    assert predictions and set(predicted) <= set(events), "predictions for events that were never produced"
    dead = run.values("events.dlq")
    broken = {(d["partition"], d["offset"]) for d in dead}
    early = [
        key
        for key, r in events.items()
        if r.timestamp < time.time() * 1000 - 60_000 and (r.partition, r.offset) not in broken
    ]
    assert early, "no events older than a minute"
    missing = [key for key in early if key not in predicted]
    assert len(missing) <= 0.02 * len(early), f"{len(missing)} of {len(early)} early events have no prediction"

    # the broken events are dead letters with their reason
    assert dead, "no dead letters although 2% of events were sent broken"
    assert {d["stage"] for d in dead} == {"predict", "train"}, "both consumers dead-letter what they cannot use"
    assert all(d["error"] for d in dead)

    # prequential accuracy rises from random to learnt
    accuracy = [m["window_accuracy"] for m in run.values("training-metrics") if "window_accuracy" in m]
    assert len(accuracy) >= 4, accuracy
    assert accuracy[-1] >= 0.8 and accuracy[-1] > accuracy[0] + 0.15, accuracy

    # at least 3 promoted versions served, each within a second of becoming champion
    assert len(run.champion_seen) >= 4, run.champion_seen  # v1 plus three promotions
    assert len(set(run.served_seen) - {1}) >= 3, run.served_seen
    delays = run.freshness()
    assert delays and max(delays) <= 1.0, f"publish-to-serve delays {np.round(delays, 3).tolist()}"
    assert not run.request_errors, run.request_errors[:5]


@pytest.mark.slow
def test_a_second_up_resumes_where_the_first_stopped(first_run):
    first, status = first_run
    assert status == 0
    registry = Registry(first.home / "registry")
    newest_before = max(registry.versions("small"))
    predicted_before = Counter(p["id"] for p in first.values("predictions"))
    last_batch = max(m["batch_id"] for m in first.values("training-metrics"))
    started_ms = time.time() * 1000
    run = WatchedUp(first.home, 30, rate=300, env=ENV, args=("--drift-at", "0"))
    assert _finish(run, 400) == 0, "\n".join(run.output)
    _no_process_left(run)
    # the parameter server resumed from its checkpoint, and its candidates continue the version line
    started = [line for line in (first.home / "logs" / "ps.log").read_text().splitlines() if "listening on" in line]
    assert len(started) == 2 and "from checkpoint" in started[1], started
    assert max(registry.versions("small")) > newest_before
    # the inference query resumed from its checkpoint: at most one micro-batch predicted again
    again = [
        key
        for key, n in Counter(p["id"] for p in run.values("predictions")).items()
        if n > 1 and key in predicted_before
    ]
    assert len(again) <= 5000, f"{len(again)} events predicted again after the restart"
    # the training query resumed from its checkpoint, with the trained model
    metrics = [m for m in run.values("training-metrics") if m["ts"] > started_ms]
    assert metrics and metrics[0]["batch_id"] in (last_batch, last_batch + 1), (
        last_batch,
        metrics[:1],
    )  # a replay at most
    assert metrics[0]["accuracy"] >= 0.8, metrics[:1]


def test_the_live_status_table_shows_every_figure():
    from rich.console import Console

    from pipeline.status import Figures, render

    console = Console(record=True, width=100)
    console.print(
        render(
            Figures(
                at=0,
                events=1200,
                predictions=1100,
                dead_letters=12,
                events_per_s=500.0,
                predictions_per_s=480.0,
                trained_events=600,
                training_batches=3,
                window_accuracy=0.912,
                drifts=1,
                champion=4,
                candidate=5,
                served=4,
                serve_requests=30,
                serve_requests_per_s=2.5,
                lag={"predict": (12, 0.34), "train": None},
                notes=["serving: not answering yet"],
            ),
            "streamfit up",
        )
    )
    text = console.export_text()
    for shown in (
        "1,200 (500/s)",
        "1,100 (480/s)",
        "12",
        "600 in 3 micro-batches",
        "0.912",
        "v4 / v5",
        "30 (2.5/s)",
        "predict 12 events (0.3 s), train -",
        "serving: not answering yet",
    ):
        assert shown in text, (shown, text)
