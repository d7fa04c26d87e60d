# syntax=docker/dockerfile:1
# The streamfit image: every component (`streamfit topics|models|ps|train|predict|serve|produce`)
# runs from it, and so do the Spark standalone master and workers (`spark-class ...Master|Worker`);
# docker-compose.yml picks the command. Spark runs on a Debian JRE, with Spark's own Kafka connector
# added to pyspark's jars (on every driver's and executor's classpath) so `kafka_source=native`
# (format("kafka")) works and nothing is downloaded at run time.

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
# Spark JVM pyspark starts), checked against Maven Central's SHA-1 files; the script reads the
# build args above from the environment and is removed once it has run.
COPY deploy/fetch_kafka_connector.py /tmp/fetch_kafka_connector.py
RUN python /tmp/fetch_kafka_connector.py && rm /tmp/fetch_kafka_connector.py

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
