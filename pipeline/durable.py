"""Durable local writes: data on disk before a rename makes it visible, and the rename itself synced.

Shared by the registry and the parameter-server checkpoints, so a crash leaves either
the old file or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the file is not yet visible under a final name)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_atomically(target: Path, data: bytes) -> None:
    """Write to a temp file beside ``target`` (``.tmp-<name>.*``), fsync it, rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".tmp-{target.name}.")
    os.close(fd)
    try:
        write_synced(Path(tmp), data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(directory: Path) -> None:
    """Make renames and new entries in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
