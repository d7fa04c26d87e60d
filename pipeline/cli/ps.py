"""``streamfit ps``: run the parameter server, one process per shard, until Ctrl-C or SIGTERM.

Each shard resumes from its checkpoint under ``<home>/ps/<model>/shard-<i>-of-<K>`` when there is
one, else starts from ``--init-weights`` or, without it, from the registry's ``champion``; tensors
are spread over shards by :func:`pipeline.ps.sharding.plan`. Shard ``i`` listens on ``ps_port + i``
(any free port when 0). When the model is in the registry, the center variable is published as a
new ``candidate`` version every ``ps_publish_every_updates`` updates or ``ps_publish_every_s``
seconds with changes (and on shutdown), each alias move announced on ``model-updates``.

Without ``ps_secret`` anyone who reaches the port can train the model, so binding a non-loopback
address without one needs ``ps_allow_insecure`` (and is logged as a warning).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import multiprocessing
import multiprocessing.connection
import queue
import signal
import socket
import sys
import threading
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError, safe_open

from pipeline.model_updates import announcing_registry
from pipeline.ps.algorithms import ALGORITHMS, from_settings
from pipeline.ps.checkpoint import Checkpoint, CheckpointError
from pipeline.ps.client import connect
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.ps.sharding import plan
from pipeline.publishing import CandidatePublisher, ShardedPublishing
from pipeline.registry import RegistryError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ps",
        help="run the parameter server (one process per shard)",
        description="Hold the center variable of a model and serve pulls and commits "
        "from training workers, checkpointing as it goes and publishing "
        "candidate versions to the registry. Resumes from the last "
        "checkpoint when there is one.",
    )
    parser.add_argument(
        "--init-weights",
        metavar="PATH",
        help="safetensors file of initial weights (used when no checkpoint exists; default: the registry's champion)",
    )
    parser.add_argument("--model", dest="model", help="model name (names the checkpoint directory)")
    parser.add_argument(
        "--algorithm", dest="algorithm", choices=sorted(ALGORITHMS), help="decides the server's update rule"
    )
    parser.add_argument("--workers", dest="workers", type=int, help="workers per synchronous round (algorithm sync)")
    parser.add_argument("--host", dest="ps_host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", dest="ps_port", type=int, help="port of shard 0; shard i uses PORT+i (0: free ports)")
    parser.add_argument("--shards", dest="ps_shards", type=int, help="number of server processes (default 1)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pipeline.cli import CommandError, settings_from

    settings = settings_from(args)
    try:
        from_settings(settings)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if settings.ps_secret is None and not _loopback(settings.ps_host):
        if not settings.ps_allow_insecure:
            raise CommandError(
                f"refusing to serve unauthenticated frames on {settings.ps_host!r}, which is not a "
                f"loopback address: set STREAMFIT_PS_SECRET (the training workers need the same), "
                f"or STREAMFIT_PS_ALLOW_INSECURE=true on a network you trust"
            )
        logging.getLogger(__name__).warning(
            "parameter server on %s without ps_secret: anyone who reaches it can change the model (ps_allow_insecure)",
            settings.ps_host,
        )
    shards = settings.ps_shards
    if shards > 1 and ALGORITHMS[settings.algorithm].replica_per_worker:
        raise CommandError(f"{settings.algorithm} keeps one replica per worker on one server: run it with --shards 1")
    resuming = all(_checkpoint(settings, i).directory.joinpath("state.json").exists() for i in range(shards))
    init_source, sizes = (None, None) if resuming and not args.init_weights else _initial(settings, args.init_weights)
    layout = plan(sizes, shards) if sizes else [None] * shards
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if shards == 1:
        _serve(settings, 0, layout[0], init_source, stop, publish=True)
        return 0
    context = multiprocessing.get_context("spawn")
    listening = context.Queue()
    processes = [
        context.Process(target=_shard_main, args=(settings, i, layout[i], init_source, listening), name=f"ps-shard-{i}")
        for i in range(shards)
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
        raise CommandError(f"shard process(es) {', '.join(crashed)} exited unexpectedly")
    return 0


def _loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback one."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in found)


@dataclass(frozen=True)
class InitFile:
    """Fresh shards start from a safetensors file (``--init-weights``)."""

    path: str

    def load(self, settings, names: list[str] | None) -> dict[str, np.ndarray]:
        """This shard's tensors (``names``; None: all)."""
        with safe_open(self.path, framework="numpy") as weights:
            return {name: weights.get_tensor(name) for name in (weights.keys() if names is None else names)}

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

    def __str__(self) -> str:
        return f"registry {self.version}"


def _initial(settings, init_path: str | None) -> tuple[InitFile | InitVersion, dict[str, int]]:
    """Where fresh shards start and the tensor sizes."""
    from pipeline.cli import CommandError

    if init_path:
        try:
            with safe_open(init_path, framework="numpy") as weights:
                sizes = {name: math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()}
            return InitFile(init_path), sizes
        except (OSError, ValueError, SafetensorError) as exc:
            raise CommandError(f"--init-weights {init_path}: {exc}") from exc
    try:
        version, weights = announcing_registry(settings)[0].weights(settings.model, "champion")
    except RegistryError as exc:
        raise CommandError(
            f"no checkpoint under {settings.home / 'ps' / settings.model}, no --init-weights, "
            f"and no champion in the registry to start from ({exc})"
        ) from exc
    return InitVersion(version), {name: value.size for name, value in weights.items()}


def _checkpoint(settings, index: int) -> Checkpoint:
    return Checkpoint(settings.home / "ps" / settings.model / f"shard-{index}-of-{settings.ps_shards}")


def _publisher(settings):
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
    publisher, _ = _publisher(settings) if addresses else (None, None)
    if publisher is None:
        return None
    return ShardedPublishing(
        connect(settings, at=addresses),
        publisher,
        counter,
        every_updates=settings.ps_publish_every_updates,
        every_s=settings.ps_publish_every_s,
    ).start()


def _shard_main(
    settings, index: int, names: list[str] | None, init_source: InitFile | InitVersion | None, listening
) -> None:
    """Entry point of a shard process."""
    from pipeline.cli import CommandError

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s shard{index} %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _serve(
            settings,
            index,
            names,
            init_source,
            stop,
            publish=False,
            on_listening=lambda host, port, counter: listening.put((index, host, port, counter)),
        )
    except CommandError as exc:
        print(f"streamfit ps: {exc}", file=sys.stderr)
        sys.exit(1)


def _serve(
    settings,
    index: int,
    names: list[str] | None,
    init_source: InitFile | InitVersion | None,
    stop: threading.Event,
    *,
    publish: bool,
    on_listening=None,
) -> None:
    from pipeline.cli import CommandError

    def initial_weights():
        if init_source is None:
            raise CommandError(
                f"no checkpoint in {checkpoint.directory} (other shards have one): restore it or "
                f"move all of {checkpoint.directory.parent} away"
            )
        return init_source.load(settings, names)

    checkpoint = _checkpoint(settings, index)
    try:
        state, resumed = CenterState.resume(checkpoint, from_settings(settings).rule(), initial_weights)
    except CheckpointError as exc:
        raise CommandError(f"{exc}; move it away to start from the initial weights") from exc
    source = f"checkpoint {checkpoint.directory}" if resumed else str(init_source)
    port = settings.ps_port + index if settings.ps_port else 0
    publisher, announcer = _publisher(settings) if publish else (None, None)
    try:
        server = ParameterServer.from_settings(
            state, settings, port=port, checkpoint=checkpoint, on_publish=publisher
        ).start()
    except OSError as exc:
        raise CommandError(
            f"shard {index}: cannot listen on {settings.ps_host}:{port} ({exc.strerror or exc})"
        ) from exc
    host, port = server.address
    print(
        f"parameter server shard {index}/{settings.ps_shards} listening on {host}:{port} "
        f"(counter {state.counter}, {len(state.shapes)} tensors, from {source}); Ctrl-C stops it",
        flush=True,
    )
    if on_listening is not None:
        on_listening(host, port, state.counter)
    stop.wait()
    server.stop()
    if announcer is not None:
        announcer.close()
    print(f"parameter server shard {index} stopped at counter {state.counter}", flush=True)
