"""Add Spark's Kafka connector to pyspark's jars directory: a step of the Dockerfile's image build.

The Dockerfile COPYs this script and runs it with ``python`` once pyproject.toml's dependencies are
installed. It reads the Dockerfile's build args from the environment: SPARK_VERSION and
SCALA_BINARY_VERSION (those of the installed pyspark), KAFKA_CLIENTS_VERSION and
COMMONS_POOL2_VERSION (the versions of the connector's two runtime dependencies that pyspark does
not ship, checked against the connector's POM) and MAVEN_REPOSITORY. It downloads
spark-sql-kafka-0-10, spark-token-provider-kafka-0-10, kafka-clients and commons-pool2, checks each
jar against the repository's SHA-1 file and writes it into pyspark's jars directory, which is on the
classpath of every Spark JVM pyspark starts. Any disagreement ends it with a message and exit
status 1. It needs nothing but the standard library and pyspark.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Mapping

NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def url(repository: str, group: str, artifact: str, version: str, ext: str) -> str:
    return f"{repository}/{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.{ext}"


def fetch(address: str) -> bytes:
    with urllib.request.urlopen(address, timeout=120) as answer:
        return answer.read()


def pom(repository: str, group: str, artifact: str, version: str) -> ET.Element:
    return ET.fromstring(fetch(url(repository, group, artifact, version, "pom")))


def coordinates(element: ET.Element) -> tuple[str | None, ...]:
    return tuple(element.findtext(f"m:{key}", namespaces=NS) for key in ("groupId", "artifactId", "version"))


def properties(repository: str, root: ET.Element) -> dict[str, str]:
    """The POM's properties over its parents' (a dependency's version may read ${kafka.version})."""
    parent = root.find("m:parent", NS)
    found = properties(repository, pom(repository, *coordinates(parent))) if parent is not None else {}
    found["project.version"] = root.findtext("m:version", namespaces=NS) or found.get("project.version")
    for prop in root.findall("m:properties/*", NS):
        found[prop.tag.split("}")[-1]] = (prop.text or "").strip()
    return found


def dependency_version(repository: str, root: ET.Element, group: str, artifact: str) -> str:
    """The version of a dependency the POM declares: its own, or managed by a parent; ${properties} resolved."""
    declared = [
        dep for dep in root.findall("m:dependencies/m:dependency", NS) if coordinates(dep)[:2] == (group, artifact)
    ]
    if not declared:
        sys.exit(
            f"{group}:{artifact} is no longer a dependency in the connector's POM: update "
            "deploy/fetch_kafka_connector.py"
        )
    version, node = coordinates(declared[0])[2], root
    while not version and node is not None:
        managed = node.findall("m:dependencyManagement/m:dependencies/m:dependency", NS)
        version = next((coordinates(dep)[2] for dep in managed if coordinates(dep)[:2] == (group, artifact)), None)
        parent = node.find("m:parent", NS)
        node = pom(repository, *coordinates(parent)) if parent is not None and not version else None
    version = (version or "").strip()
    if version.startswith("${"):
        version = properties(repository, root).get(version[2:-1], version)
    return version


def main(env: Mapping[str, str] = os.environ) -> None:
    import pyspark

    spark, scala = env["SPARK_VERSION"], env["SCALA_BINARY_VERSION"]
    repository = env["MAVEN_REPOSITORY"].rstrip("/")
    jars = os.path.join(os.path.dirname(pyspark.__file__), "jars")
    if pyspark.__version__ != spark:
        sys.exit(
            f"pyspark {pyspark.__version__} is installed but SPARK_VERSION={spark}: set the build arg to the "
            "version pyproject.toml pins"
        )
    if not os.path.exists(os.path.join(jars, f"spark-core_{scala}-{spark}.jar")):
        sys.exit(f"pyspark's jars are not built for Scala {scala}: fix SCALA_BINARY_VERSION")

    connector = pom(repository, "org.apache.spark", f"spark-sql-kafka-0-10_{scala}", spark)
    for group, artifact, pinned in (
        ("org.apache.kafka", "kafka-clients", env["KAFKA_CLIENTS_VERSION"]),
        ("org.apache.commons", "commons-pool2", env["COMMONS_POOL2_VERSION"]),
    ):
        wanted = dependency_version(repository, connector, group, artifact)
        if wanted != pinned:
            sys.exit(
                f"spark-sql-kafka-0-10_{scala} {spark} depends on {artifact} {wanted}, but the Dockerfile pins "
                f"{pinned}: set the build arg to {wanted}"
            )

    for group, artifact, version in (
        ("org.apache.spark", f"spark-sql-kafka-0-10_{scala}", spark),
        ("org.apache.spark", f"spark-token-provider-kafka-0-10_{scala}", spark),
        ("org.apache.kafka", "kafka-clients", env["KAFKA_CLIENTS_VERSION"]),
        ("org.apache.commons", "commons-pool2", env["COMMONS_POOL2_VERSION"]),
    ):
        data = fetch(url(repository, group, artifact, version, "jar"))
        expected = fetch(url(repository, group, artifact, version, "jar.sha1")).decode().split()[0]
        if hashlib.sha1(data).hexdigest() != expected:
            sys.exit(f"{artifact}-{version}.jar does not match its SHA-1 on {repository}")
        with open(os.path.join(jars, f"{artifact}-{version}.jar"), "wb") as out:
            out.write(data)
        print(f"added {artifact}-{version}.jar to {jars}")


if __name__ == "__main__":
    main()
