# syntax=docker/dockerfile:1
# The streamfit image: every component (`streamfit topics|models|ps|train|predict|serve|produce`)
# runs from it; docker-compose.yml picks the command. Spark runs in local mode inside the
# container, on a Debian JRE, with Spark's own Kafka connector added to pyspark's jars so
# `kafka_source=native` (format("kafka")) works and nothing is downloaded at run time.

FROM python:3.11.13-slim-bookworm

# Spark's Kafka connector for the pyspark pinned in pyproject.toml (pyspark==4.3.0, Scala 2.13),
# and the versions of its two runtime dependencies that pyspark does not ship; the build checks
# them against the connector's POM on Maven Central and fails with a message if they disagree.
ARG SPARK_VERSION=4.3.0
ARG SCALA_BINARY_VERSION=2.13
ARG KAFKA_CLIENTS_VERSION=3.9.2
ARG COMMONS_POOL2_VERSION=2.13.1
ARG MAVEN_REPOSITORY=https://repo1.maven.org/maven2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# Spark 4 needs Java 17 or 21 (pipeline/spark/session.py checks `java -version`).
# The man directory must exist for the JRE's postinst on slim images.
RUN set -eux; \
    mkdir -p /usr/share/man/man1; \
    apt-get update; \
    apt-get install -y --no-install-recommends openjdk-17-jre-headless procps; \
    rm -rf /var/lib/apt/lists/*; \
    java -version

WORKDIR /opt/streamfit

# The dependencies first (from pyproject.toml, so they stay cached while the code changes) ...
COPY pyproject.toml README.md ./
RUN set -eux; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

# ... then Spark's Kafka connector into pyspark's jars directory (on the classpath of every
# Spark JVM pyspark starts), checked against Maven Central's SHA-1 files.
RUN python - <<'PY'
import hashlib, os, sys, urllib.request
import xml.etree.ElementTree as ET

import pyspark

env = os.environ
spark, scala = env["SPARK_VERSION"], env["SCALA_BINARY_VERSION"]
repository = env["MAVEN_REPOSITORY"].rstrip("/")
jars = os.path.join(os.path.dirname(pyspark.__file__), "jars")
if pyspark.__version__ != spark:
    sys.exit(f"pyspark {pyspark.__version__} is installed but SPARK_VERSION={spark}: set the build arg to the "
             "version pyproject.toml pins")
if not os.path.exists(os.path.join(jars, f"spark-core_{scala}-{spark}.jar")):
    sys.exit(f"pyspark's jars are not built for Scala {scala}: fix SCALA_BINARY_VERSION")

NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def url(group, artifact, version, ext):
    return f"{repository}/{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.{ext}"


def fetch(address):
    with urllib.request.urlopen(address, timeout=120) as answer:
        return answer.read()


def pom(group, artifact, version):
    return ET.fromstring(fetch(url(group, artifact, version, "pom")))


def coordinates(element):
    return tuple(element.findtext(f"m:{key}", namespaces=NS) for key in ("groupId", "artifactId", "version"))


def properties(root):
    """The POM's properties over its parents' (a dependency's version may read ${kafka.version})."""
    parent = root.find("m:parent", NS)
    found = properties(pom(*coordinates(parent))) if parent is not None else {}
    found["project.version"] = root.findtext("m:version", namespaces=NS) or found.get("project.version")
    for prop in root.findall("m:properties/*", NS):
        found[prop.tag.split("}")[-1]] = (prop.text or "").strip()
    return found


def dependency_version(root, group, artifact):
    """The version of a dependency the POM declares: its own, or managed by a parent; ${properties} resolved."""
    declared = [dep for dep in root.findall("m:dependencies/m:dependency", NS) if coordinates(dep)[:2] == (group, artifact)]
    if not declared:
        sys.exit(f"{group}:{artifact} is no longer a dependency in the connector's POM: update this Dockerfile")
    version, node = coordinates(declared[0])[2], root
    while not version and node is not None:
        managed = node.findall("m:dependencyManagement/m:dependencies/m:dependency", NS)
        version = next((coordinates(dep)[2] for dep in managed if coordinates(dep)[:2] == (group, artifact)), None)
        parent = node.find("m:parent", NS)
        node = pom(*coordinates(parent)) if parent is not None and not version else None
    version = (version or "").strip()
    if version.startswith("${"):
        version = properties(root).get(version[2:-1], version)
    return version


connector = pom("org.apache.spark", f"spark-sql-kafka-0-10_{scala}", spark)
for group, artifact, pinned in (("org.apache.kafka", "kafka-clients", env["KAFKA_CLIENTS_VERSION"]),
                                ("org.apache.commons", "commons-pool2", env["COMMONS_POOL2_VERSION"])):
    wanted = dependency_version(connector, group, artifact)
    if wanted != pinned:
        sys.exit(f"spark-sql-kafka-0-10_{scala} {spark} depends on {artifact} {wanted}, but the Dockerfile pins "
                 f"{pinned}: set the build arg to {wanted}")

for group, artifact, version in (
        ("org.apache.spark", f"spark-sql-kafka-0-10_{scala}", spark),
        ("org.apache.spark", f"spark-token-provider-kafka-0-10_{scala}", spark),
        ("org.apache.kafka", "kafka-clients", env["KAFKA_CLIENTS_VERSION"]),
        ("org.apache.commons", "commons-pool2", env["COMMONS_POOL2_VERSION"])):
    data = fetch(url(group, artifact, version, "jar"))
    expected = fetch(url(group, artifact, version, "jar.sha1")).decode().split()[0]
    if hashlib.sha1(data).hexdigest() != expected:
        sys.exit(f"{artifact}-{version}.jar does not match its SHA-1 on {repository}")
    with open(os.path.join(jars, f"{artifact}-{version}.jar"), "wb") as out:
        out.write(data)
    print(f"added {artifact}-{version}.jar to {jars}")
PY

# ... then streamfit itself (no dependency changes: they are installed above).
COPY pipeline ./pipeline
COPY producers ./producers
COPY consumers ./consumers
COPY serving ./serving
RUN pip install --no-deps . && streamfit --help > /dev/null

# A non-root user; the registry and state directories exist with its ownership so named
# volumes mounted there start writable.
RUN set -eux; \
    useradd --system --uid 10001 --user-group --create-home --home-dir /home/streamfit streamfit; \
    mkdir -p /srv/streamfit/home /srv/streamfit/registry; \
    chown -R streamfit:streamfit /srv/streamfit
USER streamfit
WORKDIR /srv/streamfit

# serving; predict and train metrics; the parameter server
EXPOSE 8000 9108 9109 5700

CMD ["streamfit", "--help"]
