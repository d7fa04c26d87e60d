"""Paths and small helpers the test modules share (imported as ``tests.helpers``; fixtures live in conftest)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STREAMFIT = [sys.executable, "-m", "pipeline.cli"]


def uncommit(checkpoint: Path, batch_id: int) -> None:
    """The state a crash leaves after micro-batch ``batch_id`` wrote its output but before Spark
    committed it: no entry in the commit log, so a query restarted from ``checkpoint`` replays it."""
    (checkpoint / "commits" / str(batch_id)).unlink()
    (checkpoint / "commits" / f".{batch_id}.crc").unlink(missing_ok=True)


def scrape(port: int) -> dict[str, float]:
    """``http://127.0.0.1:PORT/metrics`` over HTTP: every sample's value by its name, with its labels
    (sorted) the way Prometheus writes them: ``streamfit_ps_refused_frames_total{reason="auth"}``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=15).text
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    return {sample.name + _labels(sample.labels): sample.value for sample in samples}


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""


def start_with_metrics(argv: list[str], env: dict[str, str], stream: str, **popen) -> tuple[subprocess.Popen, str, int]:
    """Start ``argv`` (``popen``: more of ``Popen``'s arguments), reading its ``stream`` (``stdout`` or
    ``stderr``) on a thread, until it prints ``metrics on [HOST]:PORT/metrics``: the process, that
    line and PORT."""
    from tests.waiting import wait_until

    process = subprocess.Popen(argv, env=env, text=True, **{stream: subprocess.PIPE, **popen})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(getattr(process, stream)), daemon=True).start()
    line = wait_until(lambda: next((line for line in lines if "metrics on " in line), None), 60)
    return process, line, int(line.split("metrics on ")[1].split("/")[0].rsplit(":", 1)[1])
