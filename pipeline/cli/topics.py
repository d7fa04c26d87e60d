"""``streamfit topics``: list the cluster's topics, creating streamfit's own when missing (with their retention)."""

from __future__ import annotations

from pipeline.kafka import bootstrap, describe
from pipeline.retention import ensure_streamfit_topics


def register(subparsers) -> None:
    parser = subparsers.add_parser("topics", help="create streamfit's topics if missing and list all topics")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli import settings_from

    settings = settings_from(args)
    servers = bootstrap(settings)
    created = ensure_streamfit_topics(servers, settings)
    for name, partitions in sorted(describe(servers, settings.kafka_timeout_s, settings.kafka).items()):
        print(f"{name:24s} partitions={partitions}{'  (created)' if name in created else ''}")
    return 0
