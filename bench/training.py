"""Streaming training next to river's online learners, on the same seeded drifting streams, in one run.

``python -m bench.training [--events N] [--algorithms adag,eamsgd] [--png PATH]`` streams each of
``hyperplane`` and ``rbf`` (abrupt concept drift half-way; rbf's centroids also move all the time)
into a topic of an embedded broker, then trains the ``wide`` spec with ``streamfit train``'s job
(Spark ``local[2]``, 2 workers, an in-process parameter server over TCP) from Kafka, timing the
query from the start of its first micro-batch to the end of its last (wall clock: Spark's own
work between micro-batches counts; warming the Python workers before the first one is reported
apart). Both sides are scored test-then-train: river one event at a time, streamfit's workers one
minibatch at a time.
In the same process, on the same events, river's logistic regression (standardised), Hoeffding
adaptive tree and adaptive random forest learn one event at a time, test-then-train. Prints one
JSON object (final and mean prequential accuracy and events/s of each; the ratios the targets
name, against ARF) and writes a PNG of prequential accuracy over events.

``stagger`` (river's STAGGER: three categorical features, codes 0..2, the concept switching half-way)
is trained twice with the ``stagger`` spec: its features one-hot encoded as the spec declares them
categorical, and the same model taking the codes as numbers (``<algorithm>_codes_as_numbers``, the
spec without ``categorical``); the summary gives the accuracy the encoding gains. ``--streams``
picks the streams.

``--cluster`` runs the streamfit side once more on a Spark standalone cluster of two one-core workers
(:mod:`pipeline.spark.standalone`; executors in their own JVMs) and reports it beside ``local[2]``
(``<algorithm>@cluster`` rows; the comparison with river stays on the ``local[2]`` rows).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from pipeline.spec import BUILTIN_SPECS, ModelSpec
from producers.synthetic import synthetic_rows

STREAMS = ("hyperplane", "rbf", "stagger")
WINDOW = 2000  # events in the sliding accuracy drawn and called final


def river_models() -> dict:
    from river import compose, forest, linear_model, preprocessing, tree

    return {
        "river_logistic_regression": compose.Pipeline(
            preprocessing.StandardScaler(), linear_model.LogisticRegression()
        ),
        "river_hoeffding_adaptive_tree": tree.HoeffdingAdaptiveTreeClassifier(seed=0),
        "river_arf": forest.ARFClassifier(seed=0),
    }


def run_river(model, rows: list) -> dict:
    """Test-then-train one event at a time; per-event correctness gives the curve."""
    correct = np.zeros(len(rows))
    started = time.perf_counter()
    for i, (features, label) in enumerate(rows):
        x = dict(enumerate(features))
        correct[i] = model.predict_one(x) == label
        model.learn_one(x, label)
    return _summary(correct, len(rows) / (time.perf_counter() - started))


@contextlib.contextmanager
def spark_and_broker(name: str, cluster=None):
    """``(spark, bootstrap, home)``: a Spark session (local, or on the started standalone ``cluster``)
    and an embedded broker in a temporary home, both stopped on the way out."""
    from pipeline.broker import EmbeddedBroker
    from pipeline.settings import load_settings
    from pipeline.spark.session import spark_session

    on = {"spark_master": cluster.url, "spark_conf": cluster.app_conf} if cluster is not None else {}
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        home = Path(tmp)
        broker = EmbeddedBroker("noida", data_dir=home / "broker")
        broker.start()
        try:
            spark = spark_session(load_settings(home=home, **on), name)
            try:
                yield spark, broker.bootstrap, home
            finally:
                spark.stop()
        finally:
            broker.stop()


def run_streamfit(
    spark,
    bootstrap: str,
    home: Path,
    stream: str,
    rows: list,
    algorithm: str,
    batch: int,
    model: str | ModelSpec = "small",
    **overrides: object,
) -> dict:
    """Produce the rows as events, then train ``model`` (a built-in spec's name, or a spec) from Kafka
    (``overrides``: job settings); every labelled event's prequential outcome counts (``outcomes``: each
    one's correctness, in arrival order)."""
    from consumers.training import TrainingJob
    from pipeline.bundle import ModelBundle
    from pipeline.kafka import ensure_topics, producer
    from pipeline.ps.algorithms import from_settings
    from pipeline.ps.server import CenterState, ParameterServer
    from pipeline.registry import Registry
    from pipeline.settings import load_settings
    from producers.sender import Sender, synthetic_events

    topic = f"bench-{stream}-{algorithm}-{uuid.uuid4().hex[:8]}"  # a fresh topic per run
    ensure_topics(bootstrap, {topic: 3, topic + ".dlq": 1, topic + ".metrics": 1})
    kafka_producer = producer(bootstrap)
    sender = Sender(kafka_producer, topic, topic + ".dlq")
    for message in synthetic_events(rows, stream):
        sender.send(message)
    assert sender.close().failed == 0
    kafka_producer.close()

    spec = model if isinstance(model, ModelSpec) else BUILTIN_SPECS[model]
    registry = Registry(home / topic / "registry")
    registry.create_model(spec)
    registry.set_alias(spec.name, "champion", registry.register(spec.name, ModelBundle(spec).get_weights()))
    settings = load_settings(
        home=home / topic,
        model=spec.name,
        algorithm=algorithm,
        workers=2,
        topic_events=topic,
        topic_dlq=topic + ".dlq",
        topic_training_metrics=topic + ".metrics",
        kafka_source="python",
        max_offsets_per_trigger=batch,
        **overrides,
    )
    state = CenterState(registry.weights(spec.name)[1], from_settings(settings).rule())
    with ParameterServer(state, port=0) as server:
        settings = settings.model_copy(update={"ps_port": server.address[1]})
        job = TrainingJob(spark, settings, bootstrap, registry)
        outcomes, score = [], job.prequential.score  # every event's outcome, for the curve (records keep batch figures)
        job.prequential.score = lambda correct, label_probability: (
            outcomes.append(correct),
            score(correct, label_probability),
        )[1]
        query = job.start(str(home / topic / "checkpoint"), trigger={"availableNow": True}, starting_offsets="earliest")
        query.awaitTermination()
        job.close()
    if query.exception():
        raise RuntimeError(str(query.exception()))
    history = list(job.history)
    seconds = (history[-1]["ts"] - history[0]["ts"]) / 1000 + history[0]["seconds"]  # first start to last end
    correct = np.concatenate(outcomes)
    phases = {name: round(sum(r["phases"].get(name, 0) for r in history), 2) for name in history[0]["phases"]}
    drift = [r["drift_at_event"] for r in history if r.get("drift")]
    return {
        **_summary(correct, len(rows) / seconds),
        "seconds": round(seconds, 2),
        "warm_up_s": round(job.warm_up_s, 2),
        "micro_batches": len(history),
        "phase_seconds": phases,
        "drift_flagged_at": drift,
        "outcomes": correct,
    }


def specs_for(stream: str, model: str) -> dict[str, str | ModelSpec]:
    """The models streamfit trains on ``stream``, by the suffix of their learner's name: ``model``, or for
    ``stagger`` its categorical spec and the same spec taking the codes as numbers."""
    if stream != "stagger":
        return {"": model}
    categorical = BUILTIN_SPECS["stagger"]
    return {
        "": categorical,
        "_codes_as_numbers": ModelSpec.model_validate(categorical.model_dump() | {"categorical": {}}),
    }


def _summary(correct: np.ndarray, events_per_s: float) -> dict:
    return {
        "final_accuracy": round(float(correct[-WINDOW:].mean()), 4),
        "mean_accuracy": round(float(correct.mean()), 4),
        "events_per_s": round(events_per_s, 1),
        "curve": [
            round(float(correct[max(0, i - WINDOW) : i].mean()), 4) for i in range(WINDOW, len(correct) + 1, WINDOW)
        ],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (stream, learners) in zip(axes[0], results.items()):
        for name, result in learners.items():
            ax.plot([WINDOW * (i + 1) for i in range(len(result["curve"]))], result["curve"], label=name)
        ax.set(title=f"{stream} (drift half-way)", xlabel="events", ylabel=f"prequential accuracy (last {WINDOW})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument(
        "--algorithms",
        default="adag,eamsgd",
        help="streamfit algorithms to run (comma-separated); the best is compared",
    )
    parser.add_argument("--model", default="wide", help="built-in spec streamfit trains (stagger: the stagger spec)")
    parser.add_argument("--streams", default=",".join(STREAMS), help="synthetic streams (comma-separated)")
    parser.add_argument("--micro-batch", type=int, default=20_000, help="maxOffsetsPerTrigger of the training query")
    parser.add_argument("--png", type=Path, default=Path("bench/training.png"))
    parser.add_argument("--cluster", action="store_true", help="also train on a Spark standalone cluster")
    args = parser.parse_args(argv)

    streams = {
        stream: list(itertools.islice(synthetic_rows(stream, seed=7, drift_at=args.events // 2), args.events))
        for stream in args.streams.split(",")
    }
    results: dict[str, dict] = {stream: {} for stream in streams}
    with spark_and_broker("bench-training") as (spark, bootstrap, home):
        for stream, rows in streams.items():
            learners = results[stream]
            for algorithm in args.algorithms.split(","):
                for suffix, model in specs_for(stream, args.model).items():
                    print(f"bench.training: {stream} streamfit {algorithm}{suffix}", file=sys.stderr, flush=True)
                    learners[f"streamfit_{algorithm}{suffix}"] = run_streamfit(
                        spark, bootstrap, home, stream, rows, algorithm, args.micro_batch, model
                    )
            for name, model in river_models().items():
                print(f"bench.training: {stream} {name}", file=sys.stderr, flush=True)
                learners[name] = run_river(model, rows)
    if args.cluster:
        from pipeline.spark.standalone import StandaloneCluster

        with (
            StandaloneCluster(workers=2, cores=1, memory="1g") as cluster,
            spark_and_broker("bench-training-cluster", cluster) as (spark, bootstrap, home),
        ):
            for stream, rows in streams.items():
                for algorithm in args.algorithms.split(","):
                    print(f"bench.training: {stream} streamfit {algorithm} on the cluster", file=sys.stderr, flush=True)
                    results[stream][f"streamfit_{algorithm}@cluster"] = run_streamfit(
                        spark,
                        bootstrap,
                        home,
                        stream,
                        rows,
                        algorithm,
                        args.micro_batch,
                        specs_for(stream, args.model)[""],
                    )
    summary = {}
    for stream, learners in results.items():
        local = [n for n in learners if n.startswith("streamfit_") and "@" not in n and "_codes_as_numbers" not in n]
        best = max(local, key=lambda n: learners[n]["mean_accuracy"])
        arf = learners["river_arf"]
        summary[stream] = {
            "best_streamfit": best,
            "mean_accuracy_minus_arf": round(learners[best]["mean_accuracy"] - arf["mean_accuracy"], 4),
            "events_per_s_vs_arf": round(learners[best]["events_per_s"] / arf["events_per_s"], 2),
        }
        if stream == "stagger":
            summary[stream]["categorical_minus_codes_as_numbers"] = {
                name: {
                    figure: round(learners[name][figure] - learners[f"{name}_codes_as_numbers"][figure], 4)
                    for figure in ("mean_accuracy", "final_accuracy")
                }
                for name in local
            }
        if args.cluster:
            summary[stream]["cluster_events_per_s_vs_local"] = {
                name: round(learners[f"{name}@cluster"]["events_per_s"] / learners[name]["events_per_s"], 2)
                for name in local
            }
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.png)
    for learners in results.values():
        for result in learners.values():
            result.pop("curve")
            result.pop("outcomes", None)
    print(
        json.dumps(
            {
                "events_per_stream": args.events,
                "drift_at": args.events // 2,
                "workers": 2,
                "model": args.model,
                "micro_batch": args.micro_batch,
                "targets": {"mean_accuracy_minus_arf": ">= 0", "events_per_s_vs_arf": ">= 10"},
                "summary": summary,
                "results": results,
                "png": str(args.png),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
