"""``streamfit topics``: list the cluster's topics, creating streamfit's own when missing."""

from __future__ import annotations

from pipeline.kafka import bootstrap, describe, ensure_topics, topic_specs


def register(subparsers) -> None:
    parser = subparsers.add_parser("topics", help="create streamfit's topics if missing and list all topics")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli import settings_from

    settings = settings_from(args)
    servers = bootstrap(settings)
    created = ensure_topics(servers, topic_specs(settings), settings.kafka_timeout_s)
    for name, partitions in sorted(describe(servers, settings.kafka_timeout_s).items()):
        print(f"{name:24s} partitions={partitions}{'  (created)' if name in created else ''}")
    return 0
