"""``streamfit models``: create, import, list and inspect the registry's models; promote and roll back;
describe and tag versions; export one for TensorFlow Serving or Keras.

Only ``create``, ``import`` and ``export`` build a model; the rest read JSON and move aliases.
Wherever a version is named, ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` (MLflow's URIs) name it too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime

from pipeline.spec import BUILTIN_SPECS, NAME_PATTERN, ModelSpec, spec_from_file


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="create, list and inspect registry models; promote and roll back",
        description="Manage the model registry (settings.registry, default <home>/registry).",
    )
    parser.add_argument("--registry", dest="registry", help="registry root: a path or an fsspec URL")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="a new model from a built-in spec or a spec file; its random-initialised version 1 becomes champion",
    )
    create.add_argument("name", help="model name (letters, digits, . _ -)")
    spec_source = create.add_mutually_exclusive_group()
    spec_source.add_argument(
        "--spec", choices=sorted(BUILTIN_SPECS), default="higgs", help="built-in spec (default %(default)s)"
    )
    spec_source.add_argument(
        "--spec-file",
        metavar="PATH",
        help="your own spec, YAML or JSON: feature_names, categorical, classes, builder_args, optimizer "
        "(its name is replaced by NAME)",
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

    imported = actions.add_parser(
        "import", help="a new model from a Keras 3 classifier (.keras); its weights are version 1, the champion"
    )
    imported.add_argument("name", help="model name (letters, digits, . _ -)")
    imported.add_argument("--keras", required=True, metavar="FILE", help="the model.keras file (Keras 3)")
    imported.add_argument("--features", type=_names, help="feature names, comma-separated (default f0, f1, ...)")
    imported.add_argument("--classes", type=_labels, help="class labels, comma-separated (default 0, 1, ...)")
    _describing(imported)
    imported.set_defaults(func=run, action_func=_import)

    export = actions.add_parser("export", help="write a version as a TensorFlow SavedModel or a .keras file")
    export.add_argument("name", help="model name or models:/NAME@ALIAS URI")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--version", help="version to export (default: the champion)")
    which.add_argument("--alias", help="export the version this alias names")
    export.add_argument("--format", choices=("savedmodel", "keras"), default="savedmodel", help="default %(default)s")
    export.add_argument("directory", help="SavedModel: written to DIR/<version> (TF Serving's model_base_path)")
    export.set_defaults(func=run, action_func=_export)

    prune = actions.add_parser(
        "prune",
        help="a new version with the smallest kernel weights pruned (one global magnitude threshold); "
        "the parameter server keeps them at zero",
    )
    prune.add_argument("name", help="model name or models:/ URI")
    prune.add_argument("--sparsity", type=float, required=True, help="fraction of kernel weights to prune, e.g. 0.9")
    pruned_from = prune.add_mutually_exclusive_group()
    pruned_from.add_argument("--version", help="version to prune (default: the champion)")
    pruned_from.add_argument("--alias", help="prune the version this alias names")
    _describing(prune)
    prune.set_defaults(func=run, action_func=_prune)

    show = actions.add_parser("show", help="a model's spec, aliases and versions, or one version's metadata")
    show.add_argument("name", help="model name, or a models:/ URI to show that version")
    show.add_argument("--version", help="show this version's metadata (a number, an alias or a models:/ URI)")
    show.set_defaults(func=run, action_func=_show)

    annotate = actions.add_parser("annotate", help="set a version's description and tags")
    annotate.add_argument("name", help="model name or models:/ URI")
    annotate.add_argument("--version", help="version to annotate (default: the champion)")
    _describing(annotate)
    annotate.add_argument("--remove-tag", action="append", default=[], metavar="KEY", help="repeatable")
    annotate.set_defaults(func=run, action_func=_annotate)

    promote = actions.add_parser("promote", help="move champion to a version (default: the candidate)")
    promote.add_argument("name")
    promote.add_argument(
        "--version", help="version to promote: a number, an alias or a models:/ URI (default: candidate)"
    )
    promote.set_defaults(func=run, action_func=_promote)

    delete_alias = actions.add_parser("delete-alias", help="remove an alias (champion only moves: promote, rollback)")
    delete_alias.add_argument("name")
    delete_alias.add_argument("alias")
    delete_alias.set_defaults(func=run, action_func=_delete_alias)

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

    _checked_name(args.name)
    if args.spec_file:
        spec, origin = spec_from_file(args.spec_file, name=args.name), f"file {args.spec_file}"
    else:
        spec, origin = ModelSpec.model_validate(BUILTIN_SPECS[args.spec].model_dump() | {"name": args.name}), args.spec
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
        f"created model {spec.name!r} from spec {origin} ({bundle.n_parameters:,} parameters): "
        f"version {version} is champion, at {event['uri']}"
    )
    return 0


def _checked_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"bad model name {name!r}: up to 128 letters, digits, '.', '_' or '-', not starting with '.', '_' or '-'"
        )
    return name


def _import(registry, args) -> int:
    from pipeline.keras_import import import_keras

    spec, weights = import_keras(args.keras, _checked_name(args.name), args.features, args.classes)
    registry.create_model(spec)
    version = registry.register(
        spec.name, weights, algorithm="import", description=args.description or "", tags=dict(args.tag)
    )
    event = registry.set_alias(spec.name, "champion", version)
    print(
        f"imported {args.keras} as model {spec.name!r} ({spec.n_features} features, classes {spec.classes}, "
        f"standardisation {'from its Normalization layer' if spec.standardisation else 'identity'}): "
        f"version {version} is champion, at {event['uri']}"
    )
    return 0


def _export(registry, args) -> int:
    from pipeline.keras_export import export_keras, export_savedmodel

    model, version = registry.locate(args.name, args.alias or args.version or "champion")
    path = (export_savedmodel if args.format == "savedmodel" else export_keras)(
        registry.load(model, version), args.directory
    )
    print(f"exported {model} version {version} as {args.format} to {path}")
    return 0


def _prune(registry, args) -> int:
    from pipeline.pruning import global_masks

    model, source = registry.locate(args.name, args.alias or args.version or "champion")
    weights = registry.weights(model, source)[1]
    version = registry.register(
        model,
        weights,
        masks=global_masks(weights, args.sparsity, registry.masks(model, source)),
        parent=source,
        algorithm="prune",
        description=args.description or "",
        tags=dict(args.tag),
    )
    meta = registry.meta(model, version)
    print(
        f"{model} version {version}: version {source} pruned to {meta['sparsity']:.1%} of its weights "
        f"({meta['active_parameters']:,} of {meta['total_parameters']:,} active, {meta['compression_ratio']:g}x); "
        f"promote it with `streamfit models promote {model} --version {version}`"
    )
    return 0


def _annotate(registry, args) -> int:
    model, version = registry.locate(args.name, args.version or "champion")
    meta = registry.annotate(
        model, version, description=args.description, tags=dict(args.tag), remove_tags=tuple(args.remove_tag)
    )
    print(f"{model} version {version}: description {meta['description']!r}, tags {_text(meta['tags'])}")
    return 0


def _delete_alias(registry, args) -> int:
    print(f"{args.name}: alias {args.alias} (was version {registry.delete_alias(args.name, args.alias)}) deleted")
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
    if args.version is not None or args.name.startswith("models:/"):
        model, version = registry.locate(args.name, args.version)
        table = _table("field", "value", wrap="value")
        for key, value in {**registry.meta(model, version), "uri": registry.uri(model, version)}.items():
            table.add_row(key, _when(value) if key == "created_at" else _text(value))
        _print(table)
        return 0
    spec, aliases = registry.spec(args.name), registry.aliases(args.name)
    opt = spec.optimizer
    features = [f"{n} (categorical, {k})" if k else n for n, k in zip(spec.feature_names[:8], spec.cardinalities)]
    print(
        f"model {args.name}: {spec.builder} {json.dumps(spec.builder_args, separators=(',', ':'))}\n"
        f"  features ({spec.n_features}): {', '.join(features)}{' ...' if spec.n_features > 8 else ''}\n"
        f"  classes: {spec.classes}   loss: {spec.loss}   standardisation in spec: {spec.standardisation is not None}\n"
        f"  optimizer: {opt.name} learning_rate={opt.learning_rate:g} momentum={opt.momentum:g} nesterov={opt.nesterov}"
    )
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    table = _table(
        "version", "aliases", "parent", "algorithm", "updates", "metrics", "created (UTC)", "tags", "description"
    )
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
            _text(meta.get("tags") or None),
            meta.get("description", ""),
        )
    _print(table)
    return 0


def _promote(registry, args) -> int:
    version = None if args.version is None else registry.resolve(args.name, args.version)
    return _move(registry, args.name, lambda: registry.promote(args.name, version))


def _rollback(registry, args) -> int:
    return _move(registry, args.name, lambda: registry.rollback(args.name))


def _move(registry, name: str, move) -> int:
    before = registry.aliases(name).get("champion")
    event = move()
    print(f"{name}: champion {_text(before)} -> {event['version']}")
    return 0


def _describing(parser) -> None:
    parser.add_argument("--description", help="free text about the version (MLflow's description)")
    parser.add_argument(
        "--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE", help="a version tag; repeatable"
    )


def _tag(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"a tag is KEY=VALUE, got {text!r}")
    return key, value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def _labels(text: str) -> list[int | str]:
    """Comma-separated class labels; whole numbers stay numbers (0, 1, ...)."""
    return [int(label) if label.isdigit() else label for label in _names(text)]


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
