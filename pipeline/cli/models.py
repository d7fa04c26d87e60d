"""``streamfit models``: create, list and inspect the registry's models; promote and roll back.

Only ``create`` builds a model; the rest read JSON and move aliases.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime

from pipeline.spec import BUILTIN_SPECS, NAME_PATTERN, ModelSpec


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="create, list and inspect registry models; promote and roll back",
        description="Manage the model registry (settings.registry, default <home>/registry).",
    )
    parser.add_argument("--registry", dest="registry", help="registry root: a path or an fsspec URL")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create", help="a new model from a built-in spec; its random-initialised version 1 becomes champion"
    )
    create.add_argument("name", help="model name (letters, digits, . _ -)")
    create.add_argument(
        "--spec", choices=sorted(BUILTIN_SPECS), default="higgs", help="built-in spec (default %(default)s)"
    )
    create.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default %(default)s)")
    create.add_argument(
        "--exist-ok",
        action="store_true",
        help="a model of that name is not an error: it is left as it is (and given its champion "
        "version 1 if an interrupted create left it without one)",
    )
    create.set_defaults(func=run, action_func=_create)

    actions.add_parser("list", help="every model with its versions and aliases").set_defaults(
        func=run, action_func=_list
    )

    show = actions.add_parser("show", help="a model's spec, aliases and versions, or one version's metadata")
    show.add_argument("name")
    show.add_argument("--version", type=int, help="show this version's metadata")
    show.set_defaults(func=run, action_func=_show)

    promote = actions.add_parser("promote", help="move champion to a version (default: the candidate)")
    promote.add_argument("name")
    promote.add_argument("--version", type=int, help="version to promote (default: the candidate alias)")
    promote.set_defaults(func=run, action_func=_promote)

    rollback = actions.add_parser("rollback", help="move champion back to the previous champion")
    rollback.add_argument("name")
    rollback.set_defaults(func=run, action_func=_rollback)


def run(args) -> int:
    from pipeline.cli import CommandError, settings_from
    from pipeline.model_updates import announcing_registry
    from pipeline.registry import RegistryError

    registry, announcer = announcing_registry(settings_from(args))
    try:
        return args.action_func(registry, args)
    except (RegistryError, ValueError) as exc:  # ValueError: a bad model name, weights that do not fit
        raise CommandError(str(exc)) from None
    finally:
        announcer.close()


def _create(registry, args) -> int:
    from pipeline.bundle import ModelBundle

    if not re.fullmatch(NAME_PATTERN, args.name):
        raise ValueError(
            f"bad model name {args.name!r}: up to 128 letters, digits, '.', '_' or '-', "
            "not starting with '.', '_' or '-'"
        )
    spec = ModelSpec.model_validate(BUILTIN_SPECS[args.spec].model_dump() | {"name": args.name})
    if args.exist_ok and args.name in registry.models():
        if registry.aliases(args.name).get("champion") is not None:
            print(f"model {args.name!r} exists (champion v{registry.resolve(args.name, 'champion')}): left as it is")
            return 0
        spec = registry.spec(args.name)  # an interrupted create: finish it with the spec it wrote
    else:
        registry.create_model(spec)
    bundle = ModelBundle(spec, seed=args.seed)
    version = registry.register(spec.name, bundle.get_weights(), algorithm="init")
    event = registry.set_alias(spec.name, "champion", version)
    print(
        f"created model {spec.name!r} from spec {args.spec} ({bundle.n_parameters:,} parameters): "
        f"version {version} is champion, at {event['uri']}"
    )
    return 0


def _list(registry, args) -> int:
    table = _table("model", "builder", "features", "classes", "versions", "latest", "champion", "candidate")
    for name in registry.models():
        spec, versions, aliases = registry.spec(name), registry.versions(name), registry.aliases(name)
        table.add_row(
            name,
            spec.builder,
            str(spec.n_features),
            str(spec.n_classes),
            str(len(versions)),
            _text(versions[-1] if versions else None),
            _text(aliases.get("champion")),
            _text(aliases.get("candidate")),
        )
    _print(table if table.row_count else f"no models in {registry.root}")
    return 0


def _show(registry, args) -> int:
    if args.version is not None:
        table = _table("field", "value", wrap="value")
        for key, value in {
            **registry.meta(args.name, args.version),
            "uri": registry.uri(args.name, args.version),
        }.items():
            table.add_row(key, _when(value) if key == "created_at" else _text(value))
        _print(table)
        return 0
    spec, aliases = registry.spec(args.name), registry.aliases(args.name)
    opt = spec.optimizer
    print(
        f"model {args.name}: {spec.builder} {json.dumps(spec.builder_args, separators=(',', ':'))}\n"
        f"  features ({spec.n_features}): {', '.join(spec.feature_names[:8])}{' ...' if spec.n_features > 8 else ''}\n"
        f"  classes: {spec.classes}   loss: {spec.loss}   standardisation in spec: {spec.standardisation is not None}\n"
        f"  optimizer: {opt.name} learning_rate={opt.learning_rate:g} momentum={opt.momentum:g} nesterov={opt.nesterov}"
    )
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    table = _table("version", "aliases", "parent", "algorithm", "updates", "metrics", "created (UTC)", wrap="metrics")
    for version in registry.versions(args.name):
        meta = registry.meta(args.name, version)
        table.add_row(
            str(version),
            ", ".join(sorted(by_version.get(version, []))),
            _text(meta["parent"]),
            _text(meta["algorithm"]),
            str(meta["updates"]),
            _text(meta["metrics"]),
            _when(meta["created_at"]),
        )
    _print(table)
    return 0


def _promote(registry, args) -> int:
    return _move(registry, args.name, lambda: registry.promote(args.name, args.version))


def _rollback(registry, args) -> int:
    return _move(registry, args.name, lambda: registry.rollback(args.name))


def _move(registry, name: str, move) -> int:
    before = registry.aliases(name).get("champion")
    event = move()
    print(f"{name}: champion {_text(before)} -> {event['version']}")
    return 0


def _text(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _when(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(*columns: str, wrap: str | None = None):
    """A plain table; only the ``wrap`` column (free-form JSON) may fold onto several lines."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column != wrap)
    return table


def _print(renderable) -> None:
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 200).print(renderable)  # piped: no 80-column squeeze
