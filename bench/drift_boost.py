"""The training consumer's reaction to drift, measured: recovery after an abrupt drift with and without
the learning-rate boost, side by side in one run.

``python -m bench.drift_boost [--events N] [--micro-batch N] [--seeds 6,11]`` streams hyperplane events
whose classes are swapped at ``drift_at`` (a drift every event feels, as in the drift test) through
``bench.training``'s streamfit path (``small`` spec, ADAG, 2 workers), once with ``drift_boost`` 1 (no
reaction) and once with the default boost, per seed. Prints one JSON object: per seed and boost, the
prequential accuracy over the ``drift_boost_events`` events after the drift, over the rest of the
stream, and over the whole stream.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from bench import training
from producers.synthetic import synthetic_rows


def swapped_rows(seed: int, events: int, drift_at: int) -> list:
    rows = itertools.islice(synthetic_rows("hyperplane", seed=seed, drift_at=drift_at), events)
    return [(x, y if i < drift_at else 1 - y) for i, (x, y) in enumerate(rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift_boost", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=22_000)
    parser.add_argument("--micro-batch", type=int, default=1000)
    parser.add_argument("--seeds", default="6,11")
    args = parser.parse_args(argv)

    from pipeline.settings import load_settings

    drift_at, settings = args.events // 2, load_settings()
    after = slice(drift_at, drift_at + settings.drift_boost_events)
    results: dict[str, dict] = {}
    with training.spark_and_broker("bench-drift-boost") as (spark, bootstrap, home):
        for seed in map(int, args.seeds.split(",")):
            rows = swapped_rows(seed, args.events, drift_at)
            for boost in (1.0, settings.drift_boost):
                run = training.run_streamfit(
                    spark,
                    bootstrap,
                    home / f"{seed}-{boost}",
                    "hyperplane",
                    rows,
                    "adag",
                    args.micro_batch,
                    "small",
                    drift_boost=boost,
                )
                correct = run["outcomes"]
                results.setdefault(f"seed_{seed}", {})[f"boost_{boost:g}"] = {
                    "after_drift_accuracy": round(float(correct[after].mean()), 4),
                    "later_accuracy": round(float(correct[after.stop :].mean()), 4)
                    if len(correct) > after.stop
                    else None,
                    "mean_accuracy": run["mean_accuracy"],
                    "drift_flagged_at": run["drift_flagged_at"],
                }
    gains = [
        r[f"boost_{settings.drift_boost:g}"]["after_drift_accuracy"] - r["boost_1"]["after_drift_accuracy"]
        for r in results.values()
    ]
    print(
        json.dumps(
            {
                "events": args.events,
                "drift_at": drift_at,
                "micro_batch": args.micro_batch,
                "drift_boost": settings.drift_boost,
                "drift_boost_events": settings.drift_boost_events,
                "mean_after_drift_gain": round(float(np.mean(gains)), 4),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
