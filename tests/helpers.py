"""Paths and small helpers the test modules share (imported as ``tests.helpers``; fixtures live in conftest)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STREAMFIT = [sys.executable, "-m", "pipeline.cli"]


def uncommit(checkpoint: Path, batch_id: int) -> None:
    """The state a crash leaves after micro-batch ``batch_id`` wrote its output but before Spark
    committed it: no entry in the commit log, so a query restarted from ``checkpoint`` replays it."""
    (checkpoint / "commits" / str(batch_id)).unlink()
    (checkpoint / "commits" / f".{batch_id}.crc").unlink(missing_ok=True)
