"""The docker-compose deployment checked against the code, without Docker.

No Docker engine runs here, so this proves what the files can prove: every ``streamfit`` command
in docker-compose.yml parses with the real CLI parser, every ``STREAMFIT_*`` variable is a real
setting and each service's settings validate, ports and hosts agree between services, volumes are
declared and shared where state is, Prometheus scrapes exactly the components that serve
``/metrics``, the Grafana dashboard only queries series the code really exports, and the
Dockerfile adds the Spark Kafka connector of the pinned pyspark. Each ``check_*`` function takes
the parsed files and returns the problems it found (empty: all good), so the tests at the bottom
can also feed them broken copies and see them complain.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline.cli import build_parser, settings_from
from pipeline.settings import CONFIG_ENV, ENV_PREFIX, Settings, SettingsError
from pipeline.spec import BUILTIN_SPECS
from producers import synthetic

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
GRAFANA_DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "streamfit.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamfit.json"

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
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",), "enum": ("",)}
    return {metric.name + suffix for metric in registry.collect() for suffix in suffixes.get(metric.type, ("",))}


def component_metrics() -> dict[str, tuple[str, set[str]]]:
    """Per metrics-serving command: the setting holding its port, and the series it exports,
    read from the very registries the components build."""
    from consumers.training import TrainingGauges
    from pipeline.spark.progress import ProgressMetrics
    from serving.metrics import Metrics

    prefix = re.search(r'ProgressMetrics\("([\w:]+)"\)', (ROOT / "consumers" / "inference.py").read_text())
    assert prefix, "consumers/inference.py no longer builds ProgressMetrics(\"<prefix>\"): update component_metrics"
    return {"serve": ("serve_port", exported_names(Metrics().registry)),
            "predict": ("predict_metrics_port", exported_names(ProgressMetrics(prefix.group(1)).registry)),
            "train": ("train_metrics_port", exported_names(TrainingGauges().registry))}


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == "." or text[match.end():].lstrip().startswith("("):
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
                problems.append(f"{inv}: {source} makes {synthetic.n_features(generator)} features but model {model!r} "
                                f"(spec {specs[model]}) takes {BUILTIN_SPECS[specs[model]].n_features}")
    return problems


def check_environment(compose: dict) -> list[str]:
    """Every STREAMFIT_* name is a setting (as load_settings maps them) and every service's settings validate."""
    problems = []
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields} | {CONFIG_ENV}
    for name, service in (compose.get("services") or {}).items():
        for variable in environment(service):
            if variable.upper().startswith(ENV_PREFIX) and variable not in known:
                field = variable[len(ENV_PREFIX):].lower()
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
            problems.append(f"{inv}: kafka_source is {inv.settings.kafka_source!r}; the image has Spark's Kafka "
                            f"connector, set STREAMFIT_KAFKA_SOURCE=native")
    return problems


def check_kafka(compose: dict) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    brokers = {n: s for n, s in services.items() if str(s.get("image", "")).split(":")[0] == "apache/kafka"}
    if len(brokers) != 1:
        return [f"expected one service on the official apache/kafka image, found {sorted(brokers) or 'none'}"]
    (name, kafka), = brokers.items()
    env = environment(kafka)
    roles = set((env.get("KAFKA_PROCESS_ROLES") or "").split(","))
    if not {"broker", "controller"} <= roles or any(k.startswith("KAFKA_ZOOKEEPER") for k in env):
        problems.append(f"service {name!r}: not a KRaft broker+controller (KAFKA_PROCESS_ROLES={env.get('KAFKA_PROCESS_ROLES')})")
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
                problems.append(f"{inv}: kafka_bootstrap {server} is not an advertised listener of {name!r} "
                                f"({sorted(advertised)})")
    return problems


def check_images(compose: dict) -> list[str]:
    problems = []
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in (compose.get("services") or {}).items():
        image = str(service.get("image", ""))
        if not image:
            problems.append(f"service {name!r}: no image")
            continue
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if not tag or tag == "latest" or not re.search(r"\d", tag):
            problems.append(f"service {name!r}: image {image!r} is not pinned to a version tag")
        if "build" in service and tag != version:
            problems.append(f"service {name!r}: the built image {image!r} should be tagged with the project "
                            f"version {version}")
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
                problems.append(f"{inv}: serves on {s.serve_host}, unreachable from outside the container (--host 0.0.0.0)")
        elif inv.name == "ps":
            ports.update(range(s.ps_port, s.ps_port + s.ps_shards))
            if s.ps_host != "0.0.0.0":
                problems.append(f"{inv}: the parameter server binds {s.ps_host}, training workers in other "
                                f"containers cannot reach it (--host 0.0.0.0)")
        if inv.name in ("predict", "train"):
            setting = metrics[inv.name][0]
            if getattr(s, setting) is None:
                problems.append(f"{inv}: {setting} is not set, so it exports no metrics (--metrics-port)")
            else:
                ports.add(getattr(s, setting))
    servers = by_command(invs, "ps")
    for inv in by_command(invs, "train"):
        s = inv.settings
        match = [ps for ps in servers if ps.service == s.ps_host]
        if not match:
            problems.append(f"{inv}: ps_host {s.ps_host!r} is not a service running `streamfit ps` "
                            f"({sorted(ps.service for ps in servers)}); set STREAMFIT_PS_HOST")
            continue
        ps = match[0].settings
        for field in ("ps_port", "ps_shards", "model", "algorithm"):
            if getattr(s, field) != getattr(ps, field):
                problems.append(f"{inv}: {field}={getattr(s, field)!r} but {match[0]} has {getattr(ps, field)!r}")
    hosts: dict[int, str] = {}
    for name, service in services.items():
        for host, container in published(service):
            if name in listening and container not in listening[name]:
                problems.append(f"service {name!r} publishes container port {container}, but nothing listens there "
                                f"(its ports: {sorted(listening[name])})")
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
        state = {"ps": str(s.home / "ps"),
                 "train": s.train_checkpoint or str(s.home / "checkpoints" / "training"),
                 "predict": s.predict_checkpoint or str(s.home / "checkpoints" / "inference")}.get(inv.name)
        if state:
            held = volume_for(service, state)
            if not held or not is_named_volume(held[0]):
                problems.append(f"{inv}: its checkpoints ({state}) are not on a named volume and die with the container")
    if len(set(registry_volumes.values())) > 1:
        problems.append(f"the services use different registry volumes: {registry_volumes}")
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
                problems.append(f"service {name!r} waits for {target!r} to complete, but it restarts "
                                f"({services[target]['restart']})")

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
        for needed, condition, who in ([(k, "service_healthy", "Kafka") for k in kafka]
                                       + [(t, "service_completed_successfully", "the topics") for t in topics
                                          if inv.name != "topics"]
                                       + [(m, "service_completed_successfully", "the model") for m in models
                                          if inv.name in {"ps", "train", "predict", "serve"}]
                                       + [(p, "service_healthy", "the parameter server") for p in ps
                                          if inv.name == "train"]):
            if (needed, condition) not in before:
                problems.append(f"{inv}: does not wait for {who} ({needed!r}: {condition})")
    return problems


def check_prometheus(compose: dict, prometheus: dict, root: Path = ROOT) -> list[str]:
    problems = []
    metrics = component_metrics()
    unknown = {f for f in Settings.model_fields if f.endswith("metrics_port")} - {m[0] for m in metrics.values()}
    if unknown:
        problems.append(f"settings {sorted(unknown)} serve metrics this test does not know of: scrape them and "
                        f"add them to component_metrics")
    expected = {}
    for inv in invocations(compose):
        if inv.settings is not None and inv.args.command in metrics:
            port = getattr(inv.settings, metrics[inv.args.command][0])
            if port is not None:
                expected[f"{inv.service}:{port}"] = "/metrics"
    scraped = {}
    for job in prometheus.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                scraped[target] = job.get("metrics_path", "/metrics")
    for target in sorted(set(expected) - set(scraped)):
        problems.append(f"deploy/prometheus.yml does not scrape {target}, which serves /metrics")
    for target in sorted(set(scraped) - set(expected)):
        problems.append(f"deploy/prometheus.yml scrapes {target}, but no service serves metrics there "
                        f"(metrics are at {sorted(expected)})")
    for target in sorted(set(scraped) & set(expected)):
        if scraped[target] != expected[target]:
            problems.append(f"deploy/prometheus.yml scrapes {target}{scraped[target]}, the path is {expected[target]}")
    servers = [n for n, s in (compose.get("services") or {}).items() if str(s.get("image", "")).startswith("prom/prometheus:")]
    if not servers:
        problems.append("no prom/prometheus service")
    for name in servers:
        held = dict((t, s) for s, t in mounts(compose["services"][name])).get("/etc/prometheus/prometheus.yml")
        if not held or (root / held).resolve() != PROMETHEUS.resolve():
            problems.append(f"service {name!r} does not mount deploy/prometheus.yml at /etc/prometheus/prometheus.yml")
    return problems


def check_grafana(compose: dict, datasources: dict, providers: dict, dashboard: dict, root: Path = ROOT) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    grafana = [n for n, s in services.items() if str(s.get("image", "")).startswith("grafana/grafana:")]
    if len(grafana) != 1:
        return [f"expected one grafana/grafana service, found {grafana}"]
    targets = {t: (root / s).resolve() for s, t in mounts(services[grafana[0]]) if s.startswith(".")}
    if targets.get("/etc/grafana/provisioning") != GRAFANA_DATASOURCES.parents[1].resolve():
        problems.append("grafana does not mount deploy/grafana/provisioning at /etc/grafana/provisioning")
    paths = [p["options"]["path"] for p in providers.get("providers") or [] if p.get("type") == "file"]
    if not paths or targets.get(paths[0]) != DASHBOARD.parent.resolve():
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
        if inv.settings is not None and inv.args.command in metrics and getattr(inv.settings, metrics[inv.args.command][0]):
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
                problems.append(f"panel {panel.get('title')!r}: datasource uid {target_uid!r} is not the provisioned "
                                f"{source.get('uid')!r}")
            expr = target.get("expr", "")
            names = promql_metrics(expr)
            if not names:
                problems.append(f"panel {panel.get('title')!r}: {expr!r} selects no metric")
            for metric in sorted(names - scraped):
                problems.append(f"panel {panel.get('title')!r}: {metric} is not exported by any scraped component "
                                f"(query {expr!r})")
    return problems


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))


def embedded_python(text: str) -> str:
    match = re.search(r"^RUN python - <<'PY'\n(.*?)\nPY$", text, re.M | re.S)
    return match.group(1) if match else ""


def check_dockerfile(text: str, pyproject: dict) -> list[str]:
    problems = []
    args = dockerfile_args(text)
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)$", "\n".join(pyproject["project"]["dependencies"]), re.M))
    if not re.search(r"^FROM python:3\.11\.\d+-slim(-\w+)?\s*$", text, re.M):
        problems.append("the base image is not python:3.11.<patch>-slim[-<debian>] (pinned)")
    if not re.search(r"openjdk-(17|21)-jre-headless", text):
        problems.append("no Debian JRE (openjdk-17/21-jre-headless) for Spark")
    if args.get("SPARK_VERSION") != pins.get("pyspark"):
        problems.append(f"Dockerfile SPARK_VERSION={args.get('SPARK_VERSION')} but pyproject.toml pins "
                        f"pyspark=={pins.get('pyspark')}: the Kafka connector jars must match")
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    scala = args.get("SCALA_BINARY_VERSION")
    if not (jars / f"spark-core_{scala}-{args.get('SPARK_VERSION')}.jar").exists():
        problems.append(f"pyspark {pyspark.__version__}'s jars are not spark-core_{scala}-{args.get('SPARK_VERSION')}: "
                        f"SCALA_BINARY_VERSION={scala} or SPARK_VERSION is wrong")
    for arg in ("KAFKA_CLIENTS_VERSION", "COMMONS_POOL2_VERSION"):
        if not re.fullmatch(r"\d+\.\d+\.\d+", args.get(arg, "")):
            problems.append(f"{arg} is not pinned to an exact version ({args.get(arg)})")
    if args.get("MAVEN_REPOSITORY") != "https://repo1.maven.org/maven2":
        problems.append(f"MAVEN_REPOSITORY is {args.get('MAVEN_REPOSITORY')}, not Maven Central")
    script = embedded_python(text)
    if not script:
        problems.append("no `RUN python - <<'PY'` step adding the Kafka connector jars")
    else:
        try:
            compile(script, "Dockerfile", "exec")
        except SyntaxError as exc:
            problems.append(f"the jar-adding script does not compile: {exc}")
        for artifact in ("spark-sql-kafka-0-10_{scala}", "spark-token-provider-kafka-0-10_{scala}",
                         '"kafka-clients"', '"commons-pool2"'):
            if artifact not in script:
                problems.append(f"the jar-adding script does not fetch {artifact}")
    if not re.search(r"^COPY pyproject\.toml", text, re.M) or not re.search(r"pip install[^\n]*(\s\.|-r)", text):
        problems.append("streamfit is not pip-installed from pyproject.toml")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1] in {"root", "0"}:
        problems.append(f"the image runs as root (USER {users[-1] if users else 'unset'})")
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in re.findall(r"\d+", line)}
    if Settings.model_fields["serve_port"].default not in exposed:
        problems.append(f"EXPOSE {sorted(exposed)} lacks the serving port {Settings.model_fields['serve_port'].default}")
    return problems


# ------------------------------------------------------------------------------------------------
# the tests: the real files pass


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.mark.parametrize("check", [check_commands, check_environment, check_kafka, check_images, check_ports,
                                   check_volumes, check_dependencies], ids=lambda check: check.__name__)
def test_the_compose_file_passes(compose, check):
    """Commands parse and fit the model; variables are real settings that validate; Kafka is KRaft,
    health-checked and advertised; images pinned; ports, hosts and volumes agree; start order holds."""
    problems = check(compose)
    assert not problems, "\n".join(problems)


def test_prometheus_scrapes_exactly_the_metrics_endpoints(compose):
    problems = check_prometheus(compose, yaml.safe_load(PROMETHEUS.read_text()))
    assert not problems, "\n".join(problems)


def test_grafana_dashboard_queries_real_series(compose):
    problems = check_grafana(compose, yaml.safe_load(GRAFANA_DATASOURCES.read_text()),
                             yaml.safe_load(GRAFANA_PROVIDERS.read_text()), json.loads(DASHBOARD.read_text()))
    assert not problems, "\n".join(problems)


def test_dockerfile_matches_pinned_pyspark():
    problems = check_dockerfile(DOCKERFILE.read_text(), tomllib.loads((ROOT / "pyproject.toml").read_text()))
    assert not problems, "\n".join(problems)


def test_readme_example_request_fits_the_model(compose):
    section = (ROOT / "README.md").read_text().split("## Deploy with docker-compose", 1)
    assert len(section) == 2, "README.md has no 'Deploy with docker-compose' section"
    body = re.search(r"-d '(\{.*?\})'", section[1])
    assert body, "the README's deploy section has no curl -d '{...}' example request"
    rows = json.loads(body.group(1))["instances"]
    assert "-H 'Content-Type: application/json'" in section[1], "the README's curl lacks the JSON content type"
    spec = next(inv.args.spec for inv in invocations(compose) if inv.name == "models create")
    assert all(len(row) == BUILTIN_SPECS[spec].n_features for row in rows), \
        f"the README's example rows do not have the {BUILTIN_SPECS[spec].n_features} features of spec {spec}"


# ------------------------------------------------------------------------------------------------
# the jar step of the Dockerfile, run against a local stand-in for Maven Central


def _fake_maven(tmp_path: Path, args: dict[str, str], *, kafka_in_pom: str | None = None,
                corrupt: str | None = None) -> tuple[Path, Path]:
    """A file:// Maven repository with the connector's POMs (kafka-clients through a ${property} of
    the parent, commons-pool2 managed by the parent, as Maven allows) and the four jars; and a
    stand-in ``pyspark`` package whose jars directory the step fills."""
    spark, scala = args["SPARK_VERSION"], args["SCALA_BINARY_VERSION"]
    repo = tmp_path / "maven"

    def put(group, artifact, version, ext, data: bytes):
        path = repo / group.replace(".", "/") / artifact / version / f"{artifact}-{version}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    ns = 'xmlns="http://maven.apache.org/POM/4.0.0"'
    put("org.apache.spark", f"spark-parent_{scala}", spark, "pom", f"""<project {ns}><groupId>org.apache.spark</groupId>
        <artifactId>spark-parent_{scala}</artifactId><version>{spark}</version>
        <properties><kafka.version>{kafka_in_pom or args['KAFKA_CLIENTS_VERSION']}</kafka.version>
        <commons-pool2.version>{args['COMMONS_POOL2_VERSION']}</commons-pool2.version></properties>
        <dependencyManagement><dependencies><dependency><groupId>org.apache.commons</groupId>
        <artifactId>commons-pool2</artifactId><version>${{commons-pool2.version}}</version></dependency>
        </dependencies></dependencyManagement></project>""".encode())
    put("org.apache.spark", f"spark-sql-kafka-0-10_{scala}", spark, "pom", f"""<project {ns}>
        <parent><groupId>org.apache.spark</groupId><artifactId>spark-parent_{scala}</artifactId>
        <version>{spark}</version></parent><artifactId>spark-sql-kafka-0-10_{scala}</artifactId>
        <dependencies><dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-clients</artifactId>
        <version>${{kafka.version}}</version></dependency><dependency><groupId>org.apache.commons</groupId>
        <artifactId>commons-pool2</artifactId></dependency></dependencies></project>""".encode())
    for group, artifact, version in (("org.apache.spark", f"spark-sql-kafka-0-10_{scala}", spark),
                                     ("org.apache.spark", f"spark-token-provider-kafka-0-10_{scala}", spark),
                                     ("org.apache.kafka", "kafka-clients", args["KAFKA_CLIENTS_VERSION"]),
                                     ("org.apache.commons", "commons-pool2", args["COMMONS_POOL2_VERSION"])):
        data = f"jar of {artifact}".encode()
        put(group, artifact, version, "jar", data)
        digest = hashlib.sha1(b"tampered" if artifact == corrupt else data).hexdigest()
        put(group, artifact, version, "jar.sha1", f"{digest}  {artifact}-{version}.jar\n".encode())
    package = tmp_path / "site" / "pyspark"
    (package / "jars").mkdir(parents=True)
    (package / "__init__.py").write_text(f"__version__ = {spark!r}\n")
    (package / "jars" / f"spark-core_{scala}-{spark}.jar").write_bytes(b"")
    return repo, package / "jars"


def _run_jar_step(tmp_path: Path, **fake) -> tuple[subprocess.CompletedProcess, Path]:
    text = DOCKERFILE.read_text()
    args = dockerfile_args(text)
    repo, jars = _fake_maven(tmp_path, args, **fake)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(jars.parents[1]),
           **args, "MAVEN_REPOSITORY": repo.as_uri()}
    result = subprocess.run([sys.executable, "-"], input=embedded_python(text), env=env,
                            capture_output=True, text=True, timeout=60)
    return result, jars


def test_dockerfile_jar_step_adds_the_connector(tmp_path):
    result, jars = _run_jar_step(tmp_path)
    assert result.returncode == 0, f"the Dockerfile's jar step failed: {result.stderr}"
    args = dockerfile_args(DOCKERFILE.read_text())
    spark, scala = args["SPARK_VERSION"], args["SCALA_BINARY_VERSION"]
    expected = {f"spark-sql-kafka-0-10_{scala}-{spark}.jar", f"spark-token-provider-kafka-0-10_{scala}-{spark}.jar",
                f"kafka-clients-{args['KAFKA_CLIENTS_VERSION']}.jar", f"commons-pool2-{args['COMMONS_POOL2_VERSION']}.jar"}
    assert expected <= {p.name for p in jars.iterdir()}, f"pyspark's jars directory lacks {expected}"


def test_dockerfile_jar_step_refuses_a_version_the_connector_does_not_use(tmp_path):
    result, _ = _run_jar_step(tmp_path, kafka_in_pom="0.0.1")
    assert result.returncode != 0 and "set the build arg to 0.0.1" in result.stderr, result.stderr


def test_dockerfile_jar_step_refuses_a_bad_checksum(tmp_path):
    result, _ = _run_jar_step(tmp_path, corrupt="kafka-clients")
    assert result.returncode != 0 and "SHA-1" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------
# the checks catch what they are for: broken copies are refused


def _service(compose: dict, command_name: str) -> dict:
    for inv in invocations(compose):
        if inv.name == command_name:
            return compose["services"][inv.service]
    raise AssertionError(f"no service runs streamfit {command_name}")


def _bogus_flag(c):
    _service(c, "predict")["command"].append("--no-such-flag")


def _bogus_subcommand(c):
    command = _service(c, "models create")["command"]
    command[command.index("create")] = "make"


def _unknown_setting(c):
    _service(c, "serve")["environment"]["STREAMFIT_NO_SUCH_SETTING"] = "1"


def _invalid_value(c):
    _service(c, "train")["environment"]["STREAMFIT_PS_PORT"] = "not-a-port"


def _ps_on_loopback(c):
    cmd = _service(c, "ps")["command"]
    del cmd[cmd.index("--host"):cmd.index("--host") + 2]


def _wrong_published_port(c):
    _service(c, "serve")["ports"] = ["8000:8080"]


def _undeclared_volume(c):
    del c["volumes"]["registry"]


def _latest_kafka(c):
    c["services"]["kafka"]["image"] = "apache/kafka:latest"


def _wrong_source(c):
    cmd = _service(c, "produce")["command"]
    cmd[cmd.index("--source") + 1] = "synth:hyperplane"


def _no_wait_for_ps(c):
    _service(c, "train")["depends_on"] = {"kafka": {"condition": "service_healthy"}}


@pytest.mark.parametrize("mutate, check, expected", [
    (_bogus_flag, check_commands, "unrecognized arguments: --no-such-flag"),
    (_bogus_subcommand, check_commands, "invalid choice: 'make'"),
    (_wrong_source, check_commands, "makes 10 features but model 'higgs'"),
    (_unknown_setting, check_environment, "STREAMFIT_NO_SUCH_SETTING is not a streamfit setting"),
    (_invalid_value, check_environment, "ps_port"),
    (_ps_on_loopback, check_ports, "training workers in other containers cannot reach it"),
    (_wrong_published_port, check_ports, "publishes container port 8080"),
    (_undeclared_volume, check_volumes, "volume 'registry'"),
    (_latest_kafka, check_images, "'apache/kafka:latest' is not pinned"),
    (_no_wait_for_ps, check_dependencies, "does not wait for the parameter server"),
], ids=lambda v: v.__name__ if callable(v) else None)
def test_checks_refuse_a_broken_compose_file(tmp_path, mutate, check, expected):
    broken = yaml.safe_load(COMPOSE.read_text())  # not interpolated: the copy is read back with load_compose
    mutate(broken)
    copy_path = tmp_path / "docker-compose.yml"
    copy_path.write_text(yaml.safe_dump(broken))
    problems = check(load_compose(copy_path))
    assert any(expected in p for p in problems), f"expected a problem containing {expected!r}, got {problems}"


def test_prometheus_check_refuses_a_wrong_target(compose):
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["scrape_configs"][0]["static_configs"][0]["targets"] = ["serve:9999"]
    problems = check_prometheus(compose, config)
    assert any("does not scrape serve:8000" in p for p in problems), problems
    assert any("scrapes serve:9999, but no service serves metrics there" in p for p in problems), problems


def test_grafana_check_refuses_a_metric_the_code_does_not_export(compose):
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][0]["targets"][0]["expr"] = "rate(streamfit_made_up_total[1m])"
    problems = check_grafana(compose, yaml.safe_load(GRAFANA_DATASOURCES.read_text()),
                             yaml.safe_load(GRAFANA_PROVIDERS.read_text()), dashboard)
    assert any("streamfit_made_up_total is not exported" in p for p in problems), problems


def test_dockerfile_check_refuses_another_spark_version():
    text = re.sub(r"^ARG SPARK_VERSION=\S+", "ARG SPARK_VERSION=4.0.0", DOCKERFILE.read_text(), flags=re.M)
    problems = check_dockerfile(text, tomllib.loads((ROOT / "pyproject.toml").read_text()))
    assert any("SPARK_VERSION=4.0.0 but pyproject.toml pins" in p for p in problems), problems


def test_promql_metric_names():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(streamfit_http_request_duration_seconds_bucket'
            '{route="/v1/models/{model}:predict"}[5m] offset 1m))) / on(job) up')
    assert promql_metrics(expr) == {"streamfit_http_request_duration_seconds_bucket", "up"}
