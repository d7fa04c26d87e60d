"""Crash every part of the running pipeline with SIGKILL, several times each, and count what survived.

The pipeline runs as separate real processes (the embedded broker, ``streamfit ps``, ``serve``,
``predict``, ``train``) with a producer at a few hundred events/s and a request load on serving. In
each of ``KILLS_PER_PART`` rounds every part is killed once, in a random order at random moments (a
part is started again right after its kill, so several can be down or starting at once); a round
ends when every part is up again. The consumers go first in a round: their restarts (a Spark driver,
TensorFlow in the workers) take longest and overlap the other kills. Afterwards, from the topics and the
parameter server's own record:

- every valid event has a prediction (at-least-once; duplicates are counted and reported),
- the labelled valid events were trained exactly once: the rows the parameter server applied for the
  training query equal their number,
- every broken event is in the dead-letter topic exactly once for each consumer (the dead-letter
  fence keeps replayed micro-batches from writing theirs again),
- serving answered every request while it was up, whichever other part was down.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter

import pytest

from pipeline.events import Event, FeatureSchema, validate
from pipeline.ps.client import Client
from pipeline.spec import BUILTIN_SPECS
from tests.faults import harness
from tests.faults.harness import STREAMFIT, ServingLoad
from tests.kafka_reader import read_topic

pytestmark = pytest.mark.slow
cluster = harness.cluster  # the fixture, requested by name below

KILLS_PER_PART = 3
RATE = 150  # events/s
SEED = int(time.time()) % 10_000


def test_every_part_survives_sigkill(cluster):
    rng = random.Random(SEED)
    parts = cluster.parts
    parts["broker"].start()
    subprocess.run(
        [*STREAMFIT, "models", "create", "small", "--spec", "small", "--exist-ok"],
        env=cluster.env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name in ("ps", "serve", "predict", "train"):
        parts[name].launch()
    for part in parts.values():
        part.wait_ready(300)
    log = (cluster.home.parent / "logs" / "produce.log").open("ab")
    producer = subprocess.Popen(
        [
            *STREAMFIT,
            "produce",
            "--source",
            "synth:hyperplane",
            "--rate",
            str(RATE),
            "--limit",
            "0",
            "--no-progress",
            "--invalid-fraction",
            "0.02",
            "--label-fraction",
            "0.5",
            "--seed",
            str(SEED),
        ],
        env=cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    spec = BUILTIN_SPECS["small"]
    load = ServingLoad(f"{cluster.serve_url}/v1/models/small:predict", {"instances": [[0.5] * spec.n_features]}).start()
    serve_down: list[tuple[float, float]] = []
    try:
        for _ in range(KILLS_PER_PART):
            consumers, others = ["train", "predict"], ["broker", "ps", "serve"]
            rng.shuffle(consumers)
            rng.shuffle(others)
            for name in consumers + others:  # the slow restarts (Spark, TensorFlow) first, overlapping the rest
                time.sleep(rng.uniform(1, 5))
                killed_at = time.monotonic()
                parts[name].kill()
                time.sleep(rng.uniform(0.2, 2))
                parts[name].launch()
                if name == "serve":  # requests fail only while serving itself is down: wait for it, note when
                    parts[name].wait_ready(300)
                    serve_down.append((killed_at, time.monotonic()))
            for part in parts.values():
                part.wait_ready(300)
        time.sleep(5)
    finally:
        producer.send_signal(signal.SIGINT)  # it waits for its acknowledgements
        try:
            producer.wait(60)
        finally:
            if producer.poll() is None:  # never left behind, even when it did not stop in time
                producer.kill()
                producer.wait(10)
            log.close()
            load.stop()

    schema = FeatureSchema(tuple(spec.feature_names), spec.n_classes)
    events = read_topic(cluster.bootstrap, "events", 1, timeout_s=60, settle_s=3)
    verdicts = {(r.partition, r.offset): validate(r.value, schema) for r in events}
    valid = {v.id for v in verdicts.values() if isinstance(v, Event)}
    labelled = sum(1 for v in verdicts.values() if isinstance(v, Event) and v.label is not None)
    broken = {key for key, v in verdicts.items() if not isinstance(v, Event)}
    assert len(valid) > 1000 and broken

    predicted, trained = _drain(cluster, valid, labelled, timeout_s=300)
    dead = Counter((d["stage"], d["partition"], d["offset"]) for d in _values(cluster.bootstrap, "events.dlq"))
    report = {
        "seed": SEED,
        "events": len(events),
        "valid": len(valid),
        "labelled": labelled,
        "broken": len(broken),
        "predictions": sum(predicted.values()),
        "duplicate_predictions": sum(predicted.values()) - len(predicted),
        "trained_rows": trained,
        "duplicate_dead_letters": sum(dead.values()) - len(dead),
        "kills": {name: part.kills for name, part in parts.items()},
    }
    print(report)

    assert producer.returncode == 0, f"producer exited with {producer.returncode}: sends were lost ({report})"
    assert not valid - set(predicted), f"valid events never predicted: {len(valid - set(predicted))} ({report})"
    assert trained == labelled, f"labelled events trained {trained} times in all, expected {labelled} ({report})"
    for stage in ("predict", "train"):
        missing = broken - {(p, o) for s, p, o in dead if s == stage}
        assert not missing, f"{len(missing)} broken events never dead-lettered by {stage} ({report})"
    assert report["duplicate_dead_letters"] == 0, f"dead letters written twice: {dead.most_common(5)} ({report})"
    failed = [
        (t, outcome)
        for t, outcome in load.outcomes  # t: when the answer (or the failure) came
        if outcome != 200 and not any(down <= t <= up for down, up in serve_down)
    ]
    assert load.outcomes and not failed, f"serving failed {len(failed)} requests while it was up: {failed[:5]}"


def _drain(cluster, valid: set[str], labelled: int, timeout_s: float) -> tuple[Counter, int]:
    """Wait until every valid event is predicted and every labelled one trained (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        predicted = Counter(p["id"] for p in _values(cluster.bootstrap, "predictions"))
        with Client("127.0.0.1", cluster.ps_port, timeout_s=30) as client:
            queries = client.stats()["queries"]
        trained = sum(int(q.get("rows", 0)) for q in queries.values())
        if (valid <= set(predicted) and trained >= labelled) or time.monotonic() > deadline:
            return predicted, trained
        time.sleep(5)


def _values(bootstrap: str, topic: str) -> list[dict]:
    import orjson

    return [orjson.loads(r.value) for r in read_topic(bootstrap, topic, 1, timeout_s=30, settle_s=2)]
