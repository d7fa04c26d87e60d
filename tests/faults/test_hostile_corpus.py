"""The hostile corpus through the running pipeline: a few thousand valid events with every hostile
event of tests/hostile_corpus.py interleaved, sent to the events topic, read by BOTH Spark consumers
at once (the inference and the training query, each with its own checkpoint) on real local Spark,
the real broker and a real parameter server.

Neither query stops; every hostile Kafka record is dead-lettered exactly once by each consumer
stage (``predict`` and ``train``) with its reason; every valid event around them is predicted once
per record, and every valid labelled one trained once, counted by the training job and by the
parameter server; every dead letter stays under 64 KiB.

What counts as hostile, decided here:

- everything :func:`tests.hostile_corpus.hostile_corpus` lists (the validator refuses it), and a
  second copy of one of them (a separate Kafka record: dead-lettered again, at its own offset);
- ``3e38`` in every feature, labelled: a valid float32 whose forward pass overflows the model. The
  inference consumer dead-letters it (non-finite probabilities); the training consumer too, either
  because the model's fitted standardisation takes it past float32, or as a poison event after
  ``batch_attempts`` tries the parameter server refused;
- ``9e37`` in every feature, labelled: the champion (identity standardisation) predicts it, finite,
  so it is predicted; training on it (standardised by the fitted mean/std to ~3.1e38) overflows the
  first layer: the training consumer dead-letters it as a poison event, once. (Both depend on the
  weights; ``7e37`` overflowed too little for some seeds.)

The extreme ones come after the first micro-batch, whose labelled events fit the standardisation.

Not hostile, and so predicted (and trained, if labelled), never dead-lettered:

- a duplicate id of a valid event: an id names an event for its producer, the pipeline does not
  deduplicate -- each Kafka record with a valid value is an event, answered once (at-least-once
  delivery may answer it again; these runs do not restart). Both copies are predicted and trained;
- valid events at the edges: ids with escaped control characters, NUL, non-ASCII; features at
  float32's largest value (unlabelled, so only predicted: the champion's identity standardisation
  keeps one such feature finite), underflowing to 0, negative zero; features as a {name: value} object.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import Counter

import numpy as np
import orjson
import pytest

from consumers.inference import InferenceJob
from consumers.training import TrainingJob
from pipeline.bundle import ModelBundle
from pipeline.dlq import RECORD_LIMIT, original_bytes
from pipeline.events import Event, FeatureSchema, validate
from pipeline.kafka import ensure_topics, producer
from pipeline.ps.algorithms import from_settings
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS
from producers.sender import Outgoing, Sender, synthetic_events
from producers.synthetic import synthetic_rows
from tests.hostile_corpus import hostile_corpus
from tests.kafka_reader import read_topic

pytestmark = pytest.mark.slow

SPEC = BUILTIN_SPECS["small"]
NAMES = tuple(SPEC.feature_names)
SCHEMA = FeatureSchema(NAMES, SPEC.n_classes, 64 * 1024)
N_VALID = 3000
FIRST_HOSTILE_AFTER = 1500  # valid events before the first hostile one: the first micro-batch is all valid
SPACING = 15  # valid events between two hostile ones
NON_FINITE = "the model's probabilities are not finite"
STANDARDISED = "after the model's standardisation"
POISONED = "training on this event makes the model's weights non-finite"


def _extreme(name: str, value: float, label: int) -> bytes:
    return orjson.dumps({"id": name, "ts": 1, "features": [value] * len(NAMES), "label": label})


def _hostile() -> list[tuple[bytes | None, tuple[str, ...] | None, tuple[str, ...]]]:
    """``(value, words one of which the predict stage's reason must contain -- None: it is predicted --,
    words one of which the train stage's reason must contain)``."""
    corpus = [(raw, (words,), (words,)) for raw, words in hostile_corpus(NAMES, SPEC.n_classes, SCHEMA.max_bytes)]
    return [
        *corpus,
        corpus[0],
        *(
            (_extreme(f"overflow{value:+g}", value, label), (NON_FINITE,), (STANDARDISED, POISONED))
            for value, label in ((3e38, 1), (-3e38, 0))
        ),
        *((_extreme(f"poison{value:+g}", value, label), None, (POISONED,)) for value, label in ((9e37, 1), (-9e37, 0))),
    ]


def _edges() -> list[bytes]:
    """Valid events at the edges; the first ones labelled, the float32-limit ones unlabelled."""
    zeros = [0.0] * len(NAMES)

    def doc(event_id: str, features, label) -> bytes:
        return orjson.dumps({"id": event_id, "ts": 1700000000000, "features": features, "label": label})

    return [
        doc("edge-\u0001\u001f-ctl", zeros, 1),
        doc("edge-\u0000-nul", zeros, 0),
        doc("edge-é€😀", zeros, 1),
        doc("edge-tiny", [1e-50, -1e-50, 5e-324, 1e-40, -0.0, 0.0, 1e-45, 0.5, 0.5, 0.5], 0),
        doc("edge-object", {name: 0.25 for name in reversed(NAMES)}, 1),
        doc("edge-f32max", [3.4028235e38] + zeros[1:], None),
        doc("edge-f32min", zeros[1:] + [-3.4028235e38], None),
        doc("edge-ts-max", zeros, None).replace(b"1700000000000", str(2**63 - 1).encode()),
    ]


def _stream() -> tuple[list[Outgoing], int]:
    """Valid events with the hostile ones interleaved, keyed ``h-<n>``; and how many hostile ones there are."""
    rows = list(itertools.islice(synthetic_rows("hyperplane", seed=11), N_VALID))
    valid = list(synthetic_events(rows, "v", label_fraction=0.8, seed=3))
    # duplicate ids of valid events: the same record again, and the same id with other features and label
    again = orjson.loads(valid[1700].value)
    again |= {"features": [0.1] * len(NAMES), "label": 1 - (again["label"] or 0)}
    valid += [valid[1600], valid[1700], Outgoing(b"v-1700", orjson.dumps(again))]
    valid += [Outgoing(orjson.loads(raw)["id"].encode(), raw) for raw in _edges()]
    tail = valid[FIRST_HOSTILE_AFTER:]
    tail = [tail[i] for i in np.random.default_rng(5).permutation(len(tail))]  # the duplicates and edges spread out
    hostile = [Outgoing(f"h-{n}".encode(), raw) for n, (raw, _, _) in enumerate(_hostile())]
    mixed = list(valid[:FIRST_HOSTILE_AFTER])
    for n, message in enumerate(tail):
        mixed.append(message)
        if n % SPACING == SPACING - 1 and hostile:
            mixed.append(hostile.pop(0))
    assert not hostile, "the tail is too short to interleave every hostile event"
    return mixed, len(_hostile())


def _send(bootstrap: str, topic: str, messages: list[Outgoing]) -> None:
    kafka_producer = producer(bootstrap)
    sender = Sender(kafka_producer, topic, topic + ".dlq")
    for message in messages:
        sender.send(message)
    summary = sender.close()
    kafka_producer.close()
    assert summary.failed == 0 and summary.acknowledged == len(messages), summary.errors


@pytest.fixture
def pipeline(kafka, topic, tmp_path):
    """Settings on fresh topics, a ``small`` champion (random weights, identity standardisation) in a
    registry, and a parameter server started from it; yields (settings, server)."""
    ensure_topics(kafka, {topic: 3, topic + ".dlq": 1, topic + ".pred": 3, topic + ".metrics": 1})
    settings = load_settings(
        home=tmp_path,
        model="small",
        topic_events=topic,
        topic_dlq=topic + ".dlq",
        topic_predictions=topic + ".pred",
        topic_training_metrics=topic + ".metrics",
        kafka_source="python",
        workers=2,
        batch_size=32,
        max_offsets_per_trigger=1000,
        batch_attempts=1,
        auto_promote=False,
    )
    registry = Registry(settings.registry_url)
    registry.create_model(SPEC)
    registry.set_alias("small", "champion", registry.register("small", ModelBundle(SPEC, seed=1).get_weights()))
    server = ParameterServer(CenterState(registry.weights("small")[1], from_settings(settings).rule()), port=0).start()
    try:
        yield settings.model_copy(update={"ps_port": server.address[1]}), server
    finally:
        server.stop()


def test_hostile_corpus_through_both_consumers(spark, kafka, topic, tmp_path, pipeline):
    settings, server = pipeline
    messages, n_hostile = _stream()
    _send(kafka, topic, messages)
    records = read_topic(kafka, topic, expected=len(messages))
    assert len(records) == len(messages)
    hostile = {(r.partition, r.offset): r for r in records if r.key and r.key.startswith(b"h-")}
    valid = {(r.partition, r.offset): r for r in records if (r.partition, r.offset) not in hostile}
    assert len(hostile) == n_hostile
    expected = {n: words for n, (_, *words) in enumerate(_hostile())}
    dead_at = {
        "predict": {p for p, r in hostile.items() if expected[int(r.key[2:])][0] is not None},
        "train": set(hostile),
    }
    verdicts = {position: validate(r.value, SCHEMA) for position, r in valid.items()}
    assert all(isinstance(v, Event) for v in verdicts.values())
    labelled = sum(v.label is not None for v in verdicts.values())
    predicted = Counter(v.id for v in verdicts.values())
    predicted.update(validate(r.value, SCHEMA).id for p, r in hostile.items() if p not in dead_at["predict"])

    started = time.monotonic()
    inference = InferenceJob(spark, settings, kafka)
    training = TrainingJob(spark, settings, kafka)
    try:
        predicting = inference.start(
            str(tmp_path / "ck-predict"), trigger={"availableNow": True}, starting_offsets="earliest"
        )
        trainer = training.start(
            str(tmp_path / "ck-train"), trigger={"availableNow": True}, starting_offsets="earliest"
        )
        for query in (predicting, trainer):
            assert query.awaitTermination(600), f"{query.name} did not finish in 10 minutes"
        assert predicting.exception() is None, predicting.exception()
        assert trainer.exception() is None, trainer.exception()
        query_id = str(trainer.id)
    finally:
        for query in spark.streams.active:
            if query.name in ("streamfit-inference", "streamfit-training"):
                query.stop()
        training.close()
    elapsed = time.monotonic() - started

    # every hostile record dead-lettered once per stage, with its reason; nothing valid dead-lettered
    dead = [
        (len(r.value), orjson.loads(r.value)) for r in read_topic(kafka, settings.topic_dlq, expected=2 * n_hostile)
    ]
    assert all(size < RECORD_LIMIT for size, _ in dead), max(size for size, _ in dead)
    per_stage = Counter((d["stage"], d["partition"], d["offset"]) for _, d in dead)
    problems = []
    for stage in ("predict", "train"):
        for position in dead_at[stage]:
            if per_stage[(stage, *position)] != 1:
                record = hostile[position]
                problems.append(
                    f"{stage}: {record.key.decode()} at {position} dead-lettered "
                    f"{per_stage[(stage, *position)]} times: {(record.value or b'')[:80]!r}"
                )
    for (stage, *position), count in per_stage.items():
        if tuple(position) not in dead_at[stage]:
            record = valid.get(tuple(position)) or hostile.get(tuple(position))
            problems.append(
                f"{stage}: an event it should answer, at {tuple(position)}, dead-lettered {count} times: "
                f"{record and (record.value or b'')[:120]!r}"
            )
    for _, record in dead:
        original = hostile.get((record["partition"], record["offset"]))
        if original is None:
            continue
        n = int(original.key[2:])
        words = expected[n][0 if record["stage"] == "predict" else 1] or ()
        if not record["error"] or not any(w in record["error"] for w in words):
            problems.append(f"{record['stage']}: h-{n} reason {record['error']!r} lacks {words!r}")
        raw = original.value or b""
        if (record["topic"], record["raw_size"], record["raw_sha256"]) != (
            topic,
            len(raw),
            hashlib.sha256(raw).hexdigest(),
        ):
            problems.append(f"{record['stage']}: h-{n} record does not describe its event: {record}")
        if not raw.startswith(original_bytes(record)):
            problems.append(f"{record['stage']}: h-{n} raw is not a prefix of the event")
    assert not problems, "\n".join(problems)

    # every valid record predicted once (a duplicate id once per record), nothing else predicted
    predictions = [
        orjson.loads(r.value) for r in read_topic(kafka, settings.topic_predictions, expected=sum(predicted.values()))
    ]
    assert Counter(p["id"] for p in predictions) == predicted
    assert all(np.isfinite(p["probabilities"]).all() and p["model_version"] == 1 for p in predictions)
    assert inference.reporter.metrics.registry.get_sample_value("streamfit_predict_rows_total") == len(records)

    # every valid labelled record trained once; the hostile ones and the unlabelled never
    history = list(training.history)
    assert sum(r["invalid"] for r in history) == n_hostile
    poisoned = sum(d["stage"] == "train" and POISONED in d["error"] for _, d in dead)
    assert sum(r["poison"] for r in history) == poisoned >= 2
    assert sum(r["unlabelled"] for r in history) == len(valid) - labelled
    assert sum(r["rows"] for r in history) == labelled
    assert sum(r.get("trained_rows", 0) for r in history) == labelled, history
    assert server.stats()["queries"][query_id]["rows"] == labelled
    weights = server.state.pull()[0]
    assert all(np.isfinite(w).all() for w in weights.values())
    assert elapsed < 600, elapsed
