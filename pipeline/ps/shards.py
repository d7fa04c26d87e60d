"""The parameter server as processes: one shard served in this process, or one process per shard
under a supervisor that publishes from next to them.

Each shard resumes from its checkpoint under ``<home>/ps/<model>/shard-<i>-of-<K>`` when there is
one, else starts from its :class:`InitFile` or :class:`InitVersion` (the tensors of its part of the
layout, :func:`pipeline.ps.sharding.plan`). Shard ``i`` listens on ``ps_port + i`` (any free port
when 0) and, with ``ps_metrics_port`` set, serves its Prometheus metrics on ``ps_metrics_port + i``
(:mod:`pipeline.ps.metrics`). When the model is in the registry, the center variable is published as a new
``candidate`` version every ``ps_publish_every_updates`` updates or ``ps_publish_every_s`` seconds
with changes (and on shutdown): by the only shard's server itself, or, sharded, by the supervisor
with one sharded pull (:class:`~pipeline.publishing.ShardedPublishing`).

What the user can act on is raised as :class:`ShardError`; ``streamfit ps`` (:mod:`pipeline.cli.ps`)
reports it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from safetensors import safe_open

from pipeline.errors import StreamfitError
from pipeline.metrics import serve as serve_metrics
from pipeline.model_updates import announcing_registry
from pipeline.ps.algorithms import from_settings
from pipeline.ps.checkpoint import Checkpoint, CheckpointError
from pipeline.ps.client import connect
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.publishing import CandidatePublisher, ShardedPublishing
from pipeline.registry import RegistryError


class ShardError(StreamfitError, RuntimeError):
    """A shard cannot start, or a shard process exited: the message says why and what to do."""


@dataclass(frozen=True)
class InitFile:
    """Fresh shards start from a safetensors file (``--init-weights``)."""

    path: str

    def load(self, settings, names: list[str] | None) -> dict[str, np.ndarray]:
        """This shard's tensors (``names``; None: all)."""
        with safe_open(self.path, framework="numpy") as weights:
            return {name: weights.get_tensor(name) for name in (weights.keys() if names is None else names)}

    def masks(self, settings, names: list[str] | None) -> dict[str, np.ndarray]:
        """A weights file carries no pruning masks."""
        return {}

    def __str__(self) -> str:
        return f"file {self.path}"


@dataclass(frozen=True)
class InitVersion:
    """Fresh shards start from a registry version of the model (the champion when the command started)."""

    version: int

    def load(self, settings, names: list[str] | None) -> dict[str, np.ndarray]:
        """This shard's tensors (``names``; None: all)."""
        weights = announcing_registry(settings)[0].weights(settings.model, self.version)[1]
        return {name: weights[name] for name in (weights if names is None else names)}

    def masks(self, settings, names: list[str] | None) -> dict[str, np.ndarray]:
        """This shard's part of the version's pruning masks (``{}`` when it is not pruned)."""
        masks = announcing_registry(settings)[0].masks(settings.model, self.version)
        return {name: mask for name, mask in masks.items() if names is None or name in names}

    def __str__(self) -> str:
        return f"registry {self.version}"


InitialWeights = InitFile | InitVersion


def shard_checkpoint(settings, index: int) -> Checkpoint:
    """Where shard ``index`` of ``ps_shards`` keeps its checkpoint."""
    return Checkpoint(settings.home / "ps" / settings.model / f"shard-{index}-of-{settings.ps_shards}")


def run_shards(
    settings, layout: Sequence[list[str] | None], init_source: InitialWeights | None, stop: threading.Event
) -> None:
    """One process per shard (``layout[i]``: shard ``i``'s tensors), publishing from here, until
    ``stop`` is set or a shard process exits; then every shard is stopped (each writes its final
    checkpoint). :class:`ShardError` if a shard exited on its own."""
    context = multiprocessing.get_context("spawn")
    listening = context.Queue()
    processes = [
        context.Process(target=_shard_main, args=(settings, i, layout[i], init_source, listening), name=f"ps-shard-{i}")
        for i in range(len(layout))
    ]
    for process in processes:
        process.start()
    publishing = _sharded_publishing(settings, *_listening(listening, processes, stop))
    while not stop.is_set() and all(p.is_alive() for p in processes):
        multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.5)
    crashed = [p.name for p in processes if not p.is_alive() and p.exitcode]
    if publishing is not None:
        publishing.stop(final=not crashed)
    for process in processes:
        process.terminate()  # SIGTERM: each shard writes its final checkpoint
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    if crashed:
        raise ShardError(f"shard process(es) {', '.join(crashed)} exited unexpectedly")


def serve_shard(
    settings,
    index: int,
    names: list[str] | None,
    init_source: InitialWeights | None,
    stop: threading.Event,
    *,
    publish: bool,
    on_listening: Callable[[str, int, int], Any] | None = None,
) -> None:
    """Serve shard ``index`` (its tensors ``names``) in this process until ``stop`` is set, publishing
    candidates itself when ``publish``; ``on_listening(host, port, counter)`` once it listens."""
    checkpoint = shard_checkpoint(settings, index)

    def initial_weights():
        if init_source is None:
            raise ShardError(
                f"no checkpoint in {checkpoint.directory} (other shards have one): restore it or "
                f"move all of {checkpoint.directory.parent} away"
            )
        return init_source.load(settings, names)

    def initial_masks():
        return init_source.masks(settings, names) if init_source is not None else {}

    try:
        state, resumed = CenterState.resume(checkpoint, from_settings(settings).rule(), initial_weights, initial_masks)
    except CheckpointError as exc:
        raise ShardError(f"{exc}; move it away to start from the initial weights") from exc
    source = f"checkpoint {checkpoint.directory}" if resumed else str(init_source)
    port = settings.ps_port + index if settings.ps_port else 0
    publisher, announcer = candidate_publisher(settings) if publish else (None, None)
    try:
        server = ParameterServer.from_settings(
            state, settings, port=port, checkpoint=checkpoint, on_publish=publisher
        ).start()
    except OSError as exc:
        raise ShardError(f"shard {index}: cannot listen on {settings.ps_host}:{port} ({exc.strerror or exc})") from exc
    host, port = server.address
    exporter = None
    if settings.ps_metrics_port is not None:
        metrics_port = settings.ps_metrics_port + index if settings.ps_metrics_port else 0
        try:
            exporter = serve_metrics(server.metrics.registry, metrics_port, settings.ps_host)
        except OSError as exc:
            server.stop()
            raise ShardError(
                f"shard {index}: cannot serve metrics on {settings.ps_host}:{metrics_port} ({exc.strerror or exc})"
            ) from exc
    print(
        f"parameter server shard {index}/{settings.ps_shards} listening on {host}:{port} "
        f"(counter {state.counter}, {len(state.shapes)} tensors, from {source}"
        + (f", metrics on {host}:{exporter.server_port}/metrics" if exporter else "")
        + "); Ctrl-C stops it",
        flush=True,
    )
    if on_listening is not None:
        on_listening(host, port, state.counter)
    stop.wait()
    server.stop()
    if exporter is not None:
        exporter.shutdown()
    if announcer is not None:
        announcer.close()
    print(f"parameter server shard {index} stopped at counter {state.counter}", flush=True)


def candidate_publisher(settings):
    """``(publisher, announcer)`` when the model is in the registry, else ``(None, None)`` (said once)."""
    registry, announcer = announcing_registry(settings)
    try:
        registry.spec(settings.model)
    except RegistryError:
        print(
            f"model {settings.model!r} is not in registry {settings.registry_url}: versions will not be "
            f"published (create it with `streamfit models create`)",
            flush=True,
        )
        return None, None
    return CandidatePublisher(
        registry, settings.model, algorithm=settings.algorithm, keep=settings.registry_keep
    ), announcer


def _listening(listening, processes, stop: threading.Event) -> tuple[list[tuple[str, int]] | None, int]:
    """The shards' bound addresses in shard order and their lowest starting counter, as each reports
    them; ``(None, 0)`` if a shard died or we were stopped first."""
    found: dict[int, tuple[str, int, int]] = {}
    while len(found) < len(processes):
        if stop.is_set() or not all(p.is_alive() for p in processes):
            return None, 0
        try:
            index, host, port, counter = listening.get(timeout=0.5)
        except queue.Empty:
            continue
        found[index] = (host, port, counter)
    return [found[i][:2] for i in range(len(processes))], min(entry[2] for entry in found.values())


def _sharded_publishing(settings, addresses: list[tuple[str, int]] | None, counter: int) -> ShardedPublishing | None:
    publisher, _ = candidate_publisher(settings) if addresses else (None, None)
    if publisher is None:
        return None
    return ShardedPublishing(
        connect(settings, at=addresses),
        publisher,
        counter,
        every_updates=settings.ps_publish_every_updates,
        every_s=settings.ps_publish_every_s,
    ).start()


def _shard_main(settings, index: int, names: list[str] | None, init_source: InitialWeights | None, listening) -> None:
    """Entry point of a shard process."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s shard{index} %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve_shard(
            settings,
            index,
            names,
            init_source,
            stop,
            publish=False,
            on_listening=lambda host, port, counter: listening.put((index, host, port, counter)),
        )
    except ShardError as exc:
        print(f"streamfit ps: {exc}", file=sys.stderr)
        sys.exit(1)
