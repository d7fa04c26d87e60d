"""``streamfit produce`` and ``streamfit broker`` as a user runs them, in subprocesses."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import orjson

from pipeline.dlq import original_bytes
from pipeline.kafka import ensure_topics
from tests.helpers import STREAMFIT
from tests.kafka_reader import read_topic
from tests.waiting import wait_until


def _write_csv(path, rows: int, bad_every: int) -> set[int]:
    """A 5-feature CSV where every ``bad_every``-th row is broken in a different way; returns bad row numbers."""
    breakers = [
        lambda r: r.__setitem__(2, "abc"),
        lambda r: r.__setitem__(6, "7"),
        lambda r: r.__setitem__(3, "inf"),
        lambda r: r.pop(),
    ]
    bad = set()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "a", "b", "c", "d", "e", "label"])
        for i in range(1, rows + 1):
            row = [f"r{i}", *(round(0.1 * i + k, 3) for k in range(5)), i % 2]
            if i % bad_every == 0:
                breakers[(i // bad_every) % len(breakers)](row)
                bad.add(i)
            writer.writerow(row)
    return bad


def test_csv_with_bad_rows_sends_the_rest_and_dead_letters_each_bad_row(kafka, tmp_path, cli_env):
    events, dlq = "csv-events", "csv-events.dlq"
    ensure_topics(kafka, {events: 3, dlq: 1})
    path = tmp_path / "rows.csv"
    bad = _write_csv(path, 2000, bad_every=20)
    env = {**cli_env, "STREAMFIT_KAFKA_BOOTSTRAP": kafka, "STREAMFIT_TOPIC_EVENTS": events, "STREAMFIT_TOPIC_DLQ": dlq}
    done = subprocess.run(
        [*STREAMFIT, "produce", "--source", str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"sent={2000} acknowledged={2000} failed=0 resent=0 dead_lettered={len(bad)}" in done.stdout
    good = read_topic(kafka, events, expected=2000 - len(bad))
    assert sorted(r.key.decode() for r in good) == sorted(f"r{i}" for i in range(1, 2001) if i not in bad)
    assert all(len(orjson.loads(r.value)["features"]) == 5 for r in good)
    dead = [orjson.loads(r.value) for r in read_topic(kafka, dlq, expected=len(bad))]
    assert sorted(d["offset"] for d in dead) == sorted(bad)
    assert all(d["stage"] == "produce" and d["topic"] == str(path) and d["error"] for d in dead)
    reasons = " | ".join(d["error"] for d in dead)
    for expected in ("not a number: 'abc'", "'label' must be null or an integer in [0, 1]", "not finite", "cells"):
        assert expected in reasons
    assert all(original_bytes(d).startswith(b"r") for d in dead)


def test_producer_at_dead_address_fails_fast_with_clear_message(cli_env):
    env = {**cli_env, "STREAMFIT_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    started = time.monotonic()
    done = subprocess.run(
        [*STREAMFIT, "produce", "--source", "synth:higgs", "--limit", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert "127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr


def test_sigint_stops_produce_cleanly_even_when_started_with_sigint_ignored(kafka, cli_env):
    """A background job of a shell starts with SIGINT ignored; `streamfit up` (and a user) stop the producer
    with SIGINT all the same, and it must end with its acknowledgements accounted for, not run on."""
    env = {**cli_env, "STREAMFIT_KAFKA_BOOTSTRAP": kafka, "STREAMFIT_TOPIC_EVENTS": "sigint-events"}
    ensure_topics(kafka, {"sigint-events": 1, "events.dlq": 1})
    process = subprocess.Popen(
        [*STREAMFIT, "produce", "--source", "synth:sea", "--rate", "200", "--limit", "0", "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        time.sleep(8)  # started, producing
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "interrupted: waiting for acknowledgements" in err and " failed=0 " in out, (out, err)


def test_broker_command_stops_cleanly_leaving_no_process(cli_env, tmp_path):
    process = subprocess.Popen(
        [*STREAMFIT, "broker"], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    record_path = tmp_path / "home" / "broker.json"

    def started() -> bool:
        exists = record_path.exists()
        assert exists or process.poll() is None, process.stderr.read()
        return exists

    wait_until(started, 60, message=f"streamfit broker wrote no {record_path} within 60 s")
    record = json.loads(record_path.read_text())
    env = {**cli_env}
    produced = subprocess.run(
        [*STREAMFIT, "produce", "--source", "synth:sea", "--limit", "100"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert produced.returncode == 0, produced.stderr
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    for pid in (record["pid"], record["broker_pid"]):
        assert not _alive(pid), f"process {pid} left behind"
    assert not record_path.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead but not yet reaped by its parent
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_jsonl_and_parquet_sources_with_column_mapping(kafka, tmp_path, cli_env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    events = "file-events"
    ensure_topics(kafka, {events: 3, events + ".dlq": 1})
    env = {
        **cli_env,
        "STREAMFIT_KAFKA_BOOTSTRAP": kafka,
        "STREAMFIT_TOPIC_EVENTS": events,
        "STREAMFIT_TOPIC_DLQ": events + ".dlq",
    }
    jsonl = tmp_path / "events.jsonl"
    lines = [orjson.dumps({"id": f"j{i}", "ts": 1, "features": [i, i + 1.5], "label": i % 2}) for i in range(300)]
    jsonl.write_bytes(b"\n".join(lines[:150] + [b"{broken"] + lines[150:]) + b"\n")
    table = pa.table(
        {
            "uid": [f"p{i}" for i in range(200)],
            "x1": [float(i) for i in range(200)],
            "x2": [i * 0.5 for i in range(200)],
            "y": [i % 2 for i in range(200)],
            "note": ["n"] * 200,
        }
    )
    parquet = tmp_path / "rows.parquet"
    pq.write_table(table, parquet)
    for args, sent in (
        ([str(jsonl)], 301),
        (
            [
                str(parquet),
                "--id-column",
                "uid",
                "--label-column",
                "y",
                "--feature-columns",
                "x1,x2",
                "--label-fraction",
                "0.5",
            ],
            200,
        ),
    ):
        done = subprocess.run(
            [*STREAMFIT, "produce", "--source", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert f"sent={sent} acknowledged={sent} failed=0" in done.stdout
    values = [orjson.loads(r.value) for r in read_topic(kafka, events, expected=500)]
    assert len(values) == 500
    parquet_events = {v["id"]: v for v in values if v["id"].startswith("p")}
    assert parquet_events["p7"]["features"] == [7.0, 3.5]
    labelled = sum(v["label"] is not None for v in parquet_events.values())
    assert 60 < labelled < 140, "about half the parquet events keep their label"
    dead = [orjson.loads(r.value) for r in read_topic(kafka, events + ".dlq", expected=1)]
    assert len(dead) == 1 and dead[0]["offset"] == 151 and "not valid JSON" in dead[0]["error"]
