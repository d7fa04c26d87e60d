"""The model registry: a directory tree of integer versions and the aliases that point at them.

``<root>/<model>/spec.json``, ``<root>/<model>/versions/<n>/{weights.safetensors,meta.json}``,
``<root>/<model>/aliases.json`` (``champion``, ``candidate`` and the champion history for
rollback). A version is written into a temporary directory and renamed into place, and
every file is written to a temp file, fsynced and renamed, so a reader never sees a
half-written version. Version numbers and alias moves are serialised by a file lock,
so concurrent writers (several processes) never collide. Local paths only for now.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.spec import ModelSpec

WEIGHTS, META, SPEC, ALIASES = "weights.safetensors", "meta.json", "spec.json", "aliases.json"


class RegistryError(LookupError):
    """Unknown model, version or alias, or a corrupt version; the message names it."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    def __init__(self, root: str | Path, on_alias_change: Callable[[dict], None] | None = None):
        self.root = Path(root)
        self.on_alias_change = on_alias_change

    def _model_dir(self, model: str) -> Path:
        path = self.root / model
        if not (path / SPEC).is_file():
            raise RegistryError(f"no model {model!r} in registry {self.root} (create it with `streamfit models create`)")
        return path

    @contextlib.contextmanager
    def _locked(self, model: str):
        with open(self._model_dir(model) / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / SPEC).is_file()) if self.root.is_dir() else []

    def create_model(self, spec: ModelSpec) -> None:
        path = self.root / spec.name
        if (path / SPEC).exists():
            raise RegistryError(f"model {spec.name!r} already exists in {self.root}")
        (path / "versions").mkdir(parents=True, exist_ok=True)
        atomic_write(path / SPEC, spec.model_dump_json(indent=2).encode())

    def spec(self, model: str) -> ModelSpec:
        return ModelSpec.model_validate_json((self._model_dir(model) / SPEC).read_bytes())

    def versions(self, model: str) -> list[int]:
        return sorted(int(p.name) for p in (self._model_dir(model) / "versions").iterdir() if p.name.isdigit())

    def register(self, model: str, weights: dict, **meta) -> int:
        """Store a new version; returns its number. ``meta`` keys: parent, algorithm, updates, offsets, metrics."""
        from safetensors.numpy import save_file

        versions = self._model_dir(model) / "versions"
        staging = Path(tempfile.mkdtemp(dir=versions, prefix=".staging-"))
        try:
            save_file({k: np.array(v, dtype=np.float32, order="C") for k, v in weights.items()}, str(staging / WEIGHTS))
            with open(staging / WEIGHTS, "rb+") as handle:
                os.fsync(handle.fileno())
            digest = sha256(staging / WEIGHTS)
            with self._locked(model):
                version = (max(self.versions(model)) if self.versions(model) else 0) + 1
                record = {"version": version, "parent": meta.pop("parent", None), "algorithm": meta.pop("algorithm", None),
                          "updates": meta.pop("updates", 0), "offsets": meta.pop("offsets", {}),
                          "metrics": meta.pop("metrics", {}), "sha256": digest, "created_at": time.time(), **meta}
                atomic_write(staging / META, json.dumps(record, indent=2).encode())
                os.rename(staging, versions / str(version))
                _fsync_dir(versions)
            return version
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def meta(self, model: str, version: int) -> dict:
        path = self._model_dir(model) / "versions" / str(version) / META
        if not path.is_file():
            raise RegistryError(f"model {model!r} has no version {version}")
        return json.loads(path.read_text())

    def aliases(self, model: str) -> dict:
        path = self._model_dir(model) / ALIASES
        return json.loads(path.read_text()) if path.is_file() else {}

    def resolve(self, model: str, ref: str | int) -> int:
        """A version number from a number or an alias name."""
        if isinstance(ref, int) or str(ref).isdigit():
            version = int(ref)
            self.meta(model, version)
            return version
        version = self.aliases(model).get(ref)
        if version is None:
            raise RegistryError(f"model {model!r} has no {ref!r} alias")
        return version

    def load(self, model: str, ref: str | int = "champion"):
        """The bundle of a version, its weights checked against the recorded sha256."""
        from pipeline.bundle import ModelBundle

        version = self.resolve(model, ref)
        meta = self.meta(model, version)
        path = self._model_dir(model) / "versions" / str(version) / WEIGHTS
        if sha256(path) != meta["sha256"]:
            raise RegistryError(f"{model} version {version}: weights file does not match its sha256 (corrupt)")
        bundle = ModelBundle(self.spec(model), version=version)
        bundle.load_weights(path)
        return bundle

    def set_alias(self, model: str, alias: str, version: int) -> dict:
        self.meta(model, version)
        with self._locked(model):
            aliases = self.aliases(model)
            if alias == "champion" and aliases.get("champion") not in (None, version):
                aliases.setdefault("history", []).append(aliases["champion"])
            aliases[alias] = version
            atomic_write(self._model_dir(model) / ALIASES, json.dumps(aliases, indent=2).encode())
        return self._moved(model, alias, version)

    def _moved(self, model: str, alias: str, version: int) -> dict:
        """Tell the listener an alias moved, in the ``model-updates`` message shape."""
        meta = self.meta(model, version)
        event = {"model": model, "version": version, "alias": alias,
                 "uri": str((self._model_dir(model) / "versions" / str(version)).resolve()),
                 "created_at": meta["created_at"], "metrics": meta["metrics"]}
        if self.on_alias_change:
            self.on_alias_change(event)
        return event

    def promote(self, model: str, version: int | None = None) -> dict:
        """Move ``champion`` to ``version`` (default: the current candidate)."""
        return self.set_alias(model, "champion", self.resolve(model, "candidate") if version is None else version)

    def rollback(self, model: str) -> dict:
        """Move ``champion`` back to the previous champion."""
        with self._locked(model):
            aliases = self.aliases(model)
            history = aliases.get("history", [])
            if not history:
                raise RegistryError(f"model {model!r} has no previous champion to roll back to")
            previous = history.pop()
            aliases["champion"] = previous
            atomic_write(self._model_dir(model) / ALIASES, json.dumps(aliases, indent=2).encode())
        return self._moved(model, "champion", previous)

    def retain(self, model: str, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions; aliased and history versions are always kept."""
        aliases = self.aliases(model)
        pinned = {v for k, v in aliases.items() if k != "history"} | set(aliases.get("history", []))
        doomed = [v for v in self.versions(model)[:-keep] if v not in pinned]
        for version in doomed:
            shutil.rmtree(self._model_dir(model) / "versions" / str(version))
        return doomed
