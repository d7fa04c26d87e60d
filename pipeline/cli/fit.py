"""``streamfit fit``: train a registered model from a file on Spark workers and a parameter server."""

from __future__ import annotations

import json

from pipeline.cli import setting_default
from pipeline.ps.algorithms import ALGORITHMS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="train a model from a file (Spark partitions as parameter-server workers)",
        description="Read a CSV, Parquet or JSON-lines file, train the model's champion on it with an asynchronous "
        "parameter-server algorithm over Spark partitions, and register the result as the candidate.",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="CSV/Parquet (one column per feature) or JSON lines in the events shape",
    )
    parser.add_argument("--model", dest="model", help="registered model (a built-in spec name is created if missing)")
    parser.add_argument("--algorithm", dest="algorithm", choices=sorted(ALGORITHMS))
    parser.add_argument("--workers", dest="workers", type=int, help="Spark partitions = parameter-server workers")
    parser.add_argument("--epochs", dest="epochs", type=int)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--learning-rate", dest="learning_rate", type=float, help="default: the model spec's")
    parser.add_argument("--communication-window", dest="communication_window", type=int)
    parser.add_argument(
        "--master", dest="spark_master", help=f"Spark master (default {setting_default('spark_master')})"
    )
    parser.add_argument("--label-column", default="label")
    parser.add_argument(
        "--holdout", type=float, default=0.1, help="fraction held out for evaluation (default %(default)s)"
    )
    parser.add_argument("--promote", action="store_true", help="make the result champion, not only candidate")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from pipeline.cli import CommandError, settings_from
    from pipeline.fit import fit
    from pipeline.model_updates import announcing_registry
    from pipeline.spark.session import spark_session

    if not 0 <= args.holdout < 1:
        raise CommandError(f"--holdout must be in [0, 1), got {args.holdout}")
    settings = settings_from(args)
    registry, announcer = announcing_registry(settings)
    console = Console(stderr=True)
    try:
        _ensure_model(registry, settings.model, console)
        spark = spark_session(settings, "streamfit-fit")
        try:
            with console.status("training") as status:
                result = fit(
                    spark,
                    settings,
                    registry,
                    args.data,
                    holdout=args.holdout,
                    label_column=args.label_column,
                    promote=args.promote,
                    progress=lambda stats: status.update(
                        f"training {settings.model} with {settings.algorithm} x{settings.workers}: "
                        f"{stats['counter']:,} updates, {stats.get('commits', {}).get('skipped', 0)} "
                        "replays skipped"
                    ),
                )
        finally:
            spark.stop()
    finally:
        announcer.close()
    if args.json:
        print(json.dumps(result.__dict__))
        return 0
    alias = "champion" if args.promote else "candidate"
    accuracy = result.holdout.get("accuracy")
    print(
        f"trained {settings.model} on {result.rows:,} rows ({result.invalid_rows:,} invalid left out) in "
        f"{result.seconds:.1f}s (run {result.run_id}): {result.updates:,} updates; version {result.versions[0]} "
        f"is {alias}" + (f", held-out accuracy {accuracy:.3f}" if accuracy is not None else "")
    )
    return 0


def _ensure_model(registry, name: str, console) -> None:
    """A model named like a built-in spec is created on first use; any other must exist."""
    from pipeline.bundle import ModelBundle
    from pipeline.spec import BUILTIN_SPECS

    if name in registry.models():
        return
    if name not in BUILTIN_SPECS:
        from pipeline.cli import CommandError

        raise CommandError(
            f"no model {name!r} in {registry.root}: create it with `streamfit models create {name} --spec SPEC`"
        )
    registry.create_model(BUILTIN_SPECS[name])
    version = registry.register(name, ModelBundle(BUILTIN_SPECS[name]).get_weights(), algorithm="init")
    registry.set_alias(name, "champion", version)
    console.print(f"created model {name!r} from its built-in spec (version {version} is champion)")
