"""``streamfit ps``: run the parameter server, one process per shard, until Ctrl-C or SIGTERM.

Each shard resumes from its checkpoint under ``<home>/ps/<model>/shard-<i>-of-<K>`` when there is
one, else starts from ``--init-weights``; tensors are spread over shards by
:func:`pipeline.ps.sharding.plan`. Shard ``i`` listens on ``ps_port + i`` (any free port when 0).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
from pathlib import Path

from safetensors import SafetensorError, safe_open

from pipeline.ps.algorithms import ALGORITHMS, from_settings
from pipeline.ps.checkpoint import Checkpoint, CheckpointError
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.ps.sharding import plan


def register(subparsers) -> None:
    parser = subparsers.add_parser("ps", help="run the parameter server (one process per shard)",
                                   description="Hold the center variable of a model and serve pulls and commits "
                                               "from training workers, checkpointing as it goes. Resumes from the "
                                               "last checkpoint when there is one.")
    parser.add_argument("--init-weights", metavar="PATH", help="safetensors file of initial weights (used when no checkpoint exists)")
    parser.add_argument("--model", dest="model", help="model name (names the checkpoint directory)")
    parser.add_argument("--algorithm", dest="algorithm", choices=sorted(ALGORITHMS), help="decides the server's update rule")
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
    shards = settings.ps_shards
    layout = _layout(Path(args.init_weights), shards) if args.init_weights else [None] * shards
    for index in range(shards):
        if layout[index] is None and not _checkpoint(settings, index).directory.joinpath("state.json").exists():
            raise CommandError(f"no checkpoint in {_checkpoint(settings, index).directory} and no --init-weights given")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if shards == 1:
        _serve(settings, 0, layout[0], args.init_weights, stop)
        return 0
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_shard_main, args=(settings, i, layout[i], args.init_weights),
                                 name=f"ps-shard-{i}") for i in range(shards)]
    for process in processes:
        process.start()
    while not stop.is_set() and all(p.is_alive() for p in processes):
        multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.5)
    crashed = [p.name for p in processes if not p.is_alive() and p.exitcode]
    for process in processes:
        process.terminate()  # SIGTERM: each shard writes its final checkpoint
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    if crashed:
        raise CommandError(f"shard process(es) {', '.join(crashed)} exited unexpectedly")
    return 0


def _layout(path: Path, shards: int) -> list[list[str]]:
    from pipeline.cli import CommandError

    try:
        with safe_open(path, framework="numpy") as weights:
            sizes = {name: math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()}
        return plan(sizes, shards)
    except (OSError, ValueError, SafetensorError) as exc:
        raise CommandError(f"--init-weights {path}: {exc}") from exc


def _checkpoint(settings, index: int) -> Checkpoint:
    return Checkpoint(settings.home / "ps" / settings.model / f"shard-{index}-of-{settings.ps_shards}")


def _shard_main(settings, index: int, names: list[str] | None, init_path: str | None) -> None:
    """Entry point of a shard process."""
    from pipeline.cli import CommandError

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s shard{index} %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _serve(settings, index, names, init_path, stop)
    except CommandError as exc:
        print(f"streamfit ps: {exc}", file=sys.stderr)
        sys.exit(1)


def _serve(settings, index: int, names: list[str] | None, init_path: str | None, stop: threading.Event) -> None:
    from pipeline.cli import CommandError

    def initial_weights():
        with safe_open(init_path, framework="numpy") as weights:
            return {name: weights.get_tensor(name) for name in names}

    checkpoint = _checkpoint(settings, index)
    try:
        state, resumed = CenterState.resume(checkpoint, from_settings(settings).rule(), initial_weights)
    except CheckpointError as exc:
        raise CommandError(f"{exc}; move it away to start from --init-weights") from exc
    source = f"checkpoint {checkpoint.directory}" if resumed else f"initial weights {init_path}"
    port = settings.ps_port + index if settings.ps_port else 0
    try:
        server = ParameterServer.from_settings(state, settings, port=port, checkpoint=checkpoint).start()
    except OSError as exc:
        raise CommandError(f"shard {index}: cannot listen on {settings.ps_host}:{port} ({exc.strerror or exc})") from exc
    host, port = server.address
    print(f"parameter server shard {index}/{settings.ps_shards} listening on {host}:{port} "
          f"(counter {state.counter}, {len(state.shapes)} tensors, from {source}); Ctrl-C stops it", flush=True)
    stop.wait()
    server.stop()
    print(f"parameter server shard {index} stopped at counter {state.counter}", flush=True)
