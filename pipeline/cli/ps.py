"""``streamfit ps``: run the parameter server, one process per shard, until Ctrl-C or SIGTERM
(:mod:`pipeline.ps.shards` runs them; this module checks the arguments and reports errors).

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
import signal
import socket
import threading

from safetensors import SafetensorError, safe_open

from pipeline.model_updates import announcing_registry
from pipeline.ps.algorithms import ALGORITHMS, from_settings
from pipeline.ps.sharding import plan
from pipeline.ps.shards import InitFile, InitVersion, run_shards, serve_shard, shard_checkpoint
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
    parser.add_argument(
        "--metrics-port",
        dest="ps_metrics_port",
        type=int,
        help="serve Prometheus metrics on this port (shard i on PORT+i; 0: a free port; default off)",
    )
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
    resuming = all(shard_checkpoint(settings, i).directory.joinpath("state.json").exists() for i in range(shards))
    init_source, sizes = (None, None) if resuming and not args.init_weights else _initial(settings, args.init_weights)
    layout = plan(sizes, shards) if sizes else [None] * shards
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if shards == 1:
        serve_shard(settings, 0, layout[0], init_source, stop, publish=True)
    else:
        run_shards(settings, layout, init_source, stop)
    return 0


def _loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback one."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in found)


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
