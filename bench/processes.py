"""The processes of one ``streamfit up`` run, seen from outside: which part each is, its memory, CPU and
descriptors, and how far each query is behind the events.

A run's processes are those whose environment carries its ``STREAMFIT_HOME``; a role sums its
processes (the Spark Python workers are many). CPU seconds include reaped children's (a Spark
worker that exits hands its time to the daemon that forked it), so a role's CPU never goes back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.up_process import processes_of

ROLES = ("up", "broker", "ps", "serve", "spark_jvm", "spark_python_workers", "producer")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def role_of(pid: int, up_pid: int) -> str:
    """Which part of the run process ``pid`` is, from its command line."""
    if pid == up_pid:
        return "up"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [a.decode(errors="replace") for a in argv if a]
    line = " ".join(words)
    if words and os.path.basename(words[0]) in ("noida-db", "tansu"):
        return "broker"
    if words and os.path.basename(words[0]) == "java":
        return "spark_jvm"
    if "pyspark" in line:
        return "spark_python_workers"
    if "pipeline.cli" in words:
        command = words[words.index("pipeline.cli") + 1] if words.index("pipeline.cli") + 1 < len(words) else ""
        return {"ps": "ps", "serve": "serve", "produce": "producer", "broker": "broker"}.get(command, f"cli {command}")
    return "other: " + (os.path.basename(words[0]) if words else "?")


def _rss_bytes(pid: int) -> tuple[int, int] | None:
    """Resident bytes and the anonymous part of them (the rest is mapped files and shared memory)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
    except OSError:
        return None
    kib = [int(fields.get(name, "0 kB").split()[0]) * 1024 for name in ("VmRSS", "RssAnon")]  # a zombie has neither
    return kib[0], kib[1]


def _cpu_seconds(pid: int) -> float | None:
    """User + system time of ``pid`` and of its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS  # utime stime cutime cstime


def _open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def snapshot(home: Path, up_pid: int) -> dict[str, dict]:
    """Per role, summed over its processes: RSS (MB, its anonymous part apart), CPU seconds, open
    descriptors, and how many processes."""
    roles: dict[str, dict] = {}
    for pid in sorted(set(processes_of(home)) | {up_pid}):
        role = role_of(pid, up_pid)
        rss, fds, cpu = _rss_bytes(pid), _open_fds(pid), _cpu_seconds(pid)
        if role == "gone" or rss is None or fds is None or cpu is None:
            continue
        entry = roles.setdefault(role, {"processes": 0, "rss_mb": 0.0, "rss_anon_mb": 0.0, "cpu_s": 0.0, "fds": 0})
        entry["processes"] += 1
        entry["rss_mb"] += rss[0] / 2**20
        entry["rss_anon_mb"] += rss[1] / 2**20
        entry["cpu_s"] += cpu
        entry["fds"] += fds
    for entry in roles.values():
        for key in ("rss_mb", "rss_anon_mb", "cpu_s"):
            entry[key] = round(entry[key], 1)
    return dict(sorted(roles.items(), key=lambda kv: (kv[0] not in ROLES, ROLES.index(kv[0]) if kv[0] in ROLES else 0)))


def committed_events(checkpoint: Path, topic: str = "events") -> int | None:
    """Events a query has processed: the ``topic`` offsets of its last committed micro-batch."""
    try:
        batches = [int(p.name) for p in (checkpoint / "commits").iterdir() if p.name.isdigit()]
    except OSError:
        return None
    if not batches:
        return 0
    try:
        lines = (checkpoint / "offsets" / str(max(batches))).read_text().splitlines()
    except OSError:
        return None
    for line in lines[1:]:
        try:
            offsets = json.loads(line)
        except ValueError:
            continue
        if isinstance(offsets, dict) and topic in offsets:
            return sum(int(v) for v in offsets[topic].values())
    return None


class EventCount:
    """Events produced so far: the sum of the ``events`` topic's end offsets."""

    def __init__(self, home: Path):
        self.home, self.reader = home, None

    def __call__(self) -> int | None:
        from pipeline.spark.offsets import KafkaOffsetReader

        try:
            if self.reader is None:
                bootstrap = json.loads((self.home / "broker.json").read_text())["bootstrap"]
                self.reader = KafkaOffsetReader(bootstrap, ["events"], timeout_s=5.0)
            return sum(sum(parts.values()) for parts in self.reader.latest().values())
        except Exception:  # noqa: BLE001 - Kafka briefly unavailable, broker.json not written yet: this sample is skipped
            return None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.consumer.close()
