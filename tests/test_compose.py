"""The docker-compose deployment checked against the code, without Docker: the tests of deploy/check.py.

The real files pass every check (and ``python -m deploy.check`` says so); the Dockerfile's jar step,
deploy/fetch_kafka_connector.py, adds the connector from a local stand-in for Maven Central and
refuses a wrong version or checksum; and broken copies of the files are refused with a message
naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy.check import (
    COMPOSE,
    CONNECTOR_SCRIPT,
    DASHBOARD,
    DOCKERFILE,
    GRAFANA_DATASOURCES,
    GRAFANA_PROVIDERS,
    PROMETHEUS,
    ROOT,
    check_commands,
    check_dependencies,
    check_dockerfile,
    check_environment,
    check_grafana,
    check_images,
    check_kafka,
    check_ports,
    check_prometheus,
    check_spark,
    check_volumes,
    dockerfile_args,
    dockerignored,
    invocations,
    load_compose,
    promql_metrics,
)
from pipeline.spec import BUILTIN_SPECS

# ------------------------------------------------------------------------------------------------
# the tests: the real files pass


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.mark.parametrize(
    "check",
    [
        check_commands,
        check_environment,
        check_kafka,
        check_images,
        check_ports,
        check_spark,
        check_volumes,
        check_dependencies,
    ],
    ids=lambda check: check.__name__,
)
def test_the_compose_file_passes(compose, check):
    """Commands parse and fit the model; variables are real settings that validate; Kafka is KRaft,
    health-checked and advertised; images pinned; ports, hosts and volumes agree; start order holds."""
    problems = check(compose)
    assert not problems, "\n".join(problems)


def test_kafka_client_properties_pass_as_settings(tmp_path):
    """STREAMFIT_KAFKA__<NAME> variables are Kafka client properties, not unknown settings (a bad one is
    refused by the same validation: test_checks_refuse_a_broken_compose_file)."""
    tuned = yaml.safe_load(COMPOSE.read_text())
    environment = _service(tuned, "predict")["environment"]
    environment["STREAMFIT_KAFKA__COMPRESSION_TYPE"] = "lz4"
    environment["STREAMFIT_KAFKA__LINGER_MS"] = "5"
    copy_path = tmp_path / "docker-compose.yml"
    copy_path.write_text(yaml.safe_dump(tuned))
    compose = load_compose(copy_path)
    assert check_environment(compose) == []
    (predict,) = [inv for inv in invocations(compose) if inv.name == "predict"]
    assert dict(predict.settings.kafka) == {"compression.type": "lz4", "linger.ms": "5"}


def test_prometheus_scrapes_exactly_the_metrics_endpoints(compose):
    problems = check_prometheus(compose, yaml.safe_load(PROMETHEUS.read_text()))
    assert not problems, "\n".join(problems)


def test_grafana_dashboard_queries_real_series(compose):
    problems = check_grafana(
        compose,
        yaml.safe_load(GRAFANA_DATASOURCES.read_text()),
        yaml.safe_load(GRAFANA_PROVIDERS.read_text()),
        json.loads(DASHBOARD.read_text()),
    )
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
    assert all(len(row) == BUILTIN_SPECS[spec].n_features for row in rows), (
        f"the README's example rows do not have the {BUILTIN_SPECS[spec].n_features} features of spec {spec}"
    )


# ------------------------------------------------------------------------------------------------
# the jar step of the Dockerfile (deploy/fetch_kafka_connector.py), run against a local stand-in
# for Maven Central


def _fake_maven(
    tmp_path: Path, args: dict[str, str], *, kafka_in_pom: str | None = None, corrupt: str | None = None
) -> tuple[Path, Path]:
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
    put(
        "org.apache.spark",
        f"spark-parent_{scala}",
        spark,
        "pom",
        f"""<project {ns}><groupId>org.apache.spark</groupId>
        <artifactId>spark-parent_{scala}</artifactId><version>{spark}</version>
        <properties><kafka.version>{kafka_in_pom or args["KAFKA_CLIENTS_VERSION"]}</kafka.version>
        <commons-pool2.version>{args["COMMONS_POOL2_VERSION"]}</commons-pool2.version></properties>
        <dependencyManagement><dependencies><dependency><groupId>org.apache.commons</groupId>
        <artifactId>commons-pool2</artifactId><version>${{commons-pool2.version}}</version></dependency>
        </dependencies></dependencyManagement></project>""".encode(),
    )
    put(
        "org.apache.spark",
        f"spark-sql-kafka-0-10_{scala}",
        spark,
        "pom",
        f"""<project {ns}>
        <parent><groupId>org.apache.spark</groupId><artifactId>spark-parent_{scala}</artifactId>
        <version>{spark}</version></parent><artifactId>spark-sql-kafka-0-10_{scala}</artifactId>
        <dependencies><dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-clients</artifactId>
        <version>${{kafka.version}}</version></dependency><dependency><groupId>org.apache.commons</groupId>
        <artifactId>commons-pool2</artifactId></dependency></dependencies></project>""".encode(),
    )
    for group, artifact, version in (
        ("org.apache.spark", f"spark-sql-kafka-0-10_{scala}", spark),
        ("org.apache.spark", f"spark-token-provider-kafka-0-10_{scala}", spark),
        ("org.apache.kafka", "kafka-clients", args["KAFKA_CLIENTS_VERSION"]),
        ("org.apache.commons", "commons-pool2", args["COMMONS_POOL2_VERSION"]),
    ):
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
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(jars.parents[1]),
        **args,
        "MAVEN_REPOSITORY": repo.as_uri(),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / CONNECTOR_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    return result, jars


def test_dockerfile_jar_step_adds_the_connector(tmp_path):
    result, jars = _run_jar_step(tmp_path)
    assert result.returncode == 0, f"the Dockerfile's jar step failed: {result.stderr}"
    args = dockerfile_args(DOCKERFILE.read_text())
    spark, scala = args["SPARK_VERSION"], args["SCALA_BINARY_VERSION"]
    expected = {
        f"spark-sql-kafka-0-10_{scala}-{spark}.jar",
        f"spark-token-provider-kafka-0-10_{scala}-{spark}.jar",
        f"kafka-clients-{args['KAFKA_CLIENTS_VERSION']}.jar",
        f"commons-pool2-{args['COMMONS_POOL2_VERSION']}.jar",
    }
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


def _unknown_kafka_property(c):
    _service(c, "predict")["environment"]["STREAMFIT_KAFKA__NO_SUCH_PROPERTY"] = "1"


def _invalid_value(c):
    _service(c, "train")["environment"]["STREAMFIT_PS_PORT"] = "not-a-port"


def _ps_on_loopback(c):
    cmd = _service(c, "ps")["command"]
    del cmd[cmd.index("--host") : cmd.index("--host") + 2]


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


def _local_spark(c):
    _service(c, "predict")["environment"]["STREAMFIT_SPARK_MASTER"] = "local[2]"


def _greedy_train(c):
    environment = _service(c, "train")["environment"]
    conf = json.loads(environment["STREAMFIT_SPARK_CONF"])
    del conf["spark.cores.max"]
    environment["STREAMFIT_SPARK_CONF"] = json.dumps(conf)


def _driver_unreachable(c):
    environment = _service(c, "predict")["environment"]
    conf = json.loads(environment["STREAMFIT_SPARK_CONF"])
    del conf["spark.driver.host"]
    environment["STREAMFIT_SPARK_CONF"] = json.dumps(conf)


def _worker_without_registry(c):
    del c["services"]["spark-worker"]["volumes"]


def _no_spark_ui(c):
    del c["services"]["spark-master"]["ports"]


@pytest.mark.parametrize(
    "mutate, check, expected",
    [
        (_bogus_flag, check_commands, "unrecognized arguments: --no-such-flag"),
        (_bogus_subcommand, check_commands, "invalid choice: 'make'"),
        (_wrong_source, check_commands, "makes 10 features but model 'higgs'"),
        (_unknown_setting, check_environment, "STREAMFIT_NO_SUCH_SETTING is not a streamfit setting"),
        (_unknown_kafka_property, check_environment, "unknown Kafka client property 'NO_SUCH_PROPERTY'"),
        (_invalid_value, check_environment, "ps_port"),
        (_ps_on_loopback, check_ports, "training workers in other containers cannot reach it"),
        (_wrong_published_port, check_ports, "publishes container port 8080"),
        (_undeclared_volume, check_volumes, "volume 'registry'"),
        (_latest_kafka, check_images, "'apache/kafka:latest' is not pinned"),
        (_no_wait_for_ps, check_dependencies, "does not wait for the parameter server"),
        (_local_spark, check_spark, "spark_master is 'local[2]', not the cluster's master spark://spark-master:7077"),
        (_greedy_train, check_spark, "no spark.cores.max in spark_conf"),
        (_driver_unreachable, check_spark, "executors reach the driver by its service name 'predict'"),
        (_worker_without_registry, check_spark, "is not the volume"),
        (_no_spark_ui, check_spark, "the Spark web UI (port 8080) is not published"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
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
    problems = check_grafana(
        compose,
        yaml.safe_load(GRAFANA_DATASOURCES.read_text()),
        yaml.safe_load(GRAFANA_PROVIDERS.read_text()),
        dashboard,
    )
    assert any("streamfit_made_up_total is not exported" in p for p in problems), problems


def test_dockerfile_check_refuses_another_spark_version():
    text = re.sub(r"^ARG SPARK_VERSION=\S+", "ARG SPARK_VERSION=4.0.0", DOCKERFILE.read_text(), flags=re.M)
    problems = check_dockerfile(text, tomllib.loads((ROOT / "pyproject.toml").read_text()))
    assert any("SPARK_VERSION=4.0.0 but pyproject.toml pins" in p for p in problems), problems


def test_promql_metric_names():
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(streamfit_http_request_duration_seconds_bucket"
        '{route="/v1/models/{model}:predict"}[5m] offset 1m))) / on(job) up'
    )
    assert promql_metrics(expr) == {"streamfit_http_request_duration_seconds_bucket", "up"}


def test_dockerfile_check_refuses_a_script_dockerignore_keeps_out(tmp_path):
    root = _deployment_copy(tmp_path)
    ignore = root / ".dockerignore"
    ignore.write_text(ignore.read_text().replace(f"!{CONNECTOR_SCRIPT}\n", ""))
    problems = check_dockerfile(DOCKERFILE.read_text(), tomllib.loads((ROOT / "pyproject.toml").read_text()), root)
    assert any(f".dockerignore keeps {CONNECTOR_SCRIPT} out of the build context" in p for p in problems), problems


def test_dockerignore_patterns():
    patterns = ["# comment", "tests", "**/__pycache__", "deploy", "!deploy/fetch_kafka_connector.py", "*.csv"]
    assert dockerignored("tests/test_compose.py", patterns)
    assert dockerignored("__pycache__", patterns) and dockerignored("pipeline/__pycache__/x.pyc", patterns)
    assert dockerignored("deploy/check.py", patterns) and dockerignored("data.csv", patterns)
    assert not dockerignored("deploy/fetch_kafka_connector.py", patterns)
    assert not dockerignored("pipeline", patterns) and not dockerignored("pyproject.toml", patterns)


# ------------------------------------------------------------------------------------------------
# the tool: python -m deploy.check


def _deployment_copy(tmp_path: Path) -> Path:
    """A copy of the repository's deployment files (what ``python -m deploy.check --root`` reads), with
    links to the rest (the Dockerfile COPYs the packages and README.md)."""
    root = tmp_path / "repo"
    root.mkdir()
    copied = ("docker-compose.yml", "Dockerfile", ".dockerignore", "pyproject.toml")
    for name in copied:
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "deploy", root / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    for entry in ROOT.iterdir():
        if entry.name not in {*copied, "deploy", ".git", ".venv"}:
            (root / entry.name).symlink_to(entry)
    return root


def _deploy_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.check", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_deploy_check_passes_on_the_repository():
    result = _deploy_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deploy.check: all 11 checks pass" in result.stdout, result.stdout


def _break_compose(root: Path) -> None:
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    _latest_kafka(compose)
    (root / "docker-compose.yml").write_text(yaml.safe_dump(compose))


def _drop_connector_step(root: Path) -> None:
    dockerfile = root / "Dockerfile"
    dockerfile.write_text(
        "\n".join(line for line in dockerfile.read_text().splitlines() if "fetch_kafka_connector.py" not in line)
    )


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_break_compose, "check_images: service 'kafka': image 'apache/kafka:latest' is not pinned to a version tag"),
        (_drop_connector_step, f"check_dockerfile: no step COPYing {CONNECTOR_SCRIPT} into the image"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_deploy_check_refuses_a_broken_copy(tmp_path, mutate, expected):
    root = _deployment_copy(tmp_path)
    mutate(root)
    result = _deploy_check("--root", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stderr, result.stderr
    assert "deploy.check: 1 problem(s) in 1 of 11 checks" in result.stderr, result.stderr
