"""Kafka over TLS and SASL, end to end, and compression: every client streamfit opens reaches the cluster
through a TLS-terminating proxy in front of the embedded broker (it advertises itself, so no client can
bypass it: a TLS client that reached the plaintext broker would fail), with a CA and certificate made
here; a client trusting another CA fails with an error that says so. A second proxy also checks
SASL/PLAIN credentials (noida-db takes any), and a third asks for client certificates (mutual TLS).
The proxies read the codec of every produced record batch, which shows lz4 on the producer's and the
prediction writer's batches."""

from __future__ import annotations

import subprocess
import uuid

import orjson
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from kafka import TopicPartition

from pipeline.kafka import KafkaTlsError, KafkaUnavailable, consumer, ensure_topics, fast_producer, producer
from pipeline.spark.offsets import KafkaOffsetReader
from pipeline.spark.source import NAME
from tests.helpers import STREAMFIT
from tests.tls_proxy import TlsProxy, make_ca, make_certificate
from tests.up_process import UpProcess
from tests.waiting import wait_until

USER, PASSWORD = "streamfit", "s3cret-pw"
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """(the CA, another CA, the broker's certificate file, its key file)."""
    directory = tmp_path_factory.mktemp("tls")
    ca, ca_key, ca_cert = make_ca(directory, "streamfit-test-ca")
    other_ca, _, _ = make_ca(directory, "another-ca")
    return (ca, other_ca, *make_certificate(directory, ca_key, ca_cert))


@pytest.fixture(scope="module")
def tls(kafka, certificates):
    """(bootstrap over TLS, the CA that signed its certificate, another CA, the proxy)."""
    ca, other_ca, certfile, keyfile = certificates
    proxy = TlsProxy(kafka, certfile, keyfile)
    bootstrap = proxy.start()
    yield bootstrap, ca, other_ca, proxy
    proxy.stop()


@pytest.fixture(scope="module")
def mutual(kafka, certificates, tmp_path_factory):
    """(bootstrap over mutual TLS, the CA, a client certificate file and its key file signed by that CA)."""
    ca, _, certfile, keyfile = certificates
    directory = tmp_path_factory.mktemp("client-tls")
    client_ca, client_ca_key, client_ca_cert = make_ca(directory, "client-ca")
    client = make_certificate(directory, client_ca_key, client_ca_cert, name="client", usage=CLIENT_AUTH)
    proxy = TlsProxy(kafka, certfile, keyfile, client_ca=client_ca)
    bootstrap = proxy.start()
    yield bootstrap, ca, *client
    proxy.stop()


@pytest.fixture(scope="module")
def sasl(kafka, certificates):
    """(bootstrap over TLS where SASL/PLAIN user USER must give PASSWORD, the CA, the proxy)."""
    ca, _, certfile, keyfile = certificates
    proxy = TlsProxy(kafka, certfile, keyfile, credentials=(USER, PASSWORD))
    bootstrap = proxy.start()
    yield bootstrap, ca, proxy
    proxy.stop()


def _ssl(ca, **more) -> dict[str, str]:
    return {"security.protocol": "SSL", "ssl.cafile": str(ca), **more}


def _sasl_ssl(ca, password: str = PASSWORD) -> dict[str, str]:
    return _ssl(ca) | {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.plain.username": USER,
        "sasl.plain.password": password,
    }


def _send_acknowledged(bootstrap: str, properties: dict, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """Send ``records`` (key, value) through both producers, kafka-python's and librdkafka's, and wait
    until the broker acknowledged every one."""
    slow = producer(bootstrap, 10, properties)
    fast = fast_producer(bootstrap, 10, "confluent", properties=properties)
    try:
        futures = [kafka.send(topic, key=key, value=value) for kafka in (slow, fast) for key, value in records]
        fast.flush(10)
        slow.flush(10)
        assert all(f.get(10) for f in futures)
    finally:
        slow.close(5)
        fast.close(5)


def _read_all(bootstrap: str, properties: dict, topic: str) -> list:
    """Every record of ``topic`` up to its end offsets now, read over TLS."""
    reader = consumer(bootstrap, 10, properties)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        reader.assign(partitions)
        reader.seek_to_beginning()
        ends = reader.end_offsets(partitions)
        records: list = []
        wait_until(
            lambda: (
                records.extend(r for rs in reader.poll(timeout_ms=200).values() for r in rs)
                or all(reader.position(tp) >= ends[tp] for tp in partitions)
            ),
            30,
            message=lambda: f"{len(records)} records of {topic}, ends {ends}",
        )
        return records
    finally:
        reader.close()


def test_both_producers_admin_and_consumer_work_over_tls_with_lz4(tls, topic):
    bootstrap, ca, _, proxy = tls
    properties = _ssl(ca, **{"compression.type": "lz4"})
    ensure_topics(bootstrap, {topic: 2}, 10, properties)
    _send_acknowledged(bootstrap, properties, topic, [(b"%d" % i, b"x" * 200) for i in range(50)])
    assert len(_read_all(bootstrap, properties, topic)) == 100
    assert proxy.codecs[topic] == {"lz4"}
    assert proxy.batch_bytes[topic] < 100 * 200 / 4  # 100 values of 200 repeated bytes, compressed


def test_a_client_trusting_another_ca_fails_naming_the_tls_problem(tls, topic):
    bootstrap, _, other_ca, _ = tls
    wrong = _ssl(other_ca)
    for connect in (
        lambda: consumer(bootstrap, 3, wrong),
        lambda: fast_producer(bootstrap, 3, "confluent", properties=wrong),
        lambda: producer(bootstrap, 3, wrong),
        lambda: KafkaOffsetReader(bootstrap, [topic], 3, wrong),
    ):
        with pytest.raises(KafkaTlsError, match=f"TLS handshake with the Kafka broker at {bootstrap} failed: "):
            connect()
    with pytest.raises(KafkaTlsError, match="CERTIFICATE_VERIFY_FAILED.*another-ca.pem"):
        consumer(bootstrap, 3, wrong)


def test_client_certificates_reach_both_producers_admin_and_consumers(mutual, topic):
    bootstrap, ca, client_cert, client_key = mutual
    properties = _ssl(ca, **{"ssl.certfile": str(client_cert), "ssl.keyfile": str(client_key)})
    ensure_topics(bootstrap, {topic: 1}, 10, properties)
    _send_acknowledged(bootstrap, properties, topic, [(None, b"m%d" % i) for i in range(20)])
    assert len(_read_all(bootstrap, properties, topic)) == 40
    reader = KafkaOffsetReader(bootstrap, [topic], 5, properties)
    try:
        assert reader.latest() == {topic: {"0": 40}}
    finally:
        reader.close()
    without = _ssl(ca)  # the right CA, no client certificate
    for connect in (lambda: consumer(bootstrap, 3, without), lambda: producer(bootstrap, 3, without)):
        with pytest.raises(KafkaTlsError, match="refused this client's TLS certificate.*ssl.certfile \\(not set\\)"):
            connect()


def test_sasl_plain_reaches_both_producers_admin_and_consumers(sasl, topic):
    bootstrap, ca, proxy = sasl
    properties = _sasl_ssl(ca)
    ensure_topics(bootstrap, {topic: 1}, 10, properties)
    _send_acknowledged(bootstrap, properties, topic, [(None, b"v")])
    assert len(_read_all(bootstrap, properties, topic)) == 2
    reader = KafkaOffsetReader(bootstrap, [topic], 10, properties)
    assert reader.latest() == {topic: {"0": 2}}
    reader.close()
    assert set(proxy.authenticated) == {USER} and not proxy.refused, proxy.refused
    for connect in (
        lambda: consumer(bootstrap, 3, _sasl_ssl(ca, "wrong")),
        lambda: fast_producer(bootstrap, 3, "confluent", properties=_sasl_ssl(ca, "wrong")),
    ):
        with pytest.raises(KafkaUnavailable, match="SASL PLAIN user 'streamfit': check kafka sasl.mechanism"):
            connect()
    assert f"wrong password for {USER!r}" in proxy.refused
    with pytest.raises(KafkaUnavailable):
        consumer(bootstrap, 3, _ssl(ca))  # TLS without SASL
    assert any(r.endswith("before authenticating") for r in proxy.refused), proxy.refused


def test_the_spark_source_reads_and_writes_over_tls_with_headers_and_lz4(tls, spark, topic):
    bootstrap, ca, _, proxy = tls
    ensure_topics(bootstrap, {topic: 2}, 10, _ssl(ca))
    options = {
        "kafka.bootstrap.servers": bootstrap,
        "kafka.security.protocol": "SSL",
        "kafka.ssl.cafile": str(ca),
    }
    rows = spark.createDataFrame(
        [(f"k{i}", f"v{i}", [(f"h{i}", b"\x00\x01")]) for i in range(40)],
        "key string, value string, headers array<struct<key: string, value: binary>>",
    )
    rows.write.format(NAME).options(**options).option("kafka.compression.type", "lz4").option("topic", topic).mode(
        "append"
    ).save()
    back = spark.read.format(NAME).options(**options).option("subscribe", topic).option("includeHeaders", "true").load()
    got = {
        (r.key.decode(), r.value.decode(), tuple((h.key, bytes(h.value)) for h in r.headers)) for r in back.collect()
    }
    assert got == {(f"k{i}", f"v{i}", ((f"h{i}", b"\x00\x01"),)) for i in range(40)}
    assert proxy.codecs[topic] == {"lz4"}


@pytest.mark.slow
def test_the_pipeline_runs_over_tls_with_sasl(sasl, tmp_path):
    """``streamfit up`` on the TLS cluster with SASL/PLAIN: produce, predict (Spark source and writer), train,
    model-updates and serving's follower all connect through TLS as the SASL user; events and predictions
    are written with lz4."""
    bootstrap, ca, proxy = sasl
    prefix = f"tls-{uuid.uuid4().hex[:8]}-"
    names = ("events", "dlq", "predictions", "model_updates", "training_metrics")
    env = {
        "STREAMFIT_KAFKA_BOOTSTRAP": bootstrap,
        "STREAMFIT_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMFIT_KAFKA__SSL_CAFILE": str(ca),
        "STREAMFIT_KAFKA__SASL_MECHANISM": "PLAIN",
        "STREAMFIT_KAFKA__SASL_PLAIN_USERNAME": USER,
        "STREAMFIT_KAFKA__SASL_PLAIN_PASSWORD": PASSWORD,
        "STREAMFIT_KAFKA__COMPRESSION_TYPE": "lz4",
        "STREAMFIT_PS_PUBLISH_EVERY_S": "4",
        "STREAMFIT_GATE_WINDOW": "500",
        "STREAMFIT_PREQUENTIAL_WINDOW": "500",
        **{f"STREAMFIT_TOPIC_{name.upper()}": prefix + name for name in names},
    }
    refused, authenticated = len(proxy.refused), len(proxy.authenticated)
    run = UpProcess(tmp_path / "home", 100, rate=200, env=env)
    try:
        status = run.wait(480)
    finally:
        run.kill()
    output = "\n".join(run.output)
    assert status == 0, output
    assert proxy.refused[refused:] == [] and len(proxy.authenticated) - authenticated > 10, proxy.refused[refused:]
    properties = _sasl_ssl(ca)
    predictions = [orjson.loads(r.value) for r in _read_all(bootstrap, properties, prefix + "predictions")]
    events = {r.key.decode() for r in _read_all(bootstrap, properties, prefix + "events")}
    assert predictions and {p["id"] for p in predictions} <= events
    trained = [orjson.loads(r.value) for r in _read_all(bootstrap, properties, prefix + "training_metrics")]
    assert sum(m.get("rows", 0) for m in trained) > 0, trained
    updates = [orjson.loads(r.value) for r in _read_all(bootstrap, properties, prefix + "model_updates")]
    assert any(u["alias"] == "champion" and u["version"] > 1 for u in updates), updates
    serve_log = (tmp_path / "home" / "logs" / "serve.log").read_text()
    assert f"following {prefix}model_updates on {bootstrap}" in serve_log, serve_log[-3000:]
    last = [line for line in run.output if line.startswith("status ")][-1]
    assert int(dict(item.split("=", 1) for item in last.split()[1:])["served"]) > 1, last
    assert proxy.codecs[prefix + "events"] == {"lz4"}
    assert proxy.codecs[prefix + "predictions"] == {"lz4"}


def test_streamfit_produce_with_another_ca_says_so_without_a_traceback(tls, cli_env):
    bootstrap, _, other_ca, _ = tls
    env = cli_env | {
        "STREAMFIT_KAFKA_BOOTSTRAP": bootstrap,
        "STREAMFIT_KAFKA__SECURITY_PROTOCOL": "SSL",
        "STREAMFIT_KAFKA__SSL_CAFILE": str(other_ca),
        "STREAMFIT_KAFKA_TIMEOUT_S": "3",
    }
    done = subprocess.run(
        [*STREAMFIT, "produce", "--source", "synth:hyperplane", "--limit", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "TLS handshake with the Kafka broker" in done.stderr and "Traceback" not in done.stderr, done.stderr
