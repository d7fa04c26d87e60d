"""The docker-compose deployment checked against the code, without Docker: ``python -m deploy.check``.

No Docker engine is needed, so this proves what the files can prove: every ``streamfit`` command
in docker-compose.yml parses with the real CLI parser, every ``STREAMFIT_*`` variable is a real
setting and each service's settings validate, ports and hosts agree between services, Spark runs
as a standalone cluster the consumers submit to, volumes are declared and shared where state is,
Prometheus scrapes exactly the components that serve ``/metrics``, the Grafana dashboard only
queries series the code really exports, and the Dockerfile adds the Spark Kafka connector of the
pinned pyspark (with deploy/fetch_kafka_connector.py). Each ``check_*`` function takes the parsed
files and returns the problems it found (empty: all good), so tests/test_compose.py can also feed
them broken copies and see them complain.

``python -m deploy.check [--root DIR]`` runs every check on the deployment files under DIR (the
repository by default: docker-compose.yml, Dockerfile, .dockerignore, pyproject.toml and deploy/)
against the streamfit code it imports; it prints a short summary and exits 0 when all pass, or
prints each problem and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from pipeline.cli import build_parser, settings_from
from pipeline.settings import CONFIG_ENV, ENV_PREFIX, KAFKA_ENV, Settings, SettingsError
from pipeline.spec import BUILTIN_SPECS
from producers import synthetic

ROOT = Path(__file__).resolve().parents[1]
# the deployment files, relative to the directory checked (ROOT unless --root says otherwise)
COMPOSE_FILE = Path("docker-compose.yml")
DOCKER_FILE = Path("Dockerfile")
DOCKERIGNORE_FILE = Path(".dockerignore")
PYPROJECT_FILE = Path("pyproject.toml")
PROMETHEUS_FILE = Path("deploy", "prometheus.yml")
GRAFANA_DATASOURCES_FILE = Path("deploy", "grafana", "provisioning", "datasources", "prometheus.yml")
GRAFANA_PROVIDERS_FILE = Path("deploy", "grafana", "provisioning", "dashboards", "streamfit.yml")
DASHBOARD_FILE = Path("deploy", "grafana", "dashboards", "streamfit.json")
CONNECTOR_SCRIPT = "deploy/fetch_kafka_connector.py"  # run by the Dockerfile: adds Spark's Kafka connector
COMPOSE = ROOT / COMPOSE_FILE
DOCKERFILE = ROOT / DOCKER_FILE
PROMETHEUS = ROOT / PROMETHEUS_FILE
GRAFANA_DATASOURCES = ROOT / GRAFANA_DATASOURCES_FILE
GRAFANA_PROVIDERS = ROOT / GRAFANA_PROVIDERS_FILE
DASHBOARD = ROOT / DASHBOARD_FILE

SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash"}
REGISTRY_COMMANDS = {"models", "ps", "train", "predict", "serve", "fit"}


# ------------------------------------------------------------------------------------------------
# reading the files


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's variable interpolation: ``$$`` is a literal ``$``; ``${VAR:-default}`` and
    ``${VAR-default}`` fall back to the default; ``${VAR}``/``$VAR`` read ``env`` (empty here)."""
    env = env or {}
    pattern = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?-)([^}]*))?\}|([A-Za-z_]\w*))")

    def one(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name, kind, default = match.group(2) or match.group(5), match.group(3), match.group(4)
        found = env.get(name)
        if kind == ":-" and not found or kind == "-" and found is None:
            return default
        return found or ""

    if isinstance(value, str):
        return pattern.sub(one, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(path: Path = COMPOSE) -> dict:
    return interpolate(yaml.safe_load(Path(path).read_text()))


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def streamfit_argvs(service: dict) -> list[list[str]]:
    """The argument lists of every ``streamfit`` the service runs: its command, or each
    ``streamfit ...`` inside an ``sh -c`` script (shell redirections dropped)."""
    cmd = command(service)
    if cmd[:1] == ["streamfit"]:
        return [cmd[1:]]
    if len(cmd) >= 3 and cmd[0] in SHELLS and cmd[1] == "-c":
        found = []
        for match in re.finditer(r"(?:^|[\s;&|(`])streamfit\s+([^;&|)`\n]*)", cmd[2]):
            found.append([t for t in shlex.split(match.group(1)) if not re.match(r"^\d*[<>]", t)])
        return found
    return []


def environment(service: dict) -> dict[str, str | None]:
    """The service's environment; ``None`` for a name passed through from the host (unset here)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {pair[0]: pair[1] if len(pair) == 2 else None for pair in pairs}
    return {k: None if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of every volume entry, short or long syntax."""
    found = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            found.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            parts = str(entry).split(":")
            found.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return found


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def volume_for(service: dict, path: str) -> tuple[str, str] | None:
    """The mount (source, target) that holds ``path`` in the container, the deepest one."""
    path = PurePosixPath(path)
    holding = [(s, t) for s, t in mounts(service) if path == PurePosixPath(t) or PurePosixPath(t) in path.parents]
    return max(holding, key=lambda m: len(m[1]), default=None)


def published(service: dict) -> list[tuple[int | None, int]]:
    """(host port, container port) of every published port."""
    found = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            found.append((int(entry["published"]) if entry.get("published") else None, int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        found.append((int(parts[-2]) if len(parts) > 1 and parts[-2] else None, int(parts[-1])))
    return found


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


@contextlib.contextmanager
def only_environment(env: dict[str, str | None]):
    """``os.environ`` with the host's ``STREAMFIT_*`` variables replaced by the service's."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            del os.environ[name]
        os.environ.update({k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and v is not None})
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class Invocation:
    service: str
    argv: list[str]
    args: argparse.Namespace | None = None
    parse_error: str = ""
    settings: Settings | None = None
    settings_error: str = ""

    @property
    def name(self) -> str:
        """``ps``, ``train``, ... and ``models create`` for the models group."""
        if self.args is None:
            return ""
        return self.args.command + (f" {self.args.action}" if getattr(self.args, "action", None) else "")

    def __str__(self) -> str:
        return f"service {self.service!r} (`streamfit {shlex.join(self.argv)}`)"


def invocations(compose: dict) -> list[Invocation]:
    """Every ``streamfit`` run in the compose file, parsed by the real parser, with its settings
    built from the service's environment and the flags the way the command builds them."""
    found = []
    for name, service in (compose.get("services") or {}).items():
        for argv in streamfit_argvs(service):
            inv = Invocation(name, argv)
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                    inv.args = build_parser().parse_args(argv)
            except SystemExit:
                inv.parse_error = (stderr.getvalue().strip().splitlines() or ["argparse refused it"])[-1]
            if inv.args is not None:
                with only_environment(environment(service)):
                    try:
                        inv.settings = settings_from(inv.args)
                    except SettingsError as exc:
                        inv.settings_error = str(exc)
            found.append(inv)
    return found


def by_command(invs: list[Invocation], name: str) -> list[Invocation]:
    return [inv for inv in invs if inv.name == name and inv.settings is not None]


# ------------------------------------------------------------------------------------------------
# what the code exports to Prometheus


def exported_names(registry) -> set[str]:
    """The series names a prometheus-client registry exposes (counters get ``_total``, ...)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "enum": ("",),
    }
    return {metric.name + suffix for metric in registry.collect() for suffix in suffixes.get(metric.type, ("",))}


def component_metrics() -> dict[str, tuple[str, set[str]]]:
    """Per metrics-serving command: the setting holding its port, and the series it exports,
    read from the very registries the components build."""
    from consumers.training import TrainingGauges
    from pipeline.ps.metrics import ServerMetrics
    from pipeline.spark.progress import ProgressMetrics
    from producers.metrics import producer_registry
    from producers.sender import Summary
    from serving.metrics import Metrics

    prefix = re.search(r'ProgressMetrics\(\s*"([\w:]+)"', (ROOT / "consumers" / "inference.py").read_text())
    assert prefix, 'consumers/inference.py no longer builds ProgressMetrics("<prefix>"): update component_metrics'
    return {
        "serve": ("serve_port", exported_names(Metrics().registry)),
        "predict": ("predict_metrics_port", exported_names(ProgressMetrics(prefix.group(1)).registry)),
        "train": ("train_metrics_port", exported_names(TrainingGauges().registry)),
        "ps": ("ps_metrics_port", exported_names(ServerMetrics(lambda: PS_STATS).registry)),
        "produce": ("produce_metrics_port", exported_names(producer_registry(Summary()))),
    }


PS_STATS = {
    "counter": 0,
    "commits": {"applied": 0, "pending": 0, "skipped": 0},
    "bytes_in": 0,
    "bytes_out": 0,
    "connections": 0,
}
"""What a parameter server's ``stats()`` says before its first request (its metrics read it)."""


def metrics_ports(command: str, settings: Settings, metrics: dict[str, tuple[str, set[str]]]) -> list[int]:
    """The ports ``command`` serves ``/metrics`` on with ``settings`` (a parameter-server shard i on +i);
    ``metrics`` is :func:`component_metrics`."""
    port = getattr(settings, metrics[command][0])
    if port is None:
        return []
    return list(range(port, port + settings.ps_shards)) if command == "ps" else [port]


PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == "." or text[match.end() :].lstrip().startswith("("):
            continue
        if match.group(0).lower() not in PROMQL_WORDS:
            names.add(match.group(0))
    return names


# ------------------------------------------------------------------------------------------------
# the checks: each returns a list of problems


def check_commands(compose: dict) -> list[str]:
    problems = []
    invs = invocations(compose)
    for inv in invs:
        if inv.args is None:
            problems.append(f"{inv}: not a valid streamfit command: {inv.parse_error}")
    names = {inv.name for inv in invs}
    for needed in ("topics", "models create", "ps", "train", "predict", "serve", "produce"):
        if needed not in names:
            problems.append(f"no service runs `streamfit {needed}`")
    specs = {inv.args.name: inv.args.spec for inv in invs if inv.name == "models create"}
    for inv in by_command(invs, "produce"):
        source = inv.args.source
        if source.startswith("synth:"):
            generator = source.removeprefix("synth:")
            if generator not in synthetic.GENERATORS:
                problems.append(f"{inv}: unknown synthetic source {generator!r} (have {sorted(synthetic.GENERATORS)})")
                continue
            model = inv.settings.model
            if model not in specs:
                problems.append(f"{inv}: model {model!r} is not created by any `streamfit models create`")
            elif synthetic.n_features(generator) != BUILTIN_SPECS[specs[model]].n_features:
                problems.append(
                    f"{inv}: {source} makes {synthetic.n_features(generator)} features but model {model!r} "
                    f"(spec {specs[model]}) takes {BUILTIN_SPECS[specs[model]].n_features}"
                )
    return problems


def check_environment(compose: dict) -> list[str]:
    """Every STREAMFIT_* name is a setting (as load_settings maps them) and every service's settings validate
    (a ``STREAMFIT_KAFKA__<NAME>`` Kafka client property is checked by that validation: unknown ones fail it)."""
    problems = []
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields} | {CONFIG_ENV}
    for name, service in (compose.get("services") or {}).items():
        for variable in environment(service):
            if variable.startswith(KAFKA_ENV):
                continue
            if variable.upper().startswith(ENV_PREFIX) and variable not in known:
                field = variable[len(ENV_PREFIX) :].lower()
                hint = f" (write it {ENV_PREFIX}{field.upper()})" if field in Settings.model_fields else ""
                problems.append(f"service {name!r}: {variable} is not a streamfit setting{hint}")
    invs = invocations(compose)
    for inv in invs:
        if inv.settings_error:
            problems.append(f"{inv}: its settings do not validate: {inv.settings_error}")
    for inv in invs:
        if inv.settings is None:
            continue
        if not inv.settings.kafka_bootstrap and inv.name not in {"models list", "models show"}:
            problems.append(f"{inv}: STREAMFIT_KAFKA_BOOTSTRAP is not set, so it looks for an embedded broker")
        if inv.name in {"train", "predict"} and inv.settings.kafka_source != "native":
            problems.append(
                f"{inv}: kafka_source is {inv.settings.kafka_source!r}; the image has Spark's Kafka "
                f"connector, set STREAMFIT_KAFKA_SOURCE=native"
            )
    return problems


def check_kafka(compose: dict) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    brokers = {n: s for n, s in services.items() if str(s.get("image", "")).split(":")[0] == "apache/kafka"}
    if len(brokers) != 1:
        return [f"expected one service on the official apache/kafka image, found {sorted(brokers) or 'none'}"]
    ((name, kafka),) = brokers.items()
    env = environment(kafka)
    roles = set((env.get("KAFKA_PROCESS_ROLES") or "").split(","))
    if not {"broker", "controller"} <= roles or any(k.startswith("KAFKA_ZOOKEEPER") for k in env):
        problems.append(
            f"service {name!r}: not a KRaft broker+controller (KAFKA_PROCESS_ROLES={env.get('KAFKA_PROCESS_ROLES')})"
        )
    advertised = {}
    for listener in (env.get("KAFKA_ADVERTISED_LISTENERS") or "").split(","):
        match = re.fullmatch(r"(\w+)://([^:]+):(\d+)", listener.strip())
        if match:
            advertised[f"{match.group(2)}:{match.group(3)}"] = match.group(1)
    if not any(addr.split(":")[0] in {name, kafka.get("hostname")} for addr in advertised):
        problems.append(f"service {name!r}: no advertised listener names the service ({sorted(advertised)})")
    test = " ".join(map(str, (kafka.get("healthcheck") or {}).get("test") or []))
    if "kafka-topics.sh" not in test and "kafka-broker-api-versions.sh" not in test:
        problems.append(f"service {name!r}: no healthcheck asking the broker (kafka-topics.sh --list)")
    log_dirs = env.get("KAFKA_LOG_DIRS")
    held = volume_for(kafka, log_dirs) if log_dirs else None
    if not held or not is_named_volume(held[0]):
        problems.append(f"service {name!r}: KAFKA_LOG_DIRS={log_dirs} is not on a named volume")
    for inv in invocations(compose):
        if inv.settings is None or not inv.settings.kafka_bootstrap:
            continue
        for server in inv.settings.kafka_bootstrap.split(","):
            if server.strip() not in advertised:
                problems.append(
                    f"{inv}: kafka_bootstrap {server} is not an advertised listener of {name!r} ({sorted(advertised)})"
                )
    return problems


def check_images(compose: dict, root: Path = ROOT) -> list[str]:
    problems = []
    version = tomllib.loads((root / PYPROJECT_FILE).read_text())["project"]["version"]
    for name, service in (compose.get("services") or {}).items():
        image = str(service.get("image", ""))
        if not image:
            problems.append(f"service {name!r}: no image")
            continue
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if not tag or tag == "latest" or not re.search(r"\d", tag):
            problems.append(f"service {name!r}: image {image!r} is not pinned to a version tag")
        if "build" in service and tag != version:
            problems.append(
                f"service {name!r}: the built image {image!r} should be tagged with the project version {version}"
            )
    return problems


def check_ports(compose: dict) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    invs = invocations(compose)
    metrics = component_metrics()
    listening: dict[str, set[int]] = {}
    for inv in invs:
        s = inv.settings
        if s is None:
            continue
        ports = listening.setdefault(inv.service, set())
        if inv.name == "serve":
            ports.add(s.serve_port)
            if s.serve_host != "0.0.0.0":
                problems.append(
                    f"{inv}: serves on {s.serve_host}, unreachable from outside the container (--host 0.0.0.0)"
                )
        elif inv.name == "ps":
            ports.update(range(s.ps_port, s.ps_port + s.ps_shards))
            if s.ps_host != "0.0.0.0":
                problems.append(
                    f"{inv}: the parameter server binds {s.ps_host}, training workers in other "
                    f"containers cannot reach it (--host 0.0.0.0)"
                )
        if inv.name in metrics and inv.name != "serve":
            setting = metrics[inv.name][0]
            if getattr(s, setting) is None:
                problems.append(f"{inv}: {setting} is not set, so it exports no metrics (--metrics-port)")
            else:
                ports.update(metrics_ports(inv.name, s, metrics))
    servers = by_command(invs, "ps")
    for inv in by_command(invs, "train"):
        s = inv.settings
        match = [ps for ps in servers if ps.service == s.ps_host]
        if not match:
            problems.append(
                f"{inv}: ps_host {s.ps_host!r} is not a service running `streamfit ps` "
                f"({sorted(ps.service for ps in servers)}); set STREAMFIT_PS_HOST"
            )
            continue
        ps = match[0].settings
        for field in ("ps_port", "ps_shards", "model", "algorithm"):
            if getattr(s, field) != getattr(ps, field):
                problems.append(f"{inv}: {field}={getattr(s, field)!r} but {match[0]} has {getattr(ps, field)!r}")
    hosts: dict[int, str] = {}
    for name, service in services.items():
        for host, container in published(service):
            if name in listening and container not in listening[name]:
                problems.append(
                    f"service {name!r} publishes container port {container}, but nothing listens there "
                    f"(its ports: {sorted(listening[name])})"
                )
            if host is not None and host in hosts:
                problems.append(f"services {hosts[host]!r} and {name!r} both publish host port {host}")
            hosts.setdefault(host, name)
    for inv in by_command(invs, "serve"):
        if not any(c == inv.settings.serve_port for _, c in published(services[inv.service])):
            problems.append(f"{inv}: serve_port {inv.settings.serve_port} is not published")
    return problems


def check_volumes(compose: dict, root: Path = ROOT) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, target in mounts(service):
            if is_named_volume(source):
                used.add(source)
                if source not in declared:
                    problems.append(f"service {name!r}: volume {source!r} (at {target}) is not declared under volumes:")
            elif source.startswith("."):
                if not (root / source).exists():
                    problems.append(f"service {name!r}: bind mount {source} does not exist in the repository")
    for volume in sorted(declared - used):
        problems.append(f"volume {volume!r} is declared but no service mounts it")
    registry_volumes: dict[str, str] = {}
    for inv in invocations(compose):
        s = inv.settings
        if s is None:
            continue
        service = services[inv.service]
        if inv.args.command in REGISTRY_COMMANDS:
            held = volume_for(service, s.registry_url)
            if not held or not is_named_volume(held[0]):
                problems.append(f"{inv}: the registry {s.registry_url} is not on a named volume shared by the services")
            else:
                registry_volumes[inv.service] = held[0]
        state = {
            "ps": str(s.home / "ps"),
            "train": s.train_checkpoint or str(s.home / "checkpoints" / "training"),
            "predict": s.predict_checkpoint or str(s.home / "checkpoints" / "inference"),
        }.get(inv.name)
        if state:
            held = volume_for(service, state)
            if not held or not is_named_volume(held[0]):
                problems.append(
                    f"{inv}: its checkpoints ({state}) are not on a named volume and die with the container"
                )
    if len(set(registry_volumes.values())) > 1:
        problems.append(f"the services use different registry volumes: {registry_volumes}")
    return problems


SPARK_MASTER_CLASS = "org.apache.spark.deploy.master.Master"
SPARK_WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def _spark_daemon(service: dict, main_class: str) -> dict[str, str] | None:
    """The arguments of a ``spark-class <main_class> ...`` command (``--flag value`` pairs; the
    master URL of a worker under ``url``), or None when the service runs something else."""
    cmd = command(service)
    if main_class not in cmd:
        return None
    args, rest = {}, cmd[cmd.index(main_class) + 1 :]
    while rest:
        if rest[0].startswith("--") and len(rest) > 1:
            args[rest[0][2:]] = rest[1]
            rest = rest[2:]
        else:
            args["url"] = rest.pop(0)
    return args


def _megabytes(size: str) -> float:
    """Spark's memory strings (``512m``, ``2g``) in MB."""
    match = re.fullmatch(r"(\d+)([kmgt]?)b?", size.strip().lower())
    if not match:
        return float("nan")
    return int(match.group(1)) * {"k": 1 / 1024, "": 1 / 1024**2, "m": 1, "g": 1024, "t": 1024**2}[match.group(2)]


def check_spark(compose: dict) -> list[str]:
    """Spark runs as a standalone cluster: one master (web UI published, health-checked) and workers
    on streamfit's image that register with it and hold the registry where the consumers do (their
    executors load models from it); predict and train submit to the master, tell the executors how
    to reach the driver (its service name), and each takes a share of the cores that leaves the
    other some (without ``spark.cores.max`` the first application takes every core)."""
    problems = []
    services = compose.get("services") or {}
    masters = {n: a for n, s in services.items() if (a := _spark_daemon(s, SPARK_MASTER_CLASS)) is not None}
    workers = {n: a for n, s in services.items() if (a := _spark_daemon(s, SPARK_WORKER_CLASS)) is not None}
    if len(masters) != 1:
        return [
            f"expected one service running the Spark standalone master ({SPARK_MASTER_CLASS}), found {sorted(masters)}"
        ]
    ((master, args),) = masters.items()
    url = f"spark://{args.get('host', master)}:{args.get('port', '7077')}"
    if args.get("host", master) not in {master, services[master].get("hostname")}:
        problems.append(f"service {master!r}: the master binds --host {args['host']}, not its service name")
    ui = int(args.get("webui-port", 8080))
    if not any(container == ui for _, container in published(services[master])):
        problems.append(f"service {master!r}: the Spark web UI (port {ui}) is not published")
    if not (services[master].get("healthcheck") or {}).get("test"):
        problems.append(f"service {master!r}: no healthcheck, so the consumers cannot wait for the cluster")
    if not workers:
        problems.append(f"no service runs a Spark standalone worker ({SPARK_WORKER_CLASS})")
    invs = invocations(compose)
    consumers = [inv for inv in invs if inv.name in {"predict", "train"} and inv.settings is not None]
    image = {services[inv.service].get("image") for inv in consumers}
    cores = memory = 0.0
    for name, args in workers.items():
        service = services[name]
        replicas = int((service.get("deploy") or {}).get("replicas", 1))
        cores += replicas * int(args.get("cores", 0))
        memory = max(memory, _megabytes(args.get("memory", "0")))
        if args.get("url") != url:
            problems.append(f"service {name!r}: the worker registers with {args.get('url')}, not the master {url}")
        if "cores" not in args or "memory" not in args:
            problems.append(f"service {name!r}: set the worker's --cores and --memory (the defaults are the host's)")
        if "work-dir" not in args:
            problems.append(f"service {name!r}: no --work-dir (the default, under pyspark, is not writable)")
        if {service.get("image")} != image:
            problems.append(f"service {name!r}: image {service.get('image')!r} is not the consumers' {image}")
        for inv in consumers:
            if inv.name == "predict" and volume_for(service, inv.settings.registry_url) != volume_for(
                services[inv.service], inv.settings.registry_url
            ):
                problems.append(
                    f"service {name!r}: the registry {inv.settings.registry_url} is not the volume {inv} reads "
                    f"(executors load models from it)"
                )
    wanted = 0.0
    for inv in consumers:
        s = inv.settings
        conf = s.spark_conf
        if s.spark_master != url:
            problems.append(f"{inv}: spark_master is {s.spark_master!r}, not the cluster's master {url}")
        if conf.get("spark.driver.host") != inv.service:
            problems.append(
                f"{inv}: spark.driver.host in spark_conf is {conf.get('spark.driver.host')!r}: executors reach "
                f"the driver by its service name {inv.service!r}"
            )
        if "spark.cores.max" not in conf:
            problems.append(f"{inv}: no spark.cores.max in spark_conf: the first application would take every core")
        wanted += int(conf.get("spark.cores.max", cores))
        if _megabytes(conf.get("spark.executor.memory", "1g")) > memory:
            problems.append(
                f"{inv}: spark.executor.memory {conf.get('spark.executor.memory', '1g')} is more than a worker has"
            )
        if (master, "service_healthy") not in depends_on(services[inv.service]).items():
            problems.append(f"{inv}: does not wait for the Spark master ({master!r}: service_healthy)")
    if wanted > cores:
        problems.append(f"predict and train ask for {wanted:g} cores (spark.cores.max); the workers have {cores:g}")
    return problems


def check_dependencies(compose: dict) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            if target not in services:
                problems.append(f"service {name!r} depends on {target!r}, which does not exist")
            elif condition == "service_healthy" and not services[target].get("healthcheck"):
                problems.append(f"service {name!r} waits for {target!r} to be healthy, but it has no healthcheck")
            elif condition == "service_completed_successfully" and str(services[target].get("restart", "no")) != "no":
                problems.append(
                    f"service {name!r} waits for {target!r} to complete, but it restarts "
                    f"({services[target]['restart']})"
                )

    def reached(name: str) -> set[tuple[str, str]]:
        seen, todo = set(), [name]
        while todo:
            for target, condition in depends_on(services.get(todo.pop(), {})).items():
                if (target, condition) not in seen:
                    seen.add((target, condition))
                    todo.append(target)
        return seen

    invs = invocations(compose)
    kafka = [n for n, s in services.items() if str(s.get("image", "")).startswith("apache/kafka:")]
    topics = {inv.service for inv in invs if inv.name == "topics"}
    models = {inv.service for inv in invs if inv.name == "models create"}
    ps = {inv.service for inv in invs if inv.name == "ps"}
    for inv in invs:
        before = reached(inv.service)
        for needed, condition, who in (
            [(k, "service_healthy", "Kafka") for k in kafka]
            + [(t, "service_completed_successfully", "the topics") for t in topics if inv.name != "topics"]
            + [
                (m, "service_completed_successfully", "the model")
                for m in models
                if inv.name in {"ps", "train", "predict", "serve"}
            ]
            + [(p, "service_healthy", "the parameter server") for p in ps if inv.name == "train"]
        ):
            if (needed, condition) not in before:
                problems.append(f"{inv}: does not wait for {who} ({needed!r}: {condition})")
    return problems


def check_prometheus(compose: dict, prometheus: dict, root: Path = ROOT) -> list[str]:
    problems = []
    metrics = component_metrics()
    unknown = {f for f in Settings.model_fields if f.endswith("metrics_port")} - {m[0] for m in metrics.values()}
    if unknown:
        problems.append(
            f"settings {sorted(unknown)} serve metrics deploy/check.py does not know of: scrape them and "
            f"add them to component_metrics"
        )
    expected = {}
    for inv in invocations(compose):
        if inv.settings is not None and inv.args.command in metrics:
            for port in metrics_ports(inv.args.command, inv.settings, metrics):
                expected[f"{inv.service}:{port}"] = "/metrics"
    scraped = {}
    for job in prometheus.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                scraped[target] = job.get("metrics_path", "/metrics")
    for target in sorted(set(expected) - set(scraped)):
        problems.append(f"deploy/prometheus.yml does not scrape {target}, which serves /metrics")
    for target in sorted(set(scraped) - set(expected)):
        problems.append(
            f"deploy/prometheus.yml scrapes {target}, but no service serves metrics there "
            f"(metrics are at {sorted(expected)})"
        )
    for target in sorted(set(scraped) & set(expected)):
        if scraped[target] != expected[target]:
            problems.append(f"deploy/prometheus.yml scrapes {target}{scraped[target]}, the path is {expected[target]}")
    servers = [
        n for n, s in (compose.get("services") or {}).items() if str(s.get("image", "")).startswith("prom/prometheus:")
    ]
    if not servers:
        problems.append("no prom/prometheus service")
    for name in servers:
        held = dict((t, s) for s, t in mounts(compose["services"][name])).get("/etc/prometheus/prometheus.yml")
        if not held or (root / held).resolve() != (root / PROMETHEUS_FILE).resolve():
            problems.append(f"service {name!r} does not mount deploy/prometheus.yml at /etc/prometheus/prometheus.yml")
    return problems


def check_grafana(compose: dict, datasources: dict, providers: dict, dashboard: dict, root: Path = ROOT) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    grafana = [n for n, s in services.items() if str(s.get("image", "")).startswith("grafana/grafana:")]
    if len(grafana) != 1:
        return [f"expected one grafana/grafana service, found {grafana}"]
    targets = {t: (root / s).resolve() for s, t in mounts(services[grafana[0]]) if s.startswith(".")}
    if targets.get("/etc/grafana/provisioning") != (root / GRAFANA_DATASOURCES_FILE).parents[1].resolve():
        problems.append("grafana does not mount deploy/grafana/provisioning at /etc/grafana/provisioning")
    paths = [p["options"]["path"] for p in providers.get("providers") or [] if p.get("type") == "file"]
    if not paths or targets.get(paths[0]) != (root / DASHBOARD_FILE).parent.resolve():
        problems.append(f"the dashboard provider reads {paths}, where grafana does not mount deploy/grafana/dashboards")
    sources = [d for d in datasources.get("datasources") or [] if d.get("type") == "prometheus"]
    if not sources:
        return problems + ["no Prometheus datasource is provisioned"]
    source = sources[0]
    prometheus = [n for n, s in services.items() if str(s.get("image", "")).startswith("prom/prometheus:")]
    match = re.fullmatch(r"http://([^:/]+):(\d+)/?", str(source.get("url", "")))
    if not match or match.group(1) not in prometheus or match.group(2) != "9090":
        problems.append(f"the datasource url {source.get('url')!r} is not a prometheus service on 9090 ({prometheus})")

    metrics = component_metrics()
    scraped: set[str] = {"up"}
    for inv in invocations(compose):
        if (
            inv.settings is not None
            and inv.args.command in metrics
            and getattr(inv.settings, metrics[inv.args.command][0])
        ):
            scraped |= metrics[inv.args.command][1]
    panels = dashboard.get("panels") or []
    if not panels:
        problems.append("the dashboard has no panels")
    titles = " ".join(p.get("title", "") for p in panels).lower()
    for topic in ("throughput", "lag", "accuracy", "version", "latency"):
        if topic not in titles:
            problems.append(f"the dashboard has no {topic} panel")
    for panel in panels:
        uid = (panel.get("datasource") or {}).get("uid")
        for target in panel.get("targets") or []:
            target_uid = (target.get("datasource") or {}).get("uid", uid)
            if target_uid != source.get("uid"):
                problems.append(
                    f"panel {panel.get('title')!r}: datasource uid {target_uid!r} is not the provisioned "
                    f"{source.get('uid')!r}"
                )
            expr = target.get("expr", "")
            names = promql_metrics(expr)
            if not names:
                problems.append(f"panel {panel.get('title')!r}: {expr!r} selects no metric")
            for metric in sorted(names - scraped):
                problems.append(
                    f"panel {panel.get('title')!r}: {metric} is not exported by any scraped component (query {expr!r})"
                )
    return problems


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))


def copies(text: str) -> list[tuple[list[str], str]]:
    """(build-context sources, destination in the image) of every ``COPY`` from the build context."""
    found = []
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        words = shlex.split(line)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        if len(words) >= 2:
            found.append((words[:-1], words[-1]))
    return found


def run_scripts(text: str) -> list[str]:
    """The build-context paths of the Python scripts the Dockerfile COPYs and runs (``RUN python <file>.py``)."""
    in_image = {}
    for sources, dest in copies(text):
        for source in sources:
            into_dir = dest.endswith("/") or len(sources) > 1
            in_image[str(PurePosixPath(dest) / PurePosixPath(source).name) if into_dir else dest] = source
    ran = re.findall(r"^RUN\s+python3?\s+(\S+\.py)\b", text, re.M)
    return [in_image[path] for path in ran if path in in_image]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` keep ``path`` (relative to the build context) out of the build
    context: the last pattern matching it or a directory holding it wins, ``!pattern`` lets it back in
    (``**/`` also matches at the top; unlike Docker's, a ``*`` here may match across ``/``)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in patterns:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.removeprefix("!").strip().strip("/")
        options = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, o) for c in candidates for o in options):
            ignored = not line.startswith("!")
    return ignored


def check_dockerfile(text: str, pyproject: dict, root: Path = ROOT) -> list[str]:
    """The Dockerfile ``text`` against pyproject.toml and the installed pyspark; the files it COPYs
    (and .dockerignore) are read under ``root``."""
    problems = []
    args = dockerfile_args(text)
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)$", "\n".join(pyproject["project"]["dependencies"]), re.M))
    if not re.search(r"^FROM python:3\.11\.\d+-slim(-\w+)?\s*$", text, re.M):
        problems.append("the base image is not python:3.11.<patch>-slim[-<debian>] (pinned)")
    if not re.search(r"openjdk-(17|21)-jre-headless", text):
        problems.append("no Debian JRE (openjdk-17/21-jre-headless) for Spark")
    if args.get("SPARK_VERSION") != pins.get("pyspark"):
        problems.append(
            f"Dockerfile SPARK_VERSION={args.get('SPARK_VERSION')} but pyproject.toml pins "
            f"pyspark=={pins.get('pyspark')}: the Kafka connector jars must match"
        )
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    scala = args.get("SCALA_BINARY_VERSION")
    if not (jars / f"spark-core_{scala}-{args.get('SPARK_VERSION')}.jar").exists():
        problems.append(
            f"pyspark {pyspark.__version__}'s jars are not spark-core_{scala}-{args.get('SPARK_VERSION')}: "
            f"SCALA_BINARY_VERSION={scala} or SPARK_VERSION is wrong"
        )
    for arg in ("KAFKA_CLIENTS_VERSION", "COMMONS_POOL2_VERSION"):
        if not re.fullmatch(r"\d+\.\d+\.\d+", args.get(arg, "")):
            problems.append(f"{arg} is not pinned to an exact version ({args.get(arg)})")
    if args.get("MAVEN_REPOSITORY") != "https://repo1.maven.org/maven2":
        problems.append(f"MAVEN_REPOSITORY is {args.get('MAVEN_REPOSITORY')}, not Maven Central")
    ignore = (root / DOCKERIGNORE_FILE).read_text().splitlines() if (root / DOCKERIGNORE_FILE).exists() else []
    for sources, _ in copies(text):
        for source in sources:
            if not any(root.glob(source)):
                problems.append(f"COPY {source}: there is no {source} in the build context")
            elif dockerignored(source, ignore):
                problems.append(f"COPY {source}: .dockerignore keeps {source} out of the build context")
    scripts = [s for s in run_scripts(text) if s == CONNECTOR_SCRIPT]
    if not scripts:
        problems.append(
            f"no step COPYing {CONNECTOR_SCRIPT} into the image and running it with python "
            f"to add the Kafka connector jars"
        )
    elif (root / CONNECTOR_SCRIPT).exists():
        script = (root / CONNECTOR_SCRIPT).read_text()
        try:
            compile(script, CONNECTOR_SCRIPT, "exec")
        except SyntaxError as exc:
            problems.append(f"the jar-adding script {CONNECTOR_SCRIPT} does not compile: {exc}")
        for artifact in (
            "spark-sql-kafka-0-10_{scala}",
            "spark-token-provider-kafka-0-10_{scala}",
            '"kafka-clients"',
            '"commons-pool2"',
        ):
            if artifact not in script:
                problems.append(f"the jar-adding script {CONNECTOR_SCRIPT} does not fetch {artifact}")
    if not re.search(r"^COPY pyproject\.toml", text, re.M) or not re.search(r"pip install[^\n]*(\s\.|-r)", text):
        problems.append("streamfit is not pip-installed from pyproject.toml")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1] in {"root", "0"}:
        problems.append(f"the image runs as root (USER {users[-1] if users else 'unset'})")
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in re.findall(r"\d+", line)}
    if Settings.model_fields["serve_port"].default not in exposed:
        problems.append(
            f"EXPOSE {sorted(exposed)} lacks the serving port {Settings.model_fields['serve_port'].default}"
        )
    return problems


# ------------------------------------------------------------------------------------------------
# python -m deploy.check


def run_checks(root: Path = ROOT) -> dict[str, list[str]]:
    """Every check on the deployment files under ``root``: {check name: its problems}. A file that
    cannot be read or parsed, or a check that fails on it, is reported as a problem of that check."""
    results: dict[str, list[str]] = {}

    def run(name: str, check, *args, **kwargs) -> None:
        try:
            results[name] = check(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a broken file must show up as a problem, not a traceback
            results[name] = [f"could not run: {type(exc).__name__}: {exc}"]

    try:
        compose = load_compose(root / COMPOSE_FILE)
    except Exception as exc:  # noqa: BLE001 - an unreadable compose file is the one problem reported
        return {"compose file": [f"{COMPOSE_FILE} could not be read: {type(exc).__name__}: {exc}"]}
    for check in (check_commands, check_environment, check_kafka, check_ports, check_spark, check_dependencies):
        run(check.__name__, check, compose)
    for check in (check_images, check_volumes):
        run(check.__name__, check, compose, root=root)
    run(
        "check_prometheus",
        lambda: check_prometheus(compose, yaml.safe_load((root / PROMETHEUS_FILE).read_text()), root=root),
    )
    run(
        "check_grafana",
        lambda: check_grafana(
            compose,
            yaml.safe_load((root / GRAFANA_DATASOURCES_FILE).read_text()),
            yaml.safe_load((root / GRAFANA_PROVIDERS_FILE).read_text()),
            json.loads((root / DASHBOARD_FILE).read_text()),
            root=root,
        ),
    )
    run(
        "check_dockerfile",
        lambda: check_dockerfile(
            (root / DOCKER_FILE).read_text(), tomllib.loads((root / PYPROJECT_FILE).read_text()), root=root
        ),
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.check",
        description="Check docker-compose.yml, the Dockerfile, Prometheus's and Grafana's configuration "
        "against the streamfit code, without Docker.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="the directory holding docker-compose.yml, Dockerfile, pyproject.toml and deploy/ "
        "(default: this repository)",
    )
    root = parser.parse_args(argv).root.resolve()
    results = run_checks(root)
    problems = [(name, problem) for name, found in results.items() for problem in found]
    if problems:
        for name, problem in problems:
            print(f"{name}: {problem}", file=sys.stderr)
        failed = sum(1 for found in results.values() if found)
        print(
            f"deploy.check: {len(problems)} problem(s) in {failed} of {len(results)} checks of {root}", file=sys.stderr
        )
        return 1
    services = len(load_compose(root / COMPOSE_FILE).get("services") or {})
    print(
        f"deploy.check: all {len(results)} checks pass ({services} services in {COMPOSE_FILE}, {DOCKER_FILE}, "
        f"Prometheus and Grafana configuration under {root})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
