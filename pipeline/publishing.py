"""Trained weights become registry versions: one place for `streamfit fit` and `streamfit ps`.

An ensemble's published weights are its members (``member<id>/<tensor>``); each member becomes its
own version, the best on the held-out rows first. The first version returned is the one to make
``candidate``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from pipeline.ps.periodic import Periodic, PolledProgress
from pipeline.registry import Registry
from pipeline.training import evaluate

log = logging.getLogger(__name__)


def members_of(published: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``{member name or "": weights}``: one entry unless the weights are an ensemble's members."""
    members: dict[str, dict[str, np.ndarray]] = {}
    for name, value in published.items():
        head, _, rest = name.partition("/")
        member, tensor = (head, rest) if re.fullmatch(r"member\d+", head) else ("", name)
        members.setdefault(member, {})[tensor] = value
    return members


@dataclass(frozen=True)
class ScoredMember:
    """One member of the published weights (``""``: the whole model) and its metrics on the held-out rows."""

    member: str
    weights: Mapping[str, np.ndarray]
    metrics: dict

    @property
    def accuracy(self) -> float:
        """What orders the members: the held-out accuracy, 0 when there was no holdout."""
        return self.metrics.get("accuracy", 0.0)


def register_trained(
    registry: Registry,
    model: str,
    published: Mapping[str, np.ndarray],
    *,
    parent: int | None,
    algorithm: str,
    updates: int,
    offsets: Mapping | None = None,
    holdout: tuple[np.ndarray, np.ndarray] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[int], dict]:
    """Register ``published`` (scored on ``holdout`` when given; pruned by ``masks``); returns the
    versions, best first, and the best one's metrics (an ensemble's also carry ``ensemble_accuracy``)."""
    from pipeline.bundle import ModelBundle

    bundle = ModelBundle(registry.spec(model))
    scored = []
    for member, weights in members_of(published).items():
        bundle.set_weights(weights)
        scored.append(ScoredMember(member, weights, evaluate(bundle, *holdout) if holdout is not None else {}))
    if len(scored) > 1 and holdout is not None:  # the ensemble's own score: mean of the members' probabilities
        probabilities = []
        for entry in scored:
            bundle.set_weights(entry.weights)
            probabilities.append(bundle.predict_proba(holdout[0]))
        accuracy = float(np.mean(np.mean(probabilities, axis=0).argmax(axis=1) == holdout[1]))
        scored = [replace(entry, metrics={**entry.metrics, "ensemble_accuracy": accuracy}) for entry in scored]
    scored.sort(key=lambda entry: -entry.accuracy)
    versions = [
        registry.register(
            model,
            entry.weights,
            parent=parent,
            algorithm=algorithm,
            updates=updates,
            offsets=offsets,
            metrics={**entry.metrics, **({"member": entry.member} if entry.member else {})},
            masks=masks,
        )
        for entry in scored
    ]
    return versions, scored[0].metrics


def trained_offsets(commits: Mapping[str, Mapping]) -> dict[str, dict[str, int]]:
    """The Kafka offsets the weights were trained through, from the server's latest commit metadata
    per query (``{"offsets": {topic: {partition: offset}}}``); the highest offset per partition wins."""
    merged: dict[str, dict[str, int]] = {}
    for meta in commits.values():
        for topic, partitions in (meta.get("offsets") or {}).items():
            for partition, offset in partitions.items():
                slot = merged.setdefault(topic, {})
                slot[str(partition)] = max(int(offset), slot.get(str(partition), -1))
    return merged


class CandidatePublisher:
    """The parameter server's ``on_publish``: each publication becomes a new version (its parent the
    champion of the moment) and the ``candidate``; old versions beyond ``keep`` are removed. A pruned
    champion's masks go with a publication whose weights are zero wherever they prune (a parameter
    server started from it keeps them so), so the candidate is pruned the same way."""

    def __init__(self, registry: Registry, model: str, *, algorithm: str, keep: int):
        self.registry, self.model, self.algorithm, self.keep = registry, model, algorithm, keep

    def __call__(self, weights: Mapping[str, np.ndarray], counter: int, meta: Mapping) -> int:
        parent = self.registry.aliases(self.model).get("champion")
        versions, _ = register_trained(
            self.registry,
            self.model,
            weights,
            parent=parent,
            algorithm=self.algorithm,
            updates=counter,
            offsets=trained_offsets(meta.get("commits", {})),
            masks=self._parent_masks(parent, weights),
        )
        self.registry.set_alias(self.model, "candidate", versions[0])
        self.registry.retain(self.model, self.keep)
        log.info("published %s version %d as candidate at update %d", self.model, versions[0], counter)
        return versions[0]

    def _parent_masks(self, parent: int | None, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        masks = self.registry.masks(self.model, parent) if parent is not None else {}
        held = all(name in weights and not np.any(weights[name][mask == 0]) for name, mask in masks.items())
        return masks if held else {}


class ShardedPublishing:
    """Publication for a sharded server, run next to the shards: each shard holds only some tensors,
    so this thread watches the shards' counters (``stats``, every ``poll_s``), and when
    ``every_updates`` updates or ``every_s`` seconds with changes have passed, gathers the weights with
    one sharded pull and hands them to ``publish`` (a :class:`~pipeline.ps.periodic.Periodic`).
    ``counter`` is where the shards started (already in the registry). A failure (registry down) is
    logged and retried with back-off."""

    def __init__(
        self,
        client,
        publish: CandidatePublisher,
        counter: int,
        *,
        every_updates: int,
        every_s: float,
        poll_s: float = 0.5,
    ):
        self._client, self._publish = client, publish
        progress = PolledProgress(lambda: client.stats()["counter"], counter=counter, poll_s=poll_s)
        self._periodic = Periodic("ps-publish", progress, self._round, every_updates, every_s)

    def start(self) -> ShardedPublishing:
        self._periodic.start()
        return self

    def stop(self, *, final: bool) -> None:
        """Stop the thread; with ``final``, publish once more if anything changed (shards still up)."""
        self._periodic.stop(final=final)

    def _round(self) -> int:
        stats = self._client.stats()
        weights, counter = self._client.pull()
        commits = {query: meta for shard in stats["shards"] for query, meta in shard.get("queries", {}).items()}
        self._publish(weights, counter, {"commits": commits})
        return counter
