"""`make check` (run first by `make test`) fails on a lint error, and the tree as committed passes it."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.helpers import ROOT

CLEAN_MODULE = ROOT / "pipeline" / "policies" / "drift_boost.py"


def ruff(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--config", str(ROOT / "pyproject.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_reports_an_unused_import(tmp_path):
    module = tmp_path / CLEAN_MODULE.name
    shutil.copy(CLEAN_MODULE, module)
    assert ruff("check", "--no-cache", str(module), cwd=tmp_path).returncode == 0
    module.write_text(
        CLEAN_MODULE.read_text().replace("from dataclasses import", "import os\nfrom dataclasses import", 1)
    )
    done = ruff("check", "--no-cache", str(module), cwd=tmp_path)
    assert done.returncode != 0 and "F401" in done.stdout, done.stdout + done.stderr


def test_the_tree_passes_ruff():
    done = ruff("check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr
    done = ruff("format", "--check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr
