"""One error hierarchy: what a user can cause is a StreamfitError, printed by the CLI without a
traceback (exit 1); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import socket

import pytest

from consumers.training import TrainingError
from pipeline import cli
from pipeline.broker import BrokerError
from pipeline.bundle import WeightsError
from pipeline.errors import StreamfitError
from pipeline.fit import FitError
from pipeline.kafka import KafkaUnavailable
from pipeline.ps.checkpoint import CheckpointError
from pipeline.ps.shards import ShardError
from pipeline.registry import RegistryError
from pipeline.settings import SettingsError
from pipeline.spark.session import SparkSetupError
from pipeline.up import UpError


@pytest.mark.parametrize(
    "error",
    [SettingsError, KafkaUnavailable, BrokerError, RegistryError, SparkSetupError, UpError, cli.CommandError]
    + [FitError, TrainingError, WeightsError, CheckpointError, ShardError],
)
def test_user_errors_share_one_base_and_keep_their_builtin_one(error):
    assert issubclass(error, StreamfitError)
    assert issubclass(error, (ValueError, LookupError, RuntimeError))


def test_the_cli_prints_a_user_error_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAMFIT_HOME", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["up", "--port", str(port), "--duration", "1"]) == 1
    err = capsys.readouterr().err
    assert f"streamfit up: serving port 127.0.0.1:{port} is in use" in err and "Traceback" not in err


def test_a_bug_is_not_reported_as_a_user_error(monkeypatch):
    def broken(_args):
        raise ValueError("a bug, not the user's doing")

    parser = cli.build_parser()
    args = parser.parse_args(["topics"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, broken))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["topics"])


class _Fixed:
    """A parser whose parse_args returns ``args`` with ``func`` replaced."""

    def __init__(self, parser, args, func):
        self.parser, self.args = parser, args
        self.args.func = func

    def parse_args(self, _argv):
        return self.args
