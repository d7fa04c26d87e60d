"""``streamfit train``: the Spark training consumer, labelled events -> parameter server (-> candidates)."""

from __future__ import annotations

from pipeline.cli import setting_default
from pipeline.ps.algorithms import STREAMABLE


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run the Spark training consumer (labelled events -> parameter server)",
        description="Stream labelled events from Kafka, score them with the current model (prequential), then train "
        "the parameter server with them over Spark workers; watch for drift and gate promotions. "
        "Needs a running `streamfit ps` for the same model.",
    )
    parser.add_argument("--model", dest="model", help=f"registered model name (default {setting_default('model')})")
    parser.add_argument(
        "--algorithm",
        dest="algorithm",
        choices=STREAMABLE,
        help=f"worker algorithm; must match the one `streamfit ps` runs (default {setting_default('algorithm')})",
    )
    parser.add_argument("--workers", dest="workers", type=int, help="Spark partitions training per micro-batch")
    parser.add_argument("--learning-rate", dest="learning_rate", type=float, help="default: the model spec's")
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--communication-window", dest="communication_window", type=int)
    parser.add_argument(
        "--epochs", dest="epochs", type=int, help=f"passes over each micro-batch (default {setting_default('epochs')})"
    )
    parser.add_argument(
        "--auto-promote",
        dest="auto_promote",
        action="store_true",
        default=None,
        help="promote candidates that pass the gate (default: they wait for `models promote`)",
    )
    parser.add_argument(
        "--master", dest="spark_master", help=f"Spark master (default {setting_default('spark_master')})"
    )
    parser.add_argument("--max-offsets-per-trigger", dest="max_offsets_per_trigger", type=int)
    parser.add_argument(
        "--trigger-interval", dest="trigger_interval_s", type=float, help="seconds between micro-batches (default 2)"
    )
    parser.add_argument(
        "--starting-offsets", dest="starting_offsets", help="earliest | latest | JSON (new queries only)"
    )
    parser.add_argument(
        "--checkpoint", dest="train_checkpoint", help="checkpoint directory (default <home>/checkpoints/training)"
    )
    parser.add_argument(
        "--metrics-port", dest="train_metrics_port", type=int, help="serve Prometheus metrics on this port"
    )
    parser.add_argument("--source", dest="kafka_source", choices=["auto", "native", "python"])
    parser.set_defaults(func=run)


def run(args) -> int:
    from consumers.training import TrainingJob
    from pipeline.cli import CommandError, run_until_stopped, settings_from
    from pipeline.errors import StreamfitError
    from pipeline.kafka import bootstrap
    from pipeline.metrics import serve as serve_metrics
    from pipeline.model_updates import announcing_registry
    from pipeline.spark.session import spark_session, stop_between_batches
    from pipeline.spark.supervisor import QuerySupervisor

    settings = settings_from(args)
    servers = bootstrap(settings)
    registry, announcer = announcing_registry(settings)
    spark = spark_session(settings, "streamfit-train", streaming=True)
    try:
        job = TrainingJob(spark, settings, servers, registry)
        checkpoint = settings.train_checkpoint_dir
        supervisor = QuerySupervisor(
            job.start(checkpoint), lambda: job.start_query(checkpoint), on_restart=job.gauges.restarts.inc
        )
        metrics = (
            serve_metrics(job.gauges.registry, settings.train_metrics_port)
            if settings.train_metrics_port is not None
            else None
        )
    except StreamfitError:  # printed by the CLI; Spark and the announcer are not left behind
        spark.stop()
        announcer.close()
        raise
    print(
        f"training {settings.model} with {settings.algorithm} x{settings.workers} from {settings.topic_events} "
        f"(checkpoint {checkpoint}, auto-promote {'on' if settings.auto_promote else 'off'}"
        + (f", metrics on :{metrics.server_port}/metrics" if metrics else "")
        + "); Ctrl-C stops",
        flush=True,
    )
    run_until_stopped(supervisor.poll)
    query = supervisor.query
    stop_between_batches(query)
    job.close()
    if metrics is not None:
        metrics.shutdown()
    announcer.close()
    spark.stop()
    if query.exception():
        raise CommandError(str(query.exception()))
    return 0
