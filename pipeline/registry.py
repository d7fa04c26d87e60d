"""The model registry: a directory tree of integer versions and the aliases that point at them.

``<root>/<model>/spec.json``, ``<root>/<model>/versions/<n>/{weights.safetensors,meta.json}`` (and
``masks.safetensors`` for a pruned version, :mod:`pipeline.pruning`),
``<root>/<model>/aliases.json`` (``champion``, ``candidate`` and the champion ``history``
that ``rollback`` pops). Writers serialise on a per-model lock, so two processes never
take the same version number, and a version only becomes visible whole: locally it is
written into a temporary directory and renamed into place (every file fsynced, every
replaced file renamed over the old one); on an fsspec store its ``meta.json`` is written
last and a version without one does not exist.

>>> import tempfile
>>> from pipeline.spec import BUILTIN_SPECS
>>> registry = Registry(tempfile.mkdtemp())
>>> spec = BUILTIN_SPECS["small"]
>>> registry.create_model(spec)
>>> registry.register("small", {name: np.zeros(shape) for name, shape in spec.weight_shapes.items()})
1
>>> registry.set_alias("small", "champion", 1)["uri"].endswith("small/versions/1")
True
>>> registry.resolve("small", "champion"), registry.versions("small")
(1, [1])
>>> registry.locate("models:/small@champion"), parse_model_uri("models:/small/1")
(('small', 1), ('small', 1))
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save as save_tensors

from pipeline.bundle import check_weights, weights_from_bytes, weights_to_bytes
from pipeline.durable import fsync_dir, replace_atomically, write_synced
from pipeline.errors import StreamfitError
from pipeline.pruning import checked_masks, masked, summary
from pipeline.spec import NAME_PATTERN, ModelSpec

WEIGHTS, META, SPEC, ALIASES, LOCK = "weights.safetensors", "meta.json", "spec.json", "aliases.json", ".lock"
MASKS = "masks.safetensors"
HISTORY_LENGTH = 20
"""Previous champions remembered for rollback (and kept by retention)."""
ALIAS_PATTERN = r"[a-z][a-z0-9_-]*"
MODEL_URI = re.compile(rf"models:/({NAME_PATTERN.strip('^$')})(?:@({ALIAS_PATTERN})|/([0-9]+))")
"""MLflow's model URIs: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``."""
TAG_KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MAX_TAG_VALUE, MAX_DESCRIPTION = 1_000, 10_000


class RegistryError(StreamfitError, LookupError):
    """Unknown model, version or alias, a corrupt version, or an unusable registry; the message names it."""


def parse_model_uri(uri: str) -> tuple[str, int | str]:
    """``(model, version or alias)`` of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI."""
    match = MODEL_URI.fullmatch(uri)
    if not match:
        raise RegistryError(f"bad model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    model, alias, version = match.groups()
    return model, int(version) if version is not None else alias


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` if every key is a short name and every value a bounded string (they land in meta.json)."""
    for key, value in tags.items():
        if not isinstance(key, str) or not re.fullmatch(TAG_KEY_PATTERN, key):
            raise RegistryError(f"bad tag key {key!r}: up to 64 letters, digits, '.', '_' or '-'")
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
            raise RegistryError(f"tag {key!r}: the value must be a string of at most {MAX_TAG_VALUE} characters")
    return dict(tags)


def check_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION:
        raise RegistryError(f"description has {len(description)} characters, more than {MAX_DESCRIPTION}")
    return description


class _LocalStore:
    """A POSIX directory: ``flock`` for writers; temp file, fsync and rename for every write."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def uri(self, path: str) -> str:
        return str(self.root / path)

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def exists(self, path: str) -> bool:
        return (self.root / path).exists()

    def list(self, path: str) -> list[str]:
        directory = self.root / path
        return [p.name for p in directory.iterdir()] if directory.is_dir() else []

    def write(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(target, data)
        fsync_dir(target.parent)

    def write_dir(self, path: str, files: Mapping[str, bytes]) -> None:
        """Create directory ``path`` holding ``files``, all at once: staged next to it, then renamed."""
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            for name, data in files.items():
                write_synced(staging / name, data)
            fsync_dir(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(target.parent)

    def remove(self, path: str) -> None:
        shutil.rmtree(self.root / path)

    @contextlib.contextmanager
    def lock(self, directory: str) -> Iterator[None]:
        (self.root / directory).mkdir(parents=True, exist_ok=True)
        with open(self.root / directory / LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


class _FsspecStore:
    """Shared storage through fsspec (s3://, gs://, ...): single-object writes are atomic there, a
    version's ``meta.json`` is written last, and writers hold a lock object created exclusively."""

    LOCK_TIMEOUT_S = 30.0

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError as exc:
            raise RegistryError(
                f"registry {url!r} is a URL, which needs fsspec (pip install fsspec "
                f"and the filesystem's package, e.g. s3fs)"
            ) from exc
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.url = url.rstrip("/")

    def _path(self, path: str) -> str:
        return f"{self.root}/{path}"

    def uri(self, path: str) -> str:
        return f"{self.url}/{path}"

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(self._path(path))

    def exists(self, path: str) -> bool:
        return self.fs.exists(self._path(path))

    def list(self, path: str) -> list[str]:
        try:
            return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self._path(path), detail=False)]
        except FileNotFoundError:
            return []

    def write(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(path), data)

    def write_dir(self, path: str, files: Mapping[str, bytes]) -> None:
        """Write the files in order; the caller puts the one that marks the directory complete last."""
        for name, data in files.items():
            self.write(f"{path}/{name}", data)

    def remove(self, path: str) -> None:
        self.fs.rm(self._path(path), recursive=True)

    @contextlib.contextmanager
    def lock(self, directory: str) -> Iterator[None]:
        lock, deadline = self._path(f"{directory}/{LOCK}"), time.monotonic() + self.LOCK_TIMEOUT_S
        while True:
            try:
                with self.fs.open(lock, "xb") as handle:
                    handle.write(f"{uuid.uuid4()} {time.time()}".encode())
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"registry lock {self.uri(f'{directory}/{LOCK}')} held for more than "
                        f"{self.LOCK_TIMEOUT_S:g} s; delete it if its writer died"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            self.fs.rm(lock)


def _store(root: str | os.PathLike) -> _LocalStore | _FsspecStore:
    url = os.fspath(root)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url) and not url.startswith("file://"):
        return _FsspecStore(url)
    return _LocalStore(Path(url.removeprefix("file://")))


class Registry:
    """Versions and aliases of models under ``root`` (a path, ``file://`` or fsspec URL).

    ``on_alias_change(event)`` is called after every alias move with the ``model-updates``
    message: ``{"model", "version", "alias", "uri", "created_at", "metrics"}``. Its errors
    propagate to the caller; the alias has moved by then.
    """

    def __init__(self, root: str | os.PathLike, on_alias_change: Callable[[dict], None] | None = None):
        self.root = os.fspath(root)
        self.on_alias_change = on_alias_change
        self._store = _store(root)

    @property
    def url(self) -> str:
        """Where another process opens this registry from any directory (a Spark executor on a cluster
        runs in its worker's directory, maybe on another machine): the absolute path, or the URL."""
        return self._store.uri("").rstrip("/") or "/"

    # ------------------------------------------------------------------------------------------ reading

    def models(self) -> list[str]:
        return sorted(name for name in self._store.list("") if self._store.exists(f"{name}/{SPEC}"))

    def spec(self, model: str) -> ModelSpec:
        return ModelSpec.model_validate_json(self._store.read(f"{self._model(model)}/{SPEC}"))

    def versions(self, model: str) -> list[int]:
        """Complete versions, oldest first."""
        directory = f"{self._model(model)}/versions"
        return sorted(
            int(name)
            for name in self._store.list(directory)
            if name.isdigit() and self._store.exists(f"{directory}/{name}/{META}")
        )

    def meta(self, model: str, version: int) -> dict:
        """``version, parent, algorithm, updates, offsets, metrics, sha256, created_at`` (epoch ms),
        ``description`` and ``tags`` (``{key: value}``)."""
        try:
            return json.loads(self._store.read(self._version_path(model, version, META)))
        except FileNotFoundError:
            raise RegistryError(f"model {model!r} has no version {version}") from None

    def aliases(self, model: str) -> dict[str, int]:
        return {k: v for k, v in self._aliases_file(model).items() if k != "history"}

    def resolve(self, model: str, ref: int | str) -> int:
        """The version number that ``ref`` (a number, an alias name or a ``models:/`` URI of
        ``model``) names now."""
        if isinstance(ref, str) and ref.startswith("models:/"):
            uri, (named, ref) = ref, parse_model_uri(ref)
            if named != model:
                raise RegistryError(f"URI {uri!r} names model {named!r}, not {model!r}")
        if isinstance(ref, int) or str(ref).isdigit():
            version = int(ref)
            self.meta(model, version)
            return version
        aliased = self.aliases(model).get(ref)
        if aliased is None:
            raise RegistryError(f"model {model!r} has no {ref!r} alias")
        return aliased

    def locate(self, name_or_uri: str, default: int | str = "champion") -> tuple[str, int]:
        """``(model, version)`` named by a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI,
        or by a plain model name and ``default`` (a version or alias)."""
        model, ref = parse_model_uri(name_or_uri) if name_or_uri.startswith("models:/") else (name_or_uri, default)
        return model, self.resolve(model, ref)

    def uri(self, model: str, version: int) -> str:
        return self._store.uri(f"{self._model(model)}/versions/{int(version)}")

    def weights(self, model: str, ref: int | str = "champion") -> tuple[int, dict[str, np.ndarray]]:
        """The version ``ref`` names and its weights, checked against the sha256 recorded at registration."""
        version = self.resolve(model, ref)
        expected = self.meta(model, version)["sha256"]
        try:
            data = self._store.read(self._version_path(model, version, WEIGHTS))
        except FileNotFoundError:
            raise RegistryError(f"model {model!r} version {version} has no weights file") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise RegistryError(
                f"model {model!r} version {version}: weights file does not match its "
                f"recorded sha256 (corrupt or tampered): {self.uri(model, version)}"
            )
        return version, weights_from_bytes(data)

    def masks(self, model: str, ref: int | str = "champion") -> dict[str, np.ndarray]:
        """The pruning masks (``uint8``, 1 keeps) of the version ``ref`` names; ``{}`` when it is not pruned."""
        version = self.resolve(model, ref)
        expected = self.meta(model, version).get("masks_sha256")
        if expected is None:
            return {}
        try:
            data = self._store.read(self._version_path(model, version, MASKS))
        except FileNotFoundError:
            raise RegistryError(f"model {model!r} version {version} has no masks file") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise RegistryError(f"model {model!r} version {version}: masks file does not match its recorded sha256")
        return weights_from_bytes(data)

    def load(self, model: str, ref: int | str = "champion", engine: str = "auto"):
        """A :class:`~pipeline.bundle.ModelBundle` of the version ``ref`` names, run by ``engine``."""
        from pipeline.bundle import ModelBundle

        version, weights = self.weights(model, ref)
        bundle = ModelBundle(self.spec(model), version=version, engine=engine)
        bundle.set_weights(weights)
        return bundle

    # ------------------------------------------------------------------------------------------ writing

    def create_model(self, spec: ModelSpec) -> None:
        with self._store.lock(spec.name):
            if self._store.exists(f"{spec.name}/{SPEC}"):
                raise RegistryError(f"model {spec.name!r} already exists in registry {self.root}")
            self._store.write(f"{spec.name}/{SPEC}", spec.model_dump_json(indent=2).encode())

    def register(
        self,
        model: str,
        weights: Mapping[str, np.ndarray],
        *,
        parent: int | None = None,
        algorithm: str | None = None,
        updates: int = 0,
        offsets: Mapping | None = None,
        metrics: Mapping | None = None,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        masks: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Store a new version and return its number; weights must fit the model's spec exactly.

        ``offsets`` are the Kafka offsets the weights were trained through
        (``{topic: {partition: offset}}``), ``metrics`` e.g. prequential accuracy; ``description``
        and ``tags`` are free text for people (MLflow's), changed later with :meth:`annotate`.
        ``masks`` prune the version: its weights are zeroed where they are 0, they are stored beside
        the weights and meta.json records the parameter counts (:func:`pipeline.pruning.summary`).
        """
        weights = check_weights(self.spec(model), weights)
        files, pruning = {}, {}
        if masks:
            masks = checked_masks(weights, masks)
            weights = masked(weights, masks)
            files[MASKS] = save_tensors(masks)
            pruning = {**summary(weights, masks), "masks_sha256": hashlib.sha256(files[MASKS]).hexdigest()}
        data = weights_to_bytes(weights)
        description, tags = check_description(description), check_tags(tags or {})
        with self._store.lock(self._model(model)):
            version = max(self.versions(model), default=0) + 1
            meta = {
                "version": version,
                "parent": parent,
                "algorithm": algorithm,
                "updates": updates,
                "offsets": dict(offsets or {}),
                "metrics": dict(metrics or {}),
                "sha256": hashlib.sha256(data).hexdigest(),
                "created_at": int(time.time() * 1000),
                "description": description,
                "tags": tags,
                **pruning,
            }
            self._store.write_dir(
                f"{model}/versions/{version}", {WEIGHTS: data, **files, META: json.dumps(meta, indent=2).encode()}
            )
        return version

    def annotate(
        self,
        model: str,
        version: int,
        *,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        remove_tags: tuple[str, ...] = (),
    ) -> dict:
        """Set a version's description (when given), set ``tags`` and remove ``remove_tags``; the new meta.

        Only these fields change: the weights, their sha256 and the lineage stay as registered.
        """
        tags = check_tags(tags or {})
        with self._store.lock(self._model(model)):
            meta = self.meta(model, version)
            if description is not None:
                meta["description"] = check_description(description)
            meta["tags"] = {k: v for k, v in {**meta.get("tags", {}), **tags}.items() if k not in remove_tags}
            self._store.write(self._version_path(model, version, META), json.dumps(meta, indent=2).encode())
        return meta

    def delete_alias(self, model: str, alias: str) -> int:
        """Remove ``alias``; returns the version it pointed at. ``champion`` is what serving and the
        Spark predictor follow, so it only moves (promote, rollback), it is never deleted. Announced like
        a move, marked ``"deleted": true``: servers following ``candidate`` (canary, shadow) drop it now."""
        if alias in ("champion", "history"):
            raise RegistryError(f"the {alias!r} alias cannot be deleted; move champion with promote or rollback")
        with self._store.lock(self._model(model)):
            aliases = self._aliases_file(model)
            if alias not in aliases:
                raise RegistryError(f"model {model!r} has no {alias!r} alias")
            version = aliases.pop(alias)
            self._store.write(f"{model}/{ALIASES}", json.dumps(aliases, indent=2).encode())
        self._announce(model, alias, version, deleted=True)
        return version

    def set_alias(self, model: str, alias: str, version: int) -> dict:
        """Point ``alias`` at ``version``; a champion that moves goes onto the rollback history."""
        if not re.fullmatch(ALIAS_PATTERN, alias) or alias == "history":
            raise RegistryError(f"bad alias name {alias!r} (lowercase letters, digits, _ and -; not 'history')")
        self.meta(model, version)
        with self._store.lock(self._model(model)):
            aliases = self._aliases_file(model)
            if alias == "champion" and aliases.get("champion") not in (None, version):
                aliases["history"] = (aliases.get("history", []) + [aliases["champion"]])[-HISTORY_LENGTH:]
            aliases[alias] = version
            self._store.write(f"{model}/{ALIASES}", json.dumps(aliases, indent=2).encode())
        return self._announce(model, alias, version)

    def promote(self, model: str, version: int | None = None) -> dict:
        """Move ``champion`` to ``version``, by default to the current ``candidate``."""
        return self.set_alias(model, "champion", self.resolve(model, "candidate") if version is None else version)

    def rollback(self, model: str) -> dict:
        """Move ``champion`` back to the previous champion still in the registry."""
        with self._store.lock(self._model(model)):
            aliases = self._aliases_file(model)
            history = [v for v in aliases.get("history", []) if self._store.exists(self._version_path(model, v, META))]
            if not history:
                raise RegistryError(f"model {model!r} has no previous champion to roll back to")
            aliases["champion"], aliases["history"] = history[-1], history[:-1]
            self._store.write(f"{model}/{ALIASES}", json.dumps(aliases, indent=2).encode())
        return self._announce(model, "champion", aliases["champion"])

    def retain(self, model: str, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions, never an aliased one or a rollback target.

        Returns the deleted versions.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        with self._store.lock(self._model(model)):
            aliases = self._aliases_file(model)
            pinned = {v for k, v in aliases.items() if k != "history"} | set(aliases.get("history", []))
            doomed = [v for v in self.versions(model)[:-keep] if v not in pinned]
            for version in doomed:
                self._store.remove(f"{model}/versions/{version}")
        return doomed

    # ------------------------------------------------------------------------------------------ helpers

    def _model(self, model: str) -> str:
        """``model`` checked to be a safe name of an existing model."""
        if not re.fullmatch(NAME_PATTERN, model) or not self._store.exists(f"{model}/{SPEC}"):
            raise RegistryError(
                f"no model {model!r} in registry {self.root} (create it with `streamfit models create`)"
            )
        return model

    def _version_path(self, model: str, version: int, name: str) -> str:
        return f"{self._model(model)}/versions/{int(version)}/{name}"

    def _aliases_file(self, model: str) -> dict:
        try:
            return json.loads(self._store.read(f"{self._model(model)}/{ALIASES}"))
        except FileNotFoundError:
            return {}

    def _announce(self, model: str, alias: str, version: int, deleted: bool = False) -> dict:
        """The ``model-updates`` message for an alias move (or deletion), also handed to ``on_alias_change``."""
        meta = self.meta(model, version)
        event: dict = {
            "model": model,
            "version": version,
            "alias": alias,
            "uri": self.uri(model, version),
            "created_at": meta["created_at"],
            "metrics": meta["metrics"],
        }
        if deleted:
            event["deleted"] = True
        if self.on_alias_change:
            self.on_alias_change(event)
        return event
