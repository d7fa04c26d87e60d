"""``streamfit predict``: the Spark inference consumer, events -> predictions (and bad events -> DLQ)."""

from __future__ import annotations

import contextlib
import logging

from pipeline.cli import setting_default

log = logging.getLogger("streamfit.predict")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="run the Spark inference consumer (events -> predictions)",
        description="Stream events from Kafka through the champion model and write "
        "predictions; invalid events go to the dead-letter topic.",
    )
    parser.add_argument("--model", dest="model", help=f"registered model name (default {setting_default('model')})")
    parser.add_argument(
        "--master", dest="spark_master", help=f"Spark master (default {setting_default('spark_master')})"
    )
    parser.add_argument("--max-offsets-per-trigger", dest="max_offsets_per_trigger", type=int)
    parser.add_argument(
        "--trigger-interval", dest="trigger_interval_s", type=float, help="seconds between micro-batches (default 0.5)"
    )
    parser.add_argument(
        "--starting-offsets", dest="starting_offsets", help="earliest | latest | JSON (new queries only)"
    )
    parser.add_argument(
        "--min-partitions",
        dest="spark_min_partitions",
        type=int,
        help="Spark tasks per micro-batch at least (default the cores)",
    )
    parser.add_argument(
        "--checkpoint", dest="predict_checkpoint", help="checkpoint directory (default <home>/checkpoints/inference)"
    )
    parser.add_argument(
        "--metrics-port",
        dest="predict_metrics_port",
        type=int,
        help="serve Prometheus metrics on this port (default off)",
    )
    parser.add_argument("--source", dest="kafka_source", choices=["auto", "native", "python"])
    parser.set_defaults(func=run)


def run(args) -> int:
    from consumers.inference import InferenceJob
    from pipeline.cli import CommandError, run_until_stopped, settings_from
    from pipeline.kafka import bootstrap
    from pipeline.metrics import serve as serve_metrics
    from pipeline.retention import ensure_streamfit_topics
    from pipeline.spark.session import spark_session, stop_between_batches
    from pipeline.spark.supervisor import QuerySupervisor

    logging.getLogger("py4j").setLevel(logging.WARNING)  # its callback server logs every connection at INFO
    settings = settings_from(args)
    servers = bootstrap(settings)
    ensure_streamfit_topics(servers, settings)
    with contextlib.ExitStack() as down:  # Spark (and with it the query) and the metrics server end on every path
        spark = spark_session(settings, "streamfit-predict", streaming=True)
        down.callback(spark.stop)
        job = InferenceJob(spark, settings, servers)
        metrics = (
            serve_metrics(job.reporter.metrics.registry, settings.predict_metrics_port)
            if settings.predict_metrics_port is not None
            else None
        )
        if metrics:
            down.callback(metrics.shutdown)
        checkpoint = settings.predict_checkpoint_dir
        supervisor = QuerySupervisor(job.start(checkpoint), lambda: job.start(checkpoint))
        print(
            f"predicting {settings.topic_events} -> {settings.topic_predictions} with {settings.model} "
            f"(checkpoint {checkpoint}"
            + (f", metrics on :{metrics.server_port}/metrics" if metrics else "")
            + "); Ctrl-C stops",
            flush=True,
        )
        run_until_stopped(supervisor.poll)
        stop_between_batches(supervisor.query)
        failure = supervisor.query.exception()
    if failure:
        raise CommandError(str(failure))
    return 0
