"""``streamfit up`` killed with SIGKILL runs no cleanup, yet every process it started dies with it:
the broker, parameter server, serving and producer by the kernel's parent-death signal, the Spark
JVM (and its Python workers) by pyspark's watchdog on the JVM's stdin pipe."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.up_process import UpProcess, processes_of
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def _descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid -> command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = _command(pid)
                todo.append(pid)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    """Running, not a zombie (a dead child nobody reaped yet has released everything)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_sigkilled_up_takes_every_process_it_started_with_it(tmp_path):
    run = UpProcess(tmp_path / "home", 900, rate=200, args=("--drift-at", "0"))
    try:
        assert run.ready.wait(400) and run.process.poll() is None, "\n".join(run.output)
        time.sleep(5)  # the first micro-batches start Spark's Python workers
        started = _descendants(run.process.pid)
        commands = " ".join(started.values())
        for part in ("noida-db", "pipeline.cli ps", "pipeline.cli serve", "pipeline.cli produce", "java"):
            assert part in commands, (part, started)
        run.process.kill()
        run.process.wait(30)

        def left() -> dict[int, str]:
            return {pid: cmd for pid, cmd in started.items() if _alive(pid)}

        wait_until(
            lambda: not left(),
            60,
            interval_s=0.5,
            message=lambda: f"still running 60 s after up was SIGKILLed: {left()}",
        )
        assert not [pid for pid in processes_of(run.home) if _alive(pid)]
    finally:
        run.kill()
        run.wait(30)
