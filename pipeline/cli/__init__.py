"""The ``streamfit`` command: one subcommand per component.

Each subcommand lives in its own module under ``pipeline.cli`` and exposes
``register(subparsers)``. Flags whose ``dest`` is a setting name override that
setting; everything else comes from ``STREAMFIT_*`` variables or ``--config``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from pipeline.errors import StreamfitError
from pipeline.settings import CONFIG_ENV, Settings, SettingsError, load_settings

COMMANDS = ("broker", "topics", "produce", "ps", "fit", "train", "predict", "models", "serve", "console", "up")


class CommandError(StreamfitError, RuntimeError):
    """A failure the user can act on: printed without a traceback, exit code 1."""


def setting_default(name: str) -> object:
    """The default of setting ``name``, for help texts: the settings object is its one source."""
    return Settings.model_fields[name].default


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings with every flag the user passed applied on top."""
    return load_settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})


def run_until_stopped(running: Callable[[], bool]) -> None:
    """Block until Ctrl-C or SIGTERM, or until ``running()`` turns false (checked every second)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0) and running():
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamfit", description="Kafka-streaming model serving and online training.")
    parser.add_argument("--config", help=f"YAML settings file (same as {CONFIG_ENV})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # SIGINT means "stop cleanly" to every streamfit command (`up` sends it to its producer), even when the
    # process started with SIGINT ignored, as a shell's background job does: Python then installs no handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    if args.config:
        os.environ[CONFIG_ENV] = args.config
    try:
        return args.func(args) or 0
    except SettingsError as exc:
        print(f"streamfit: {exc}", file=sys.stderr)
        return 2
    except StreamfitError as exc:  # what the user can act on; anything else is a bug and keeps its traceback
        print(f"streamfit {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
