"""Offline training: sequential SGD next to the parameter-server algorithms, on the same data, in one run.

``python -m bench.fit [--rows N] [--epochs E] [--png PATH]`` trains the default ~1.02 M-parameter
model on the same seeded higgs-like rows (a tenth held out) with ``streamfit fit``'s code path
(Spark partitions as workers of an in-process parameter server): sequential with one worker, then
ADAG, DOWNPOUR, DynSGD, AEASGD, EAMSGD and synchronous averaging with two. Each algorithm starts
from the same initial weights and trains one epoch at a time; after each epoch the held-out
accuracy is measured outside the timed part. An untimed warm-up fit first loads the model in Spark's
Python workers, so no algorithm pays that cost for the others. In the same run, plain single-process
Keras ``fit`` trains the same architecture from the same initial weights and standardisation, with the
spec's optimizer, the same batch size and epochs (``keras`` row): the baseline a new user compares
with. ``--algorithms`` picks some of the runs. Prints one JSON object (accuracy, wall time, updates,
the curve, ratios to sequential, and each parallel algorithm's time to the Keras run's held-out
accuracy over the Keras run's time, target <= 1.5) and writes a PNG of held-out accuracy against
training time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from producers.synthetic import synthetic_rows

RUNS = [("sequential", 1), ("adag", 2), ("downpour", 2), ("dynsgd", 2), ("aeasgd", 2), ("eamsgd", 2), ("sync", 2)]


def higgs_rows(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` features and labels of the seeded higgs-like stream; the first tenth are held out."""
    features, labels = zip(*itertools.islice(synthetic_rows("higgs", seed=1), rows))
    return np.asarray(features, np.float32), np.asarray(labels, np.int64)


def dataset(rows: int, directory: Path, spec) -> tuple[Path, np.ndarray, np.ndarray]:
    """The training file (Parquet, one column per feature) and the held-out rows, from one seeded stream."""
    x, y = higgs_rows(rows)
    held = rows // 10
    path = directory / "train.parquet"
    columns = {name: x[held:, i] for i, name in enumerate(spec.feature_names)}
    pq.write_table(pa.table({**columns, "label": y[held:]}), path)
    return path, x[:held], y[:held]


def train(spark, registry, settings, data: Path, held: tuple[np.ndarray, np.ndarray], epochs: int) -> dict:
    """Train epoch by epoch (each fit continues from the last one's result); the curve is
    (cumulative training seconds, held-out accuracy), starting from the initial weights. ``commits``
    and ``bytes_in``/``bytes_out`` are the parameter server's traffic (``bench.compression``)."""
    from pipeline.fit import fit
    from pipeline.training import evaluate

    model = settings.model
    curve = [(0.0, evaluate(registry.load(model, "champion"), *held)["accuracy"])]
    seconds, updates = 0.0, 0
    traffic = dict.fromkeys(("commits", "bytes_in", "bytes_out"), 0)
    for _ in range(epochs):
        result = fit(spark, settings, registry, data, holdout=0.0, promote=True)
        seconds += result.seconds
        updates += result.updates
        traffic["commits"] += sum(worker["commits"] for worker in result.workers)
        traffic["bytes_in"] += result.bytes_in
        traffic["bytes_out"] += result.bytes_out
        curve.append((round(seconds, 2), evaluate(registry.load(model, "champion"), *held)["accuracy"]))
    return {
        "accuracy": curve[-1][1],
        "seconds": round(seconds, 2),
        "updates": updates,
        "curve": [[t, round(a, 4)] for t, a in curve],
        **traffic,
    }


def keras_fit(spec, data: Path, held: list[np.ndarray], initial: dict, batch_size: int, epochs: int) -> dict:
    """Plain single-process Keras ``fit`` on the training file's rows, standardised as ``streamfit fit``
    does (statistics of the training rows); the curve as in :func:`train`. Timed like a ``streamfit
    fit``, which reads and checks its file each epoch: reading the file and standardising, then ``fit``."""
    from pipeline.bundle import fit_standardisation, standardisation_weights
    from pipeline.keras_engine import KerasEngine
    from pipeline.training import evaluate

    engine = KerasEngine(spec)
    engine.compile()
    engine.set_weights(initial)
    curve, seconds = [(0.0, evaluate(engine, *held)["accuracy"])], 0.0
    for epoch in range(epochs):
        started = time.monotonic()
        table = pq.read_table(data)
        x = np.stack([table.column(name).to_numpy() for name in spec.feature_names], axis=1)
        y = table.column("label").to_numpy()
        if epoch == 0:
            engine.set_weights(initial | standardisation_weights(*fit_standardisation(x)))
        engine.model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        seconds += time.monotonic() - started
        curve.append((round(seconds, 2), evaluate(engine, *held)["accuracy"]))
    return {
        "accuracy": curve[-1][1],
        "seconds": round(seconds, 2),
        "updates": epochs * -(-len(x) // batch_size),
        "curve": [[t, round(a, 4)] for t, a in curve],
    }


def time_to_reach(curve: list, accuracy: float) -> float | None:
    """The training time at which ``curve`` first reaches ``accuracy`` (None: never)."""
    return next((t for t, a in curve if a >= accuracy), None)


def warm_up(spark, tmp: Path, data: Path, spec, initial: dict, held) -> None:
    """An untimed fit on 2,000 rows that loads the model in Spark's Python workers, so the first
    timed run does not pay that cost for the others."""
    from pipeline.settings import load_settings

    warm_data = tmp / "warm.parquet"
    pq.write_table(pq.read_table(data).slice(0, 2000), warm_data)
    settings = load_settings(home=tmp, model=spec.name, algorithm="downpour", workers=2)
    train(spark, _fresh_registry(tmp / "warm", spec, initial), settings, warm_data, held, 1)


def fastest_to(parallel: dict, target: str) -> dict:
    """The parallel run that reached ``target`` first, its time over the Keras run's, and whether <= 1.5."""
    ratios = {name: result[f"time_to_{target}_vs_keras"] for name, result in parallel.items()}
    reached = {name: ratio for name, ratio in ratios.items() if ratio is not None}
    fastest = min(reached, key=reached.__getitem__, default=None)
    ratio = None if fastest is None else reached[fastest]
    return {"fastest": fastest, "time_vs_keras": ratio, "met": ratio is not None and ratio <= 1.5}


def _fresh_registry(root: Path, spec, initial: dict):
    from pipeline.registry import Registry

    registry = Registry(root)
    registry.create_model(spec)
    registry.set_alias(spec.name, "champion", registry.register(spec.name, initial, algorithm="init"))
    return registry


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for name, result in results.items():
        times, accuracies = zip(*result["curve"])
        axes.plot(
            times, accuracies, marker="o", label=f"{name} ({result['workers']} worker{'s' * (result['workers'] > 1)})"
        )
    axes.set(xlabel="training wall time (s)", ylabel="held-out accuracy", title="streamfit fit: higgs-like rows")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fit", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--png", type=Path, default=Path("bench/fit.png"))
    parser.add_argument(
        "--algorithms", type=lambda text: text.split(","), default=[name for name, _ in RUNS], help="comma-separated"
    )
    args = parser.parse_args(argv)
    runs = [(name, workers) for name, workers in RUNS if name in args.algorithms or name == "sequential"]

    from pipeline.bundle import ModelBundle
    from pipeline.settings import load_settings
    from pipeline.spark.session import spark_session
    from pipeline.spec import BUILTIN_SPECS

    spec = BUILTIN_SPECS["higgs"]
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        tmp = Path(tmp)
        data, *held = dataset(args.rows, tmp, spec)
        initial = ModelBundle(spec, seed=0).get_weights()
        spark = spark_session(load_settings(home=tmp), "bench-fit")
        results = {}
        try:
            warm_up(spark, tmp, data, spec, initial, held)
            for algorithm, workers in runs:
                print(f"bench.fit: {algorithm} x{workers}", file=sys.stderr, flush=True)
                registry = _fresh_registry(tmp / algorithm, spec, initial)
                settings = load_settings(home=tmp, model=spec.name, algorithm=algorithm, workers=workers)
                results[algorithm] = {"workers": workers, **train(spark, registry, settings, data, held, args.epochs)}
        finally:
            spark.stop()
        print("bench.fit: keras x1 (single process)", file=sys.stderr, flush=True)
        keras = {"workers": 1, **keras_fit(spec, data, held, initial, settings.batch_size, args.epochs)}
    sequential = results["sequential"]
    for result in [*results.values(), keras]:
        result["accuracy_vs_sequential"] = round(result["accuracy"] - sequential["accuracy"], 4)
        result["time_vs_sequential"] = round(result["seconds"] / sequential["seconds"], 3)
    parallel = {name: result for name, result in results.items() if result["workers"] > 1}
    # the held-out accuracy's standard error: two runs of the same training differ by about this much
    standard_error = float(np.sqrt(keras["accuracy"] * (1 - keras["accuracy"]) / len(held[1])))
    targets = {"keras_accuracy": keras["accuracy"], "within_1se": keras["accuracy"] - standard_error}
    for result in parallel.values():
        result["accuracy_vs_keras"] = round(result["accuracy"] - keras["accuracy"], 4)
        for target, accuracy in targets.items():
            reached = time_to_reach(result["curve"], accuracy)
            result[f"time_to_{target}_vs_keras"] = None if reached is None else round(reached / keras["seconds"], 3)
    results["keras"] = keras
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.png)
    best = max(parallel, key=lambda name: parallel[name]["accuracy"])
    print(
        json.dumps(
            {
                "model": spec.name,
                "parameters": ModelBundle(spec).n_parameters,
                "rows": args.rows,
                "train_rows": args.rows - len(held[1]),
                "holdout_rows": len(held[1]),
                "epochs": args.epochs,
                "batch_size": settings.batch_size,
                "communication_window": settings.communication_window,
                "results": results,
                "best_parallel": best,
                "keras_target": {
                    "what": "the best parallel algorithm reaches the Keras run's held-out accuracy in <= 1.5x its time",
                    "keras_accuracy_standard_error": round(standard_error, 4),
                    **{target: fastest_to(parallel, target) for target in targets},
                },
                "png": str(args.png),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
