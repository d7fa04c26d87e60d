"""A Spark standalone cluster on this machine: one master and N workers, each its own JVM.

Started from the installed pyspark's jars with Spark's own launcher classes
(``org.apache.spark.deploy.master.Master`` and ``...worker.Worker``; nothing is downloaded), the way
docker-compose starts them with ``spark-class``. Executors are separate JVMs the workers start, with
their own Python workers, in the workers' work directories: what a ``--master spark://...`` run
needs to show that nothing assumes one process, one working directory or one temp directory. The
cluster test and ``bench.inference``/``bench.training --cluster`` use it; by hand::

    python -m pipeline.spark.standalone --workers 2      # prints the master URL; Ctrl-C stops it

Every daemon gets its own process group and dies with the process that started it
(:mod:`pipeline.lifetime`); :meth:`StandaloneCluster.stop` ends each group (the worker, its
executors and their Python workers) by its PID.

>>> daemon_command("Worker", ["spark://127.0.0.1:7077"], heap="128m")[-2:]
['org.apache.spark.deploy.worker.Worker', 'spark://127.0.0.1:7077']
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from pipeline.broker import free_port
from pipeline.errors import StreamfitError
from pipeline.lifetime import die_with_parent

DAEMON_JVM = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xss512k"]
"""Master and workers only schedule and supervise: small heaps, the serial collector, C1 only."""


class ClusterError(StreamfitError, RuntimeError):
    """The standalone cluster did not come up; the message names the daemon and the end of its log."""


def spark_home() -> Path:
    """The installed pyspark's Spark home (its ``jars`` directory holds every Spark jar)."""
    import pyspark

    return Path(pyspark.__file__).parent


def scala_version() -> str:
    """The Scala version pyspark's Spark is built for (from ``spark-core_<version>-*.jar``): a worker's
    launcher needs it to build an executor's classpath (``bin/load-spark-env.sh`` sets it for ``spark-class``)."""
    jars = sorted((spark_home() / "jars").glob("spark-core_*.jar"))
    if not jars:
        raise ClusterError(f"no spark-core jar in {spark_home() / 'jars'}: is pyspark installed whole?")
    return jars[0].name.removeprefix("spark-core_").split("-", 1)[0]


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    return os.path.join(java_home, "bin", "java") if java_home else shutil.which("java") or "java"


def daemon_command(role: str, args: list[str], heap: str = "256m") -> list[str]:
    """The ``java`` command line of a standalone ``Master`` or ``Worker`` with ``args``."""
    package = {"Master": "master", "Worker": "worker"}[role]
    classpath = str(spark_home() / "jars" / "*")
    return [_java(), f"-Xmx{heap}", *DAEMON_JVM, "-cp", classpath, f"org.apache.spark.deploy.{package}.{role}", *args]


class StandaloneCluster:
    """A master and ``workers`` workers of ``cores`` cores and ``memory`` each, on ``host`` (master
    ``port`` and ``ui_port``: free ones by default).

    ``url`` is the master (``spark://host:port``), ``ui`` its web UI; :attr:`app_conf` is what an
    application sets so its executors fit on these workers (``spark_conf`` in the settings)."""

    def __init__(
        self,
        workers: int = 2,
        cores: int = 1,
        memory: str = "512m",
        host: str = "127.0.0.1",
        daemon_heap: str = "192m",
        directory: Path | None = None,
        port: int = 0,
        ui_port: int = 0,
    ):
        self.n_workers, self.cores, self.memory, self.host, self.daemon_heap = workers, cores, memory, host, daemon_heap
        self._own_directory = directory is None
        self.directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="streamfit-spark-"))
        self.port, self.ui_port = port, ui_port  # 0: a free one
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"spark://{self.host}:{self.port}"

    @property
    def ui(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    @property
    def app_conf(self) -> dict[str, str]:
        """Executors as large as a worker allows (Spark's default of 1 GB would fit on none)."""
        return {"spark.executor.memory": self.memory, "spark.executor.cores": str(self.cores)}

    def _launch(self, name: str, role: str, args: list[str]) -> None:
        log = self.directory / f"{name}.log"
        env = {
            **os.environ,
            "SPARK_HOME": str(spark_home()),
            "SPARK_SCALA_VERSION": scala_version(),
            "SPARK_LOCAL_IP": self.host,
        }
        with log.open("ab") as sink:
            self.processes[name] = subprocess.Popen(
                daemon_command(role, args, self.daemon_heap),
                env=env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )

    def state(self) -> dict:
        """The master's view (its web UI's ``/json/``): ``workers``, ``activeapps``, ``completedapps``, ..."""
        with urllib.request.urlopen(f"{self.ui}/json/", timeout=5) as answer:
            return json.load(answer)

    def alive_workers(self) -> list[dict]:
        try:
            return [w for w in self.state()["workers"] if w["state"] == "ALIVE"]
        except OSError:
            return []

    def start(self, timeout_s: float = 90.0) -> StandaloneCluster:
        """Start the master, then the workers; returns once every worker has registered."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port, self.ui_port = self.port or free_port(self.host), self.ui_port or free_port(self.host)
        try:
            self._launch(
                "master",
                "Master",
                ["--host", self.host, "--port", str(self.port), "--webui-port", str(self.ui_port)],
            )
            for n in range(self.n_workers):
                work = self.directory / f"worker-{n}"
                work.mkdir(exist_ok=True)
                args = [self.url, "--host", self.host, "--cores", str(self.cores), "--memory", self.memory]
                args += ["--work-dir", str(work), "--webui-port", str(free_port(self.host))]
                self._launch(f"worker-{n}", "Worker", args)
            deadline = time.monotonic() + timeout_s
            while len(self.alive_workers()) < self.n_workers:
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise ClusterError(f"Spark {name} exited ({process.returncode}):\n{self.tail(name)}")
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"{len(self.alive_workers())} of {self.n_workers} Spark workers registered with "
                        f"{self.url} within {timeout_s:g} s:\n{self.tail('master')}"
                    )
                time.sleep(0.25)
        except BaseException:
            self.stop()
            raise
        return self

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.directory / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to each daemon's process group (a worker's holds its executors and their Python
        workers), SIGKILL to what is left of it after ``timeout_s``."""
        ordered = [p for name, p in self.processes.items() if name != "master"] + (
            [self.processes["master"]] if "master" in self.processes else []
        )
        for process in ordered:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in ordered:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the group: executors and Python workers too
            process.wait(10)
        self.processes.clear()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.spark.standalone", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="512m", help="memory per worker (and per executor)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7077, help="the master's port (0: a free one)")
    parser.add_argument("--ui-port", type=int, default=8080, help="the master's web UI (0: a free one)")
    args = parser.parse_args(argv)
    cluster = StandaloneCluster(args.workers, args.cores, args.memory, args.host, port=args.port, ui_port=args.ui_port)
    with cluster:
        conf = json.dumps(cluster.app_conf)
        print(
            f"Spark master {cluster.url} (UI {cluster.ui}), {args.workers} worker(s) of {args.cores} core(s) and "
            f"{args.memory}; logs in {cluster.directory}\n"
            f"  STREAMFIT_SPARK_CONF='{conf}' streamfit predict --master {cluster.url}\nCtrl-C stops it",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the cluster stops
            while all(p.poll() is None for p in cluster.processes.values()):
                time.sleep(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
