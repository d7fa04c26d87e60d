"""``streamfit up``: broker, parameter server, both Spark consumers, serving and a producer, with a live status."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from pipeline.cli import setting_default
from pipeline.ps.algorithms import STREAMABLE

STATUS_EVERY_S = 5.0
"""Seconds between status lines when the output is not a terminal (a terminal gets a live table)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the whole pipeline on this machine, with a live status",
        description="Start the embedded broker (unless STREAMFIT_KAFKA_BOOTSTRAP), the parameter server, the training "
        "and inference consumers (one Spark driver), the serving app and a producer of a drifting "
        "synthetic stream; show a live status; Ctrl-C (or --duration) stops everything in order. A second "
        "run with the same STREAMFIT_HOME resumes from where this one stopped.",
    )
    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="stop after this long (default: Ctrl-C)"
    )
    parser.add_argument(
        "--model",
        dest="model",
        help="model to train and serve; created from the built-in spec of "
        f"the same name when missing (default here: {UP_DEFAULTS['model']})",
    )
    parser.add_argument(
        "--source",
        help="producer source (default: the synthetic stream that fits the model, synth:hyperplane for small)",
    )
    parser.add_argument("--rate", type=float, default=500.0, help="events/s the producer sends (default %(default)g)")
    parser.add_argument(
        "--label-fraction", type=float, default=0.5, help="share of labelled events (default %(default)s)"
    )
    parser.add_argument(
        "--invalid-fraction", type=float, default=0.01, help="share of broken events (default %(default)s)"
    )
    parser.add_argument("--drift-at", type=int, default=60_000, help="abrupt concept drift after N events (0: none)")
    parser.add_argument("--algorithm", dest="algorithm", choices=STREAMABLE)
    parser.add_argument("--workers", dest="workers", type=int, help="Spark partitions training per micro-batch")
    parser.add_argument(
        "--manual-promote",
        dest="auto_promote",
        action="store_false",
        default=None,
        help="candidates wait for `streamfit models promote` (default: the gate promotes them)",
    )
    parser.add_argument(
        "--port", dest="serve_port", type=int, help=f"serving port (default {setting_default('serve_port')})"
    )
    parser.add_argument(
        "--ps-port", dest="ps_port", type=int, help=f"parameter server port (default {setting_default('ps_port')})"
    )
    parser.add_argument(
        "--master", dest="spark_master", help=f"Spark master (default {setting_default('spark_master')})"
    )
    parser.add_argument(
        "--max-offsets-per-trigger",
        dest="max_offsets_per_trigger",
        type=int,
        help="events per micro-batch at most, for both queries (default: all available; "
        "a bound keeps batches short but caps throughput, as each costs ~1 s of Spark overhead)",
    )
    parser.set_defaults(func=run)


UP_DEFAULTS = {"model": "small", "auto_promote": True}
"""Where ``up`` differs from the single commands' defaults (a flag or ``STREAMFIT_*`` still wins)."""


def run(args) -> int:
    from pipeline.cli import settings_from
    from pipeline.up import Pipeline, Traffic

    for name, default in UP_DEFAULTS.items():
        if getattr(args, name) is None and f"STREAMFIT_{name.upper()}" not in os.environ:
            setattr(args, name, default)
    settings = settings_from(args)
    traffic = Traffic(args.source, args.rate, args.label_fraction, args.invalid_fraction, args.drift_at or None)
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _log_to(logs / "up.log")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with _terminal_only(logs / "spark.log"):
        pipeline = Pipeline(settings, traffic, say=lambda text: print(text, flush=True))
        status = pipeline.run(stop, args.duration, _show_live if sys.stdout.isatty() else _show_lines)
        print(
            f"stopped; registry, checkpoints and broker data are under {settings.home}: "
            "`streamfit up` resumes from them",
            flush=True,
        )
    return status


def _log_to(path) -> None:
    """Component logs go to a file: the terminal belongs to the live status."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    for noisy in ("py4j", "httpx"):  # a line per callback connection / per status request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # Python warnings (pyspark's, TensorFlow's) too


@contextlib.contextmanager
def _terminal_only(path) -> Iterator[None]:
    """The terminal shows streamfit's own lines only. The Spark JVM inherits this process's file descriptors
    1 and 2, and its Python workers' output comes through it: log4j warnings (ProcessingTimeExecutor's
    "falling behind"), TensorFlow's oneDNN and absl banners, tf.function retracing warnings. Inside, those
    descriptors write to ``path``; streamfit's own lines go through ``sys.stdout`` and ``sys.stderr``, moved
    to copies of the terminal's (a stream not on its descriptor, as a test's capture, is left alone).
    Everything is put back on the way out, so an in-process caller keeps its terminal."""
    streams = {1: "stdout", 2: "stderr"}
    saved_streams = {name: getattr(sys, name) for name in streams.values()}
    saved_fds = {}
    for fd, name in streams.items():
        stream = getattr(sys, name)
        stream.flush()
        saved_fds[fd] = os.dup(fd)
        if _on_descriptor(stream, fd):
            setattr(sys, name, os.fdopen(os.dup(fd), "w", buffering=1))
    sink = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for fd in streams:
            os.dup2(sink, fd)
        yield
    finally:
        os.close(sink)
        for fd, name in streams.items():
            moved = getattr(sys, name)
            if moved is not saved_streams[name]:
                moved.close()
            setattr(sys, name, saved_streams[name])
            os.dup2(saved_fds[fd], fd)
            os.close(saved_fds[fd])


def _on_descriptor(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False


def _running(deadline: float | None, stop: threading.Event, failure) -> bool:
    return not stop.is_set() and (deadline is None or time.monotonic() < deadline) and failure() is None


def _show_live(board, deadline, stop, failure) -> None:
    from rich.live import Live

    from pipeline.status import render

    title = "streamfit up" + ("" if deadline is None else " (bounded run)") + " - Ctrl-C stops"
    with Live(render(board.sample(), title), refresh_per_second=2) as live:
        while _running(deadline, stop, failure):
            stop.wait(1.0)
            live.update(render(board.sample(), title))


def _show_lines(board, deadline, stop, failure) -> None:
    from pipeline.status import one_line

    while _running(deadline, stop, failure):
        print("status " + one_line(board.sample()), flush=True)
        stop.wait(min(STATUS_EVERY_S, max(0.0, deadline - time.monotonic())) if deadline else STATUS_EVERY_S)
    print("status " + one_line(board.sample()), flush=True)
