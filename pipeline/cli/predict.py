"""``streamfit predict``: the Spark inference consumer, events -> predictions (and bad events -> DLQ)."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("streamfit.predict")


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="run the Spark inference consumer (events -> predictions)",
                                   description="Stream events from Kafka through the champion model and write "
                                               "predictions; invalid events go to the dead-letter topic.")
    parser.add_argument("--model", dest="model", help="registered model name (default higgs)")
    parser.add_argument("--master", dest="spark_master", help="Spark master (default local[2])")
    parser.add_argument("--max-offsets-per-trigger", dest="max_offsets_per_trigger", type=int)
    parser.add_argument("--trigger-interval", dest="trigger_interval_s", type=float, help="seconds between micro-batches")
    parser.add_argument("--starting-offsets", dest="starting_offsets", help="earliest | latest | JSON (new queries only)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default <home>/checkpoints/inference)")
    parser.add_argument("--source", dest="kafka_source", choices=["auto", "native", "python"])
    parser.set_defaults(func=run)


def run(args) -> int:
    from consumers.inference import InferenceJob, progress_line
    from pipeline.cli import settings_from
    from pipeline.kafka import bootstrap
    from pipeline.spark.session import spark_session

    settings = settings_from(args)
    servers = bootstrap(settings)
    spark = spark_session(settings, "streamfit-predict")
    job = InferenceJob(spark, settings, servers)
    checkpoint = args.checkpoint or str(settings.home / "checkpoints" / "inference")
    query = job.start(checkpoint)
    print(f"predicting {settings.topic_events} -> {settings.topic_predictions} with {settings.model} "
          f"(checkpoint {checkpoint}); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    seen = None
    while not stop.wait(1.0) and query.isActive:
        progress = query.lastProgress
        if progress and progress["batchId"] != seen:
            seen = progress["batchId"]
            log.info(progress_line(progress, job.versions.get(seen)))
    query.stop()
    spark.stop()
    if query.exception():
        from pipeline.cli import CommandError

        raise CommandError(str(query.exception()))
    return 0
