"""The registry as the Models and Try-it pages show it: every model, its aliases and its newest versions.

A version's row is its ``meta.json`` (parent, algorithm, updates, the offsets trained through,
metrics, sha256) plus the size of its weights file, read through fsspec so a shared registry
works as a local one does.
"""

from __future__ import annotations

import fsspec

from pipeline.registry import WEIGHTS, Registry, RegistryError

VERSIONS_SHOWN = 30
"""Newest versions listed per model (a long training run publishes hundreds)."""


def catalog(registry: Registry) -> list[dict]:
    """``[{name, features, classes, aliases, rollback_to, versions: [meta + weights_bytes, newest first]}]``."""
    models = []
    for name in registry.models():
        spec = registry.spec(name)
        aliases = registry.aliases(name)
        versions = []
        for version in reversed(registry.versions(name)[-VERSIONS_SHOWN:]):
            try:
                meta = registry.meta(name, version)
            except RegistryError:  # deleted by retention meanwhile
                continue
            meta["weights_bytes"] = weights_size(registry.uri(name, version))
            meta["aliases"] = sorted(alias for alias, v in aliases.items() if v == version)
            versions.append(meta)
        models.append(
            {
                "name": name,
                "features": list(spec.feature_names),
                "classes": list(spec.classes),
                "aliases": aliases,
                "versions": versions,
            }
        )
    return models


def weights_size(version_uri: str) -> int | None:
    """Bytes of the version's weights file, None when it cannot be read."""
    try:
        fs, path = fsspec.core.url_to_fs(f"{version_uri.rstrip('/')}/{WEIGHTS}")
        return int(fs.size(path))
    except (OSError, ValueError):
        return None
