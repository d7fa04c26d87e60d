"""The numpy engine next to the TensorFlow one (issue 16): memory of a process that predicts, and call times.

``python -m bench.engines [--repeats N]`` prints one JSON object:

- ``rss_mb``: peak and final RSS of a fresh process that loads ``small`` from a registry and predicts
  one row, per engine (what each Spark Python worker, serving process or evaluator pays), and its
  seconds from start to the first prediction;
- ``predict_ms``: median ``predict_proba`` time per call on 1 and 1,000 rows, ``small`` and ``higgs``;
- ``train_ms``: median ``train_on_batch`` time on 64 rows, ``small`` and ``higgs``.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

LOAD_AND_PREDICT = """
import resource, sys, time
started = time.perf_counter()
import numpy as np
from pipeline.registry import Registry
bundle = Registry(sys.argv[1]).load("small", engine=sys.argv[2])
bundle.predict_proba(np.zeros((1, 10), np.float32))
seconds = time.perf_counter() - started
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(rss / 1024, peak / 1024, seconds, "tensorflow" in sys.modules)
"""


def process_rss(registry_url: str, engine: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, registry_url, engine], check=True, capture_output=True, text=True
    ).stdout.split()
    return {
        "rss_mb": round(float(out[0])),
        "peak_mb": round(float(out[1])),
        "seconds_to_first_prediction": round(float(out[2]), 2),
        "imports_tensorflow": out[3] == "True",
    }


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    from pipeline.bundle import ModelBundle
    from pipeline.registry import Registry
    from pipeline.spec import BUILTIN_SPECS

    with tempfile.TemporaryDirectory() as home:
        registry = Registry(home)
        registry.create_model(BUILTIN_SPECS["small"])
        version = registry.register("small", ModelBundle(BUILTIN_SPECS["small"]).get_weights())
        registry.set_alias("small", "champion", version)
        rss = {engine: process_rss(home, engine) for engine in ("numpy", "tensorflow")}
    rng = np.random.default_rng(0)
    predict, train = {}, {}
    for name in ("small", "higgs"):
        spec = BUILTIN_SPECS[name]
        for engine in ("numpy", "tensorflow"):
            bundle = ModelBundle(spec, engine=engine)
            for rows in (1, 1000):
                x = rng.normal(size=(rows, spec.n_features)).astype(np.float32)
                predict[f"{name}/{engine}/{rows}"] = median_ms(functools.partial(bundle.predict_proba, x), args.repeats)
            x, y = rng.normal(size=(64, spec.n_features)).astype(np.float32), rng.integers(0, 2, 64)
            train[f"{name}/{engine}/64"] = median_ms(
                functools.partial(bundle.train_on_batch, x, y), max(args.repeats // 4, 10)
            )
    print(json.dumps({"rss_mb": rss, "predict_ms": predict, "train_ms": train}, indent=1))


if __name__ == "__main__":
    main()
