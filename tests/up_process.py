"""``streamfit up`` in a subprocess, for the tests that run the whole pipeline as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.broker import free_port


def processes_of(home: Path) -> list[int]:
    """PIDs of live processes whose environment has ``STREAMFIT_HOME=home`` (what a run started)."""
    marker = f"STREAMFIT_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                pass
    return found


class UpProcess:
    """``streamfit up --duration S`` with its own ``STREAMFIT_HOME`` and free ports; every line of its
    output is kept in :attr:`output`, and :attr:`ready` is set at the ``serving ...`` line (or when the
    output ends, so nobody waits for a run that is over)."""

    def __init__(
        self,
        home: Path,
        duration_s: float,
        *,
        rate: float = 400,
        model: str = "small",
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ):
        self.home = home
        self.serve_port, self.ps_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFIT_")}
        environment.update({"STREAMFIT_HOME": str(home), **(env or {})})
        command = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "up",
            "--duration",
            str(duration_s),
            "--rate",
            str(rate),
            "--model",
            model,
            "--port",
            str(self.serve_port),
            "--ps-port",
            str(self.ps_port),
            *args,
        ]
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            if line.startswith("serving "):
                self.ready.set()
        self.ready.set()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self._reader.join(timeout=10)

    def kill(self) -> None:
        """SIGKILL ``up`` and whatever of the run is still alive."""
        if self.process.poll() is None:
            self.process.kill()
        for pid in processes_of(self.home):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
