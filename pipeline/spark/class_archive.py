"""The Spark driver JVM's classes, archived once per machine so that later starts map them instead.

Before a Spark session exists its JVM loads and verifies some ten thousand classes of Spark, Hadoop
and Scala: seconds of every cold ``streamfit up`` on two cores. Java's application class-data
sharing maps them from an archive instead (measured here: session start 6.5-6.9 s -> 3.4-4.5 s, the
first job 3.1 s -> 1.8 s). ``streamfit up`` writes the archive the first time it runs on a machine,
as its JVM exits (``-XX:ArchiveClassesAtExit``, a few seconds more on that stop); every later local
session maps it (``-XX:SharedArchiveFile``).

An archive only fits the Java build and the Spark jars it was made from, so its name is a digest of
both. A JVM handed a truncated archive crashes instead of starting without it, so the archive is
written under a temporary name, moved into place only after its JVM exited cleanly, and used only
while its size matches the one recorded beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

QUIET = "-Xlog:cds*=off"
"""The JVM's class-sharing warnings (classes it cannot archive, an archive it cannot map) would go to
the terminal of ``streamfit up``; a session works the same without the archive."""


def cache_dir() -> Path:
    """Per-machine cache (``$XDG_CACHE_HOME/streamfit``, default ``~/.cache/streamfit``), not a run's home:
    every home on the machine starts the same JVM."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamfit"


def archive_path(java: str, java_version: str) -> Path:
    """The archive for one ``java`` binary (``java_version``: its ``-version`` text) and this pyspark."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    digest = hashlib.sha256(f"{java}\n{java_version}\n{pyspark.__version__}\n{jars}".encode()).hexdigest()[:16]
    return cache_dir() / f"spark-driver-{digest}.jsa"


def _size_file(archive: Path) -> Path:
    return archive.with_suffix(".json")


def ready(archive: Path) -> bool:
    """The archive is in place and whole (its size is the one recorded when it was moved there)."""
    try:
        return json.loads(_size_file(archive).read_text())["size"] == archive.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return False


_writing: tuple[Path, Path] | None = None
"""(temporary, final) archive this process's JVM writes as it exits: one JVM per process."""


def jvm_options(archive: Path, *, write: bool) -> list[str]:
    """Map ``archive`` when it is ready; else, with ``write``, have the JVM write it as it exits."""
    global _writing
    if ready(archive):
        return [f"-XX:SharedArchiveFile={archive}", QUIET]
    if not write:
        return []
    archive.parent.mkdir(parents=True, exist_ok=True)
    for stale in archive.parent.glob(f".{archive.name}.*.tmp"):  # left by a JVM killed while writing
        if not Path("/proc", stale.suffixes[-2].lstrip(".")).exists():
            stale.unlink(missing_ok=True)
    _writing = (archive.with_name(f".{archive.name}.{os.getpid()}.tmp"), archive)
    return [f"-XX:ArchiveClassesAtExit={_writing[0]}", QUIET]


def save(timeout_s: float = 120.0) -> bool:
    """After the session stopped: end the driver JVM, wait while it writes the archive and move the
    archive into place. True when a new archive is in place; nothing to do unless :func:`jvm_options`
    asked this process's JVM to write one."""
    global _writing
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    process = getattr(gateway, "proc", None)
    if _writing is None or process is None or process.stdin is None:
        return False
    (written, archive), _writing = _writing, None
    gateway.shutdown()
    process.stdin.close()  # pyspark's gateway exits when its stdin closes
    SparkContext._gateway = SparkContext._jvm = None
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("the Spark JVM did not exit within %g s: no class archive written", timeout_s)
        process.kill()
        process.wait()
    if process.returncode != 0 or not written.is_file():
        written.unlink(missing_ok=True)
        return False
    size = written.stat().st_size
    written.replace(archive)
    _size_file(archive).write_text(json.dumps({"size": size}))
    log.info("Spark's classes archived in %s (%.0f MB): later sessions start faster", archive, size / 1e6)
    return True
