"""``streamfit up``: the whole pipeline on one machine, started and stopped in order.

Up: the broker (embedded unless ``STREAMFIT_KAFKA_BOOTSTRAP`` is set) with its topics; the model
in the registry (created from the built-in spec of the same name when missing); the parameter
server, the serving app and the producer as child processes (they start in parallel, events wait
in Kafka); one Spark driver, in this process, running the inference query and, once its first
micro-batch is done, the training query (its start-up would otherwise delay the first predictions).
Down is the reverse, each part finishing its work: the producer waits for its acknowledgements, the queries
end their micro-batch and commit their checkpoints, the parameter server writes its checkpoint
and publishes its last candidate (announced while Kafka is still up), serving drains, and the
broker stops. Everything a run keeps (broker data, checkpoints, registry) lives under
``STREAMFIT_HOME``, so the next ``streamfit up`` resumes where this one stopped.

Children run in their own sessions, so a terminal's Ctrl-C reaches only this process, which
then stops them in order; their output goes to ``<home>/logs/<name>.log``. Should this process
die without stopping them (SIGKILL, a crash), every child dies with it: the parameter server,
serving, the producer and the broker get SIGTERM from the kernel (:mod:`pipeline.lifetime`),
and the Spark JVM exits when its stdin pipe from this process closes (pyspark's own watchdog),
taking its Python workers with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from pipeline.broker import kafka_cluster, port_is_free
from pipeline.errors import StreamfitError
from pipeline.kafka_properties import KafkaProperties
from pipeline.lifetime import die_with_parent
from pipeline.settings import KAFKA_ENV, Settings
from pipeline.spec import BUILTIN_SPECS
from producers.synthetic import GENERATORS, n_features, synthetic_rows

log = logging.getLogger(__name__)


class UpError(StreamfitError, RuntimeError):
    """The pipeline cannot start or a part of it failed; the message says which and where its log is."""


class StoppedDuringStart(Exception):
    """Ctrl-C (or SIGTERM) came before every part was up: what started is stopped in order."""


@dataclass(frozen=True)
class Traffic:
    """What the producer streams: a synthetic source with drift, partial labels and some broken events."""

    source: str | None = None
    """A producer source; None picks the synthetic stream that fits the model's features."""
    rate: float = 500.0
    label_fraction: float = 0.5
    invalid_fraction: float = 0.01
    drift_at: int | None = 60_000


class Child:
    """A ``streamfit`` command in its own session, dying with this process, its output in ``<logs>/<name>.log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Ask it to stop with ``sig``; killed if it has not stopped within ``timeout_s``."""
        if self.alive:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %g s: killed", self.name, timeout_s)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def child_env(settings: Settings, bootstrap: str) -> dict[str, str]:
    """This process's environment plus every resolved setting as ``STREAMFIT_*``: children see the same settings."""
    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, KafkaProperties):
            env.update(value.environment(KAFKA_ENV))
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        env[f"STREAMFIT_{name.upper()}"] = str(value)
    env["STREAMFIT_KAFKA_BOOTSTRAP"] = bootstrap
    return env


def ensure_model(settings: Settings, source: str | None) -> tuple[str, str]:
    """Create ``settings.model`` from its built-in spec when missing; check the source fits its features
    (None: pick a synthetic one that does). Returns what to tell the user and the source."""
    from pipeline.model_updates import announcing_registry
    from pipeline.registry import RegistryError

    registry, announcer = announcing_registry(settings)
    try:
        try:
            spec = registry.spec(settings.model)
            made = ""
        except RegistryError:
            if settings.model not in BUILTIN_SPECS:
                raise UpError(
                    f"model {settings.model!r} is not in {settings.registry_url} and is no built-in spec "
                    f"({', '.join(sorted(BUILTIN_SPECS))}): create it with `streamfit models create`"
                ) from None
            from pipeline.bundle import ModelBundle

            spec = BUILTIN_SPECS[settings.model]
            registry.create_model(spec)
            version = registry.register(
                spec.name, ModelBundle(spec, seed=settings.seed).get_weights(), algorithm="init"
            )
            registry.set_alias(spec.name, "champion", version)
            made = f" (created: version {version} is champion)"
    finally:
        announcer.close()
    fitting = [f"synth:{name}" for name in GENERATORS if n_features(name) == spec.n_features]
    if source is None:
        if not fitting:
            raise UpError(
                f"no synthetic source has the {spec.n_features} features of model {settings.model!r}: "
                "pass --source with a CSV or Parquet file of its features"
            )
        named = f"synth:{settings.model}"  # a stream made for the model (stagger's codes), else the first that fits
        source = named if named in fitting else fitting[0]
    elif source.startswith("synth:") and source not in fitting:
        raise UpError(
            f"{source} has {n_features(source.removeprefix('synth:'))} features but model {settings.model!r} "
            f"takes {spec.n_features}: pick a source that fits ({', '.join(fitting) or 'a file of its features'})"
        )
    return f"model {settings.model} ({spec.n_features} features){made}", source


def curl_line(settings: Settings, source: str) -> str:
    """A curl command that asks the served model about one real row of the source."""
    features = next(synthetic_rows(source.removeprefix("synth:")))[0] if source.startswith("synth:") else None
    if features is None:
        features = [0.0] * BUILTIN_SPECS.get(settings.model, BUILTIN_SPECS["higgs"]).n_features
    body = json.dumps({"instances": [[round(float(v), 4) for v in features]]})
    return (
        f"curl -s -H 'Content-Type: application/json' "
        f"http://{settings.serve_host}:{settings.serve_port}/v1/models/{settings.model}:predict -d '{body}'"
    )


class Pipeline:
    """Runs every part of streamfit until ``stop`` is set, ``duration_s`` passes or a part fails."""

    def __init__(self, settings: Settings, traffic: Traffic, *, say: Callable[[str], None] = print):
        self.settings, self.traffic, self.say = settings, traffic, say
        self.logs = settings.home / "logs"
        self.children: list[Child] = []
        self.env: dict[str, str] = {}

    def run(self, stop: threading.Event, duration_s: float | None, show) -> int:
        """``show(board, deadline, stop)`` displays the status until the run ends; returns an exit status."""
        s = self.settings
        for what, host, port in (("parameter server", s.ps_host, s.ps_port), ("serving", s.serve_host, s.serve_port)):
            if not port_is_free(host, port):
                raise UpError(
                    f"{what} port {host}:{port} is in use (another `streamfit up`?): stop it or pass another port"
                )
        self.logs.mkdir(parents=True, exist_ok=True)
        from pipeline.spark.session import spark_in_background

        with spark_in_background(s, "streamfit-up") as spark, kafka_cluster(s) as bootstrap:
            self.say(f"Kafka at {bootstrap}; logs in {self.logs}")
            said, source = ensure_model(s, self.traffic.source)
            self.say(said)
            self.traffic = dataclasses.replace(self.traffic, source=source)
            self.env = child_env(s, bootstrap)
            try:
                return self._run(bootstrap, spark, stop, duration_s, show)
            except StoppedDuringStart:
                return 130
            finally:
                self._stop_children()

    def _run(self, bootstrap: str, spark_session: Callable, stop: threading.Event, duration_s, show) -> int:
        from consumers.inference import InferenceJob
        from consumers.training import TrainingJob
        from pipeline.model_updates import announcing_registry
        from pipeline.spark.session import stop_between_batches
        from pipeline.spark.supervisor import QuerySupervisor
        from pipeline.status import StatusBoard

        s, t = self.settings, self.traffic
        ps = self._start("ps", ["ps", "--model", s.model, "--algorithm", s.algorithm])
        serve = self._start("serve", ["serve", "--model", s.model])
        producer = [
            "produce",
            "--source",
            t.source,
            "--rate",
            str(t.rate),
            "--limit",
            "0",
            "--no-progress",
            "--label-fraction",
            str(t.label_fraction),
            "--invalid-fraction",
            str(t.invalid_fraction),
            "--seed",
            str(s.seed),
        ] + (["--drift-at", str(t.drift_at)] if t.drift_at else [])
        self._start("produce", producer)  # events wait in Kafka while Spark starts: the first micro-batch predicts them
        self.say(
            f"producing {t.source} at {t.rate:g} events/s ({t.label_fraction:.0%} labelled, "
            f"{t.invalid_fraction:.0%} broken" + (f", drift after {t.drift_at:,} events)" if t.drift_at else ")")
        )
        with contextlib.ExitStack() as down:  # unwound in reverse order, every step even if an earlier one fails
            registry, announcer = announcing_registry(s)
            down.callback(announcer.close)
            spark = spark_session()  # started in the background with the broker
            down.callback(spark.stop)  # before the broker stops (stopping it again at the end does nothing)
            inference = InferenceJob(spark, s, bootstrap)
            queries = []  # each restarted from its checkpoint when it fails (broker or parameter server down)

            def run_query(pool: str, start: Callable, restart: Callable, checkpoint: str) -> None:
                queries.append(
                    QuerySupervisor(
                        _in_pool(spark, pool, start, checkpoint),
                        functools.partial(_in_pool, spark, pool, restart, checkpoint),
                    )
                )
                down.callback(lambda supervisor=queries[-1]: stop_between_batches(supervisor.query))

            # predictions first: training (the parameter server, its workers' warm-up, its first
            # micro-batch) joins once they flow
            run_query("predict", inference.start, inference.start, s.predict_checkpoint_dir)
            self._wait(
                ps,
                lambda: _listening(s.ps_host, s.ps_port),
                f"did not listen on {s.ps_host}:{s.ps_port}",
                stop,
                timeout_s=120,
            )
            self.say(f"parameter server ({s.algorithm}) on {s.ps_host}:{s.ps_port}")
            training = TrainingJob(spark, s, bootstrap, registry)
            down.callback(training.close)
            self._serve_metrics(down, inference.reporter.metrics.registry, training.gauges.registry)
            _wait_for_first_batch(queries[0].query, stop, timeout_s=60)
            run_query("train", training.start, training.start_query, s.train_checkpoint_dir)
            self.say(
                f"Spark {s.spark_master}: inference and training queries on {s.topic_events} "
                f"(auto-promote {'on' if s.auto_promote else 'off'})"
            )
            ui = spark.sparkContext.uiWebUrl
            self.say(f"Spark UI {ui}" if ui else "Spark UI off (STREAMFIT_SPARK_UI=true turns it on)")
            down.callback(self._stop_child, "produce", signal.SIGINT)
            down.callback(self.say, "stopping in order: producer, queries, parameter server, serving, broker")
            url = f"http://{s.serve_host}:{s.serve_port}"
            self._wait(serve, lambda: _ready(url), "was not ready", stop, timeout_s=180)
            self.say(f"serving {s.model} on {url} (docs {url}/docs); try:\n  {curl_line(s, t.source)}")
            lags = {"predict": inference.reporter.metrics.lag, "train": training.gauges.lag}
            self._console(down, bootstrap, lags)
            board = StatusBoard(s, bootstrap, url, lambda: tuple(training.history), lags)
            down.callback(board.close)
            deadline = time.monotonic() + duration_s if duration_s else None
            show(board, deadline, stop, lambda: self._failure(queries))
            failure = self._failure(queries)
        if failure:
            raise UpError(failure)
        return 0

    def _serve_metrics(self, down: contextlib.ExitStack, predict, train) -> None:
        """Serve the queries' metrics registries where their ports are set, and say where every part's are
        (ps and the producer, children, serve their own from the same settings)."""
        from pipeline.metrics import serve

        s = self.settings
        served = {"serve": s.serve_port, "ps": s.ps_metrics_port, "produce": s.produce_metrics_port}
        for part, port, registry in (
            ("predict", s.predict_metrics_port, predict),
            ("train", s.train_metrics_port, train),
        ):
            if port is not None:
                exporter = serve(registry, port)
                down.callback(exporter.shutdown)
                served[part] = exporter.server_port
        self.say(
            "Prometheus metrics at /metrics: " + ", ".join(f"{p} :{n}" for p, n in served.items() if n is not None)
        )

    def _console(self, down: contextlib.ExitStack, bootstrap: str, lags) -> None:
        """The web console, served from this process: the queries' lag is known here only."""
        from console.app import ConsoleServer, create_app, listening_socket

        s = self.settings
        app = create_app(s, lambda: bootstrap, lags)
        console = ConsoleServer(app, listening_socket(s.console_host, s.console_port)).start()
        down.callback(console.stop)
        self.say(f"console on {console.url}")

    def _start(self, name: str, args: list[str]) -> Child:
        child = Child(name, args, self.env, self.logs)
        self.children.append(child)
        return child

    def _failure(self, queries) -> str | None:
        """Why the run cannot go on (a child exited, a query stopped), or None; a failed query is restarted."""
        for child in self.children:
            if not child.alive:
                return (
                    f"{child.name} exited with status {child.process.returncode}; "
                    f"the end of {child.log}:\n{child.tail()}"
                )
        for supervisor in queries:
            if not supervisor.poll():
                return f"Spark query {supervisor.name} stopped"
        return None

    @staticmethod
    def _wait(child: Child, ready: Callable[[], bool], what: str, stop: threading.Event, timeout_s: float) -> None:
        """Poll ``ready()`` until true; raise if ``child`` exits, we are asked to stop, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive:
                raise UpError(f"{child.name} exited at start; the end of {child.log}:\n{child.tail()}")
            if stop.is_set():
                raise StoppedDuringStart
            if ready():
                return
            time.sleep(0.2)
        raise UpError(f"{child.name} {what} within {timeout_s:g} s; see {child.log}")

    def _stop_child(self, name: str, sig: int = signal.SIGTERM) -> None:
        for child in self.children:
            if child.name == name:
                child.stop(sig)

    def _stop_children(self) -> None:
        """Producer first (SIGINT: it waits for its acknowledgements), then the parameter server, then serving."""
        for name, sig in (("produce", signal.SIGINT), ("ps", signal.SIGTERM), ("serve", signal.SIGTERM)):
            self._stop_child(name, sig)


def _wait_for_first_batch(query, stop: threading.Event, timeout_s: float) -> None:
    """Until ``query`` completed a micro-batch (or failed, or ``timeout_s`` passed): what starts next
    then does not compete with its start-up for the two cores."""
    deadline = time.monotonic() + timeout_s
    while query.isActive and query.lastProgress is None and time.monotonic() < deadline:
        if stop.is_set():
            raise StoppedDuringStart
        time.sleep(0.1)


def _in_pool(spark, pool: str, start: Callable, *args):
    """``start(*args)`` with its query's jobs in the scheduler pool ``pool`` (a restart keeps the query's pool)."""
    from pipeline.spark.session import scheduler_pool

    with scheduler_pool(spark, pool):
        return start(*args)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
