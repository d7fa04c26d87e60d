"""Compressed parameter-server traffic: bench.fit's workload once per encoding, in one run.

``python -m bench.compression [--rows N] [--epochs E] [--algorithm adag] [--link-mbps 100]
[--encodings float32,topk]`` trains the default ~1.02 M-parameter model on bench.fit's seeded
higgs-like rows with ``streamfit fit``'s code path (two Spark workers, an in-process parameter
server over TCP), from the same initial weights, once per commit encoding (``ps_encoding``:
float32, float16, int8, topk). ``--link-mbps`` holds the parameter server's link to that many MB/s
each way (``ps_link_mbps``, a token bucket), so wall time reflects the bytes on one machine. Prints
one JSON object: per encoding the bytes the server received and sent per commit, commits/s, wall
time and held-out accuracy, their ratios to float32, and the issue's targets with whether each is
met (best encoding: >= 8x fewer bytes per commit at no more than 0.5 points of accuracy below
float32; with the link throttled, a shorter wall time than float32).

``--sparsity 0.5,0.8,0.9,0.95 [--rows 60000]`` measures pruned models instead (:mod:`pipeline.pruning`),
in process: the model trains one pass over the training rows through an in-process parameter server
(DOWNPOUR, window 1), then per sparsity it is pruned one-shot (then fine-tuned on the fine-tuning rows)
or iteratively (4 steps up to the sparsity, a quarter of the same rows fine-tuning after each), every
fine-tuning update applied through the masks by the parameter server. Prints held-out accuracy, the
parameter counts, and the size of the weights' safetensors file, dense and zlib-compressed (level 6):
safetensors stores zeros like any value, so only compression turns sparsity into fewer bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from bench.fit import _fresh_registry, dataset, train, warm_up
from pipeline.ps.encoding import ENCODINGS

BYTES_RATIO_TARGET = 8.0
ACCURACY_DROP_TARGET = 0.005


def summary(result: dict) -> dict:
    commits = max(result["commits"], 1)
    return {
        "accuracy": result["accuracy"],
        "seconds": result["seconds"],
        "commits": result["commits"],
        "commits_per_s": round(result["commits"] / result["seconds"], 1),
        "bytes_per_commit": round(result["bytes_in"] / commits),  # pull requests (~100 B each) included
        "bytes_out_per_commit": round(result["bytes_out"] / commits),  # pulls and acks
        "curve": result["curve"],
    }


def targets(results: dict, link_mbps: float | None) -> dict:
    """The issue's targets against float32, for the encoding with the fewest bytes per commit among
    those within the accuracy margin (among all, when none is)."""
    base = results["float32"]
    for result in results.values():
        result["bytes_ratio"] = round(base["bytes_per_commit"] / result["bytes_per_commit"], 2)
        result["accuracy_vs_float32"] = round(result["accuracy"] - base["accuracy"], 4)
        result["time_vs_float32"] = round(result["seconds"] / base["seconds"], 3)
    candidates = [name for name in results if name != "float32"] or ["float32"]
    close = [name for name in candidates if results[name]["accuracy_vs_float32"] >= -ACCURACY_DROP_TARGET]
    best = max(close or candidates, key=lambda name: results[name]["bytes_ratio"])
    return {
        "what": f"best encoding: >= {BYTES_RATIO_TARGET:g}x fewer bytes per commit, accuracy no more than "
        f"{ACCURACY_DROP_TARGET * 100:g} points below float32, and a shorter wall time at a 100 MB/s link",
        "best": best,
        "bytes_ratio": results[best]["bytes_ratio"],
        "bytes_met": results[best]["bytes_ratio"] >= BYTES_RATIO_TARGET,
        "accuracy_vs_float32": results[best]["accuracy_vs_float32"],
        "accuracy_met": best in close,
        "link_mbps": link_mbps,
        "time_vs_float32": results[best]["time_vs_float32"],
        "time_met": results[best]["time_vs_float32"] < 1.0 if link_mbps == 100 else None,
    }


PRUNING_STEPS = 4
BATCH = 256


def _batches(x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]


def _trained(spec, weights, masks, batches) -> dict[str, np.ndarray]:
    """``weights`` after DOWNPOUR (window 1) on ``batches`` through an in-process server holding ``masks``."""
    from pipeline.bundle import ModelBundle
    from pipeline.ps.algorithms import Downpour
    from pipeline.ps.client import LocalClient
    from pipeline.ps.server import CenterState

    algorithm = Downpour(communication_window=1)
    client = LocalClient(CenterState(weights, algorithm.rule(), masks=masks))
    algorithm.run(ModelBundle(spec), client, batches)
    return client.pull()[0]


def _scored(spec, weights, masks, held) -> dict:
    from pipeline.bundle import ModelBundle, weights_to_bytes
    from pipeline.pruning import summary
    from pipeline.training import evaluate

    bundle = ModelBundle(spec)
    bundle.set_weights(weights)
    data = weights_to_bytes(weights)  # the bytes the registry writes as weights.safetensors
    return {
        "accuracy": round(evaluate(bundle, *held)["accuracy"], 4),
        **summary(weights, masks),
        "safetensors_bytes": len(data),
        "safetensors_zlib6_bytes": len(zlib.compress(data, 6)),
    }


def sparsity_section(args, spec) -> dict:
    """Dense training once, then one-shot and iterative pruning per sparsity, each fine-tuned on the same rows."""
    from bench.fit import higgs_rows
    from pipeline.bundle import ModelBundle
    from pipeline.pruning import global_masks, masked

    x, y = higgs_rows(args.rows)
    held = (x[: args.rows // 10], y[: args.rows // 10])
    train_x, train_y = x[args.rows // 10 :], y[args.rows // 10 :]
    split = int(len(train_y) * (1 - args.finetune_share))
    started = time.perf_counter()
    dense = _trained(spec, ModelBundle(spec, seed=0).get_weights(), {}, _batches(train_x[:split], train_y[:split]))
    tune = _batches(train_x[split:], train_y[split:])
    results: dict = {
        "dense": _scored(spec, dense, {}, held),
        "dense_finetuned": _scored(spec, _trained(spec, dense, {}, tune), {}, held),  # the same rows, unpruned
    }
    for sparsity in args.sparsity:
        masks = global_masks(dense, sparsity)
        pruned = masked(dense, masks)
        one_shot = {"before_finetune_accuracy": _scored(spec, pruned, masks, held)["accuracy"]}
        one_shot |= _scored(spec, _trained(spec, pruned, masks, tune), masks, held)
        weights, masks = dense, {}
        for step in range(1, PRUNING_STEPS + 1):
            masks = global_masks(weights, sparsity * step / PRUNING_STEPS, masks)
            weights = _trained(spec, masked(weights, masks), masks, tune[step - 1 :: PRUNING_STEPS])
        results[str(sparsity)] = {"one_shot": one_shot, "iterative": _scored(spec, weights, masks, held)}
    return {
        "benchmark": "compression-sparsity",
        "model": spec.name,
        "rows": args.rows,
        "held_out_rows": len(held[1]),
        "dense_training_rows": split,
        "finetune_rows": len(train_y) - split,
        "algorithm": "downpour, window 1, in-process parameter server",
        "iterative_steps": PRUNING_STEPS,
        "pruned": "kernels only, one global |w| threshold",
        "sizes": "weights.safetensors bytes as registered (zeros stored densely) and the same bytes zlib level 6",
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--algorithm", default="adag")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--link-mbps", type=float, default=None, help="throttle the ps link (MB/s each way)")
    parser.add_argument("--topk-fraction", type=float, default=0.05)
    parser.add_argument(
        "--encodings", type=lambda text: text.split(","), default=list(ENCODINGS), help="comma-separated"
    )
    parser.add_argument(
        "--sparsity",
        type=lambda text: [float(value) for value in text.split(",")],
        help="pruned models instead: comma-separated sparsities, e.g. 0.5,0.8,0.9,0.95",
    )
    parser.add_argument(
        "--finetune-share", type=float, default=0.25, help="--sparsity: training rows kept to fine-tune"
    )
    args = parser.parse_args(argv)
    if args.sparsity:
        from pipeline.spec import BUILTIN_SPECS

        print(json.dumps(sparsity_section(args, BUILTIN_SPECS["higgs"])))
        return 0
    encodings = ["float32", *(e for e in args.encodings if e != "float32")]  # the baseline always runs

    from pipeline.bundle import ModelBundle
    from pipeline.settings import load_settings
    from pipeline.spark.session import spark_session
    from pipeline.spec import BUILTIN_SPECS

    spec = BUILTIN_SPECS["higgs"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        tmp = Path(tmp)
        data, *held = dataset(args.rows, tmp, spec)
        initial = ModelBundle(spec, seed=0).get_weights()
        spark = spark_session(load_settings(home=tmp), "bench-compression")
        try:
            warm_up(spark, tmp, data, spec, initial, held)
            for encoding in encodings:
                print(f"bench.compression: {encoding}", file=sys.stderr, flush=True)
                settings = load_settings(
                    home=tmp,
                    model=spec.name,
                    algorithm=args.algorithm,
                    workers=args.workers,
                    ps_encoding=encoding,
                    ps_topk_fraction=args.topk_fraction,
                    ps_link_mbps=args.link_mbps,
                )
                registry = _fresh_registry(tmp / encoding, spec, initial)
                results[encoding] = summary(train(spark, registry, settings, data, held, args.epochs))
        finally:
            spark.stop()
    print(
        json.dumps(
            {
                "benchmark": "compression",
                "model": spec.name,
                "parameters": ModelBundle(spec).n_parameters,
                "rows": args.rows,
                "epochs": args.epochs,
                "algorithm": args.algorithm,
                "workers": args.workers,
                "link_mbps": args.link_mbps,
                "topk_fraction": args.topk_fraction,
                "results": results,
                "targets": targets(results, args.link_mbps),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
