"""``streamfit broker``: run the embedded Kafka-protocol broker until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading

from pipeline.broker import IMPLEMENTATIONS, kafka_cluster
from pipeline.cli import setting_default
from pipeline.kafka import broker_file


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="run the embedded Kafka broker (noida-db or tansu)",
        description="Start a Kafka-protocol broker from a PyPI wheel, create the topics, "
        "and keep it running until Ctrl-C/SIGTERM. With STREAMFIT_KAFKA_BOOTSTRAP "
        "set, only creates the topics on that cluster.",
    )
    parser.add_argument(
        "--impl",
        dest="broker_impl",
        choices=IMPLEMENTATIONS,
        help=f"broker implementation (default {setting_default('broker_impl')})",
    )
    parser.add_argument(
        "--host", dest="broker_host", help=f"address to bind (default {setting_default('broker_host')})"
    )
    parser.add_argument("--port", dest="broker_port", type=int, help="port (default: a free one)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli import settings_from

    settings = settings_from(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with kafka_cluster(settings) as bootstrap:
        if settings.kafka_bootstrap:
            print(f"using Kafka at {bootstrap} (STREAMFIT_KAFKA_BOOTSTRAP); topics are ready, nothing embedded started")
            return 0
        print(
            f"{settings.broker_impl} broker ready at {bootstrap} (recorded in {broker_file(settings)}); "
            "Ctrl-C stops it",
            flush=True,
        )
        stop.wait()
        print("stopping broker", flush=True)
    return 0
