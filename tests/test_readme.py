"""The README's commands are real: every ``.venv/bin/streamfit ...`` line parses with the real CLI."""

from __future__ import annotations

import re
import shlex

import pytest

from pipeline.cli import build_parser
from tests.conftest import ROOT

COMMAND = re.compile(r"^((?:STREAMFIT_[A-Z_]+=\S+ )*)\.venv/bin/streamfit (.*)$")


def readme_commands() -> list[str]:
    lines = []
    for line in (ROOT / "README.md").read_text().splitlines():
        match = COMMAND.match(line.strip())
        if match:
            lines.append(match.group(2).split(" #")[0].rstrip(" &"))
    return lines


def test_the_readme_shows_the_commands():
    assert len(readme_commands()) >= 25


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_parses(command):
    parser = build_parser()
    try:
        parser.parse_args(shlex.split(command))
    except SystemExit as exc:
        pytest.fail(f"`streamfit {command}` from the README does not parse (exit {exc.code})")
