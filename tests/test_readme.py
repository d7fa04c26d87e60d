"""The README's commands are real: every ``.venv/bin/streamfit ...`` line parses with the real CLI."""

from __future__ import annotations

import re
import shlex

import pytest

from pipeline.cli import build_parser
from tests.helpers import ROOT

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


def test_the_module_table_matches_the_tree():
    """The architecture section's table names every module, and only modules that exist."""
    listed = set(re.findall(r"^\| `([\w/<>]+\.py)` \|", (ROOT / "README.md").read_text(), re.MULTILINE))
    tree = {
        str(path.relative_to(ROOT))
        for package in ("pipeline", "consumers", "producers", "serving", "deploy", "console")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }
    tree = {"pipeline/cli/<command>.py" if name.startswith("pipeline/cli/") else name for name in tree}
    assert listed == tree, {"not in the table": sorted(tree - listed), "not in the tree": sorted(listed - tree)}


def test_the_training_metrics_table_names_every_field_of_the_record():
    from consumers.training import TrainingMetrics

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| field | meaning |") :].split("\n\n", 1)[0]
    documented = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert documented == set(TrainingMetrics.__annotations__)
