"""Atomic on-disk checkpoints of one parameter-server shard.

A checkpoint is a safetensors file of the center variable, an optional safetensors file of the update
rule's own tensors (a synchronous round in progress, ensemble members), and ``state.json`` naming
both with their sha256, the update counter, the replay guard and the latest commit metadata (Kafka
offsets). ``state.json`` is written last and is the commit point: every file is written to a temp
file in the same directory, fsynced, renamed, and the directory fsynced, so a crash at any moment
leaves the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load, save as st_save

from pipeline.durable import fsync_dir, replace_atomically
from pipeline.errors import StreamfitError

log = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE = "state.json"


class CheckpointError(StreamfitError, RuntimeError):
    """A checkpoint exists but cannot be read back faithfully (missing file, wrong hash, bad JSON)."""


@dataclass
class Snapshot:
    """A consistent copy of a shard's state, taken under the state lock."""

    counter: int
    weights: Mapping[str, np.ndarray]
    rule_tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    rule_state: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=dict)
    masks: Mapping[str, np.ndarray] = field(default_factory=dict)
    """A pruned model's masks (:mod:`pipeline.pruning`), kept so a restart still holds pruned weights at zero."""


class Checkpoint:
    """Saves and loads :class:`Snapshot` objects in one directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def save(self, snapshot: Snapshot) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        token = f"{snapshot.counter}-{uuid.uuid4().hex[:8]}"
        state: dict[str, Any] = {
            "format": FORMAT,
            "counter": snapshot.counter,
            "guard": snapshot.guard,
            "rule_state": snapshot.rule_state,
            "weights": self._write_tensors(f"weights-{token}.safetensors", snapshot.weights),
        }
        if snapshot.rule_tensors:
            state["rule_tensors"] = self._write_tensors(f"rule-{token}.safetensors", snapshot.rule_tensors)
        if snapshot.masks:
            state["masks"] = self._write_tensors(f"masks-{token}.safetensors", snapshot.masks)
        fsync_dir(self.directory)
        replace_atomically(self.directory / STATE_FILE, json.dumps(state, indent=1).encode())
        fsync_dir(self.directory)
        keep = {STATE_FILE, state["weights"]["file"]} | {
            state.get(k, {}).get("file") for k in ("rule_tensors", "masks")
        }
        for path in self.directory.iterdir():
            if path.name not in keep and path.name.startswith(("weights-", "rule-", "masks-", ".tmp-")):
                path.unlink(missing_ok=True)
        log.debug("checkpoint at counter %d written to %s", snapshot.counter, self.directory)

    def load(self) -> Snapshot | None:
        """The last checkpoint, or None if there is none; raises :class:`CheckpointError` if it is damaged."""
        path = self.directory / STATE_FILE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            if state.get("format") != FORMAT:
                raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
            return Snapshot(
                counter=int(state["counter"]),
                weights=self._read_tensors(state["weights"]),
                rule_tensors=self._read_tensors(state["rule_tensors"]) if "rule_tensors" in state else {},
                rule_state=state["rule_state"],
                guard=state["guard"],
                masks=self._read_tensors(state["masks"]) if "masks" in state else {},
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise CheckpointError(f"checkpoint in {self.directory} is unreadable: {exc}") from exc

    def _write_tensors(self, name: str, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
        data = st_save({k: np.asarray(v, order="C") for k, v in tensors.items()})
        replace_atomically(self.directory / name, data)
        return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "names": list(tensors)}

    def _read_tensors(self, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
        data = (self.directory / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{self.directory / entry['file']}: sha256 does not match {STATE_FILE}")
        tensors = st_load(data)
        return {name: tensors[name] for name in entry["names"]}
