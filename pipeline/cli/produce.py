"""``streamfit produce``: stream events into Kafka from a synthetic generator or a file."""

from __future__ import annotations

import itertools
import sys
import time

from pipeline.events import FeatureSchema
from pipeline.kafka import bootstrap, fast_producer
from pipeline.metrics import serve as serve_metrics
from producers import synthetic
from producers.files import Columns, file_rows
from producers.metrics import producer_registry
from producers.sender import Sender, file_events, synthetic_events


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "produce",
        help="stream events into Kafka (synthetic or from a file)",
        description="Send events to the events topic. Sources: synth:NAME ("
        + ", ".join(synthetic.GENERATORS)
        + ") or a .csv/.jsonl/.parquet file. Every send is acknowledged before success is reported; "
        "file rows that fail validation go to the dead-letter topic.",
    )
    parser.add_argument("--source", required=True, help="synth:higgs | synth:hyperplane | ... | path/to/file.csv")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s (token bucket); 0 = as fast as possible")
    parser.add_argument(
        "--limit", type=int, default=None, help="stop after this many events (synthetic default: 10000; 0: no end)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-fraction", type=float, default=1.0, help="share of events that keep their label")
    parser.add_argument("--drift-at", type=int, default=None, help="synthetic: switch to a new concept after N events")
    parser.add_argument(
        "--invalid-fraction",
        type=float,
        default=0.0,
        help="synthetic: share of events sent broken on purpose (they end in the dead-letter topic)",
    )
    parser.add_argument(
        "--id-prefix", default=None, help="event ids are PREFIX-N (default: source, seed and start time)"
    )
    parser.add_argument("--topic", dest="topic_events", help="target topic (default: events)")
    parser.add_argument("--classes", type=int, default=2, help="file: number of classes labels must fall in")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--ts-column", default="ts")
    parser.add_argument(
        "--feature-columns", default=None, help="file: comma-separated feature columns (default: all others)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--metrics-port",
        dest="produce_metrics_port",
        type=int,
        help="serve Prometheus metrics on this port while producing (0: a free port; default off)",
    )
    parser.set_defaults(func=run)


def _messages(args, settings):
    for flag in ("label_fraction", "invalid_fraction"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    if args.source.startswith("synth:"):
        name = args.source.removeprefix("synth:")
        rows = synthetic.synthetic_rows(name, args.seed, args.drift_at)
        limit = 10_000 if args.limit is None else args.limit or None
        prefix = args.id_prefix or f"{name}-{args.seed}-{int(time.time() * 1000):x}"
        return synthetic_events(
            itertools.islice(rows, limit), prefix, args.label_fraction, args.seed, args.invalid_fraction
        ), limit
    columns = Columns(
        args.id_column or None,
        args.label_column or None,
        args.ts_column or None,
        tuple(args.feature_columns.split(",")) if args.feature_columns else None,
    )
    schemas: dict[int, FeatureSchema] = {}

    def schema_for(document: dict) -> FeatureSchema:
        """The first valid-looking row fixes the feature names; later rows must match them."""
        features = document.get("features")
        if not isinstance(features, (dict, list)):
            return FeatureSchema((), args.classes, settings.max_event_bytes)  # refused whatever the schema; fixes none
        if not schemas:
            names = tuple(features) if isinstance(features, dict) else tuple(f"f{i}" for i in range(len(features)))
            schemas[0] = FeatureSchema(names, args.classes, settings.max_event_bytes)
        return schemas[0]

    rows = file_rows(args.source, columns)
    if args.limit:
        rows = itertools.islice(rows, args.limit)
    return file_events(
        rows, schema_for, args.source, args.label_fraction, args.seed, settings.dlq_max_raw_bytes
    ), args.limit


def run(args) -> int:
    from pipeline.cli import CommandError, settings_from

    settings = settings_from(args)
    try:
        messages, total = _messages(args, settings)
        kafka = fast_producer(
            bootstrap(settings),
            settings.kafka_timeout_s,
            settings.kafka_client,
            linger_ms=settings.produce_linger_ms,
            properties=settings.kafka,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    sender = Sender(kafka, settings.topic_events, settings.topic_dlq, rate=args.rate)
    exporter = None
    if settings.produce_metrics_port is not None:
        try:
            exporter = serve_metrics(producer_registry(sender.summary), settings.produce_metrics_port)
        except OSError as exc:
            kafka.close(timeout=5)
            raise CommandError(f"cannot serve metrics on port {settings.produce_metrics_port}: {exc}") from None
        print(f"metrics on :{exporter.server_port}/metrics", file=sys.stderr, flush=True)
    progress = None
    if not args.no_progress and sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(f"producing {args.source}", total=total)
    try:
        for count, message in enumerate(messages, start=1):
            sender.send(message)
            if progress and count % 500 == 0:
                progress.update(task, completed=count)
    except KeyboardInterrupt:
        print("interrupted: waiting for acknowledgements of what was sent", file=sys.stderr)
    except (ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        if progress:
            progress.stop()
        try:
            summary = sender.close(settings.kafka_timeout_s)
        finally:
            kafka.close(timeout=5)
            if exporter is not None:
                exporter.shutdown()
    print(
        f"sent={summary.sent} acknowledged={summary.acknowledged} failed={summary.failed} resent={summary.resent} "
        f"dead_lettered={summary.dead_lettered} elapsed={summary.elapsed_s:.2f}s events/s={summary.events_per_s:.0f}"
    )
    if summary.failed:
        raise CommandError(f"{summary.failed} sends failed, first: {summary.errors[0]}")
    return 0
