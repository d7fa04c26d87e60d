"""The ``kafka`` setting: Kafka's property names, one mapping to every client, secrets kept out of sight."""

from __future__ import annotations

import logging

import pytest

from pipeline.kafka_properties import (
    PROPERTIES,
    KafkaProperties,
    KafkaPropertyError,
    java_options,
    librdkafka_config,
    python_kwargs,
    spark_options,
)
from pipeline.settings import SettingsError, load_settings
from pipeline.spark.offsets import OffsetError
from pipeline.spark.source import KafkaBatchWriter, KafkaStreamReader, KafkaStreamWriter
from pipeline.up import child_env

SASL_SSL = {
    "security.protocol": "SASL_SSL",
    "ssl.cafile": "/etc/kafka/ca.pem",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.plain.username": "streamfit",
    "sasl.plain.password": "s3cret-pw",
    "compression.type": "zstd",
    "acks": "1",
    "linger.ms": "20",
    "batch.size": "65536",
}


def test_one_mapping_to_kafka_python_librdkafka_and_java():
    props = KafkaProperties(SASL_SSL)
    assert python_kwargs(props, "producer") == {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": "/etc/kafka/ca.pem",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "streamfit",
        "sasl_plain_password": "s3cret-pw",
        "compression_type": "zstd",
        "acks": 1,
        "linger_ms": 20,
        "batch_size": 65536,
    }
    consumer = python_kwargs(props, "consumer")
    assert (
        "compression_type" not in consumer and "acks" not in consumer and consumer["ssl_cafile"] == "/etc/kafka/ca.pem"
    )
    assert librdkafka_config(props) == {
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": "/etc/kafka/ca.pem",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "streamfit",
        "sasl.password": "s3cret-pw",
        "compression.type": "zstd",
        "acks": "1",
        "linger.ms": "20",
        "batch.size": "65536",
        "enable.idempotence": "false",  # librdkafka refuses idempotence without acks=all
    }
    java = java_options(props)
    assert java["kafka.ssl.truststore.location"] == "/etc/kafka/ca.pem"
    assert java["kafka.ssl.truststore.type"] == "PEM"
    assert java["kafka.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="streamfit" password="s3cret-pw";'
    )
    assert "kafka.acks" not in java_options(props, "consumer") and java["kafka.compression.type"] == "zstd"
    assert spark_options(props)["kafka.sasl.plain.password"] == "s3cret-pw"


def test_every_property_reaches_kafka_python_and_librdkafka_by_a_name_they_know():
    from kafka import KafkaProducer

    for name, prop in PROPERTIES.items():
        assert prop.python in KafkaProducer.DEFAULT_CONFIG, name
        assert prop.librdkafka, name


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"securty.protocol": "SSL"}, "unknown Kafka client property 'securty.protocol'"),
        ({"bootstrap.servers": "a:1"}, "unknown Kafka client property 'bootstrap.servers'"),
        ({"security.protocol": "TLS"}, "security.protocol='TLS': must be one of PLAINTEXT, SSL, SASL_PLAINTEXT"),
        ({"compression.type": "brotli"}, "compression.type='brotli'"),
        ({"linger.ms": "soon"}, "linger.ms='soon': must be a non-negative integer"),
        ({"sasl.plain.password": ""}, r"sasl.plain.password=\*+: must not be empty"),
    ],
)
def test_an_unknown_name_or_a_bad_value_is_refused_naming_it(given, message):
    with pytest.raises(KafkaPropertyError, match=message):
        KafkaProperties(given)


def test_client_certificates_are_refused_for_spark_s_own_connector():
    with pytest.raises(KafkaPropertyError, match="cannot take ssl.certfile"):
        java_options({"ssl.certfile": "/c.pem"})


def test_settings_from_yaml_and_env_with_secrets_never_shown(tmp_path, monkeypatch, caplog):
    config = tmp_path / "streamfit.yaml"
    config.write_text("kafka:\n  security.protocol: SASL_SSL\n  sasl.plain.password: from-yaml\n  linger.ms: 10\n")
    monkeypatch.setenv("STREAMFIT_CONFIG", str(config))
    monkeypatch.setenv("STREAMFIT_KAFKA__SASL_PLAIN_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("STREAMFIT_KAFKA__SASL_MECHANISM", "PLAIN")
    settings = load_settings()
    assert dict(settings.kafka) == {
        "security.protocol": "SASL_SSL",
        "sasl.plain.password": "s3cret-pw",  # the environment wins over the file, key by key
        "linger.ms": "10",
        "sasl.mechanism": "PLAIN",
    }
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings: %s %r", settings, settings.kafka)
    shown = " ".join([repr(settings), str(settings), str(settings.model_dump()), caplog.text])
    assert "s3cret-pw" not in shown and "**********" in shown and "SASL_SSL" in shown


def test_a_misspelt_property_in_the_environment_stops_the_settings(monkeypatch):
    monkeypatch.setenv("STREAMFIT_KAFKA__SECURITY_PROTOKOL", "SSL")
    with pytest.raises(SettingsError, match="unknown Kafka client property .SECURITY_PROTOKOL."):
        load_settings()


def test_streamfit_up_passes_the_properties_to_its_children(monkeypatch):
    settings = load_settings(kafka={"ssl.cafile": "/ca.pem", "sasl.plain.password": "s3cret-pw"})
    env = child_env(settings, "127.0.0.1:9092")
    assert env["STREAMFIT_KAFKA__SSL_CAFILE"] == "/ca.pem"
    assert env["STREAMFIT_KAFKA__SASL_PLAIN_PASSWORD"] == "s3cret-pw"
    for name, value in env.items():
        if name.startswith("STREAMFIT_"):
            monkeypatch.setenv(name, value)
    assert load_settings().kafka == settings.kafka  # what a child reads back


def test_topics_take_partitions_and_replication_from_settings():
    from pipeline.kafka import topic_specs

    settings = load_settings(events_partitions=6, topic_partitions=2, topic_replication_factor=3)
    assert topic_specs(settings) == {
        "events": 6,
        "events.dlq": 2,
        "predictions": 6,
        "model-updates": 2,
        "training-metrics": 2,
    }
    assert load_settings().topic_replication_factor == -1  # the cluster's default.replication.factor


BASE = {"kafka.bootstrap.servers": "127.0.0.1:1"}


@pytest.mark.parametrize(
    ("make", "options", "named"),
    [
        (KafkaStreamReader, {"subscribe": "t", "subscribePatern": "t.*"}, "'subscribepatern' for stream reading"),
        (KafkaStreamReader, {"subscribe": "t", "endingOffsets": "latest"}, "'endingoffsets' for stream reading"),
        (KafkaStreamReader, {"subscribe": "t", "kafka.security.protokol": "SSL"}, "'security.protokol'"),
        (KafkaStreamWriter, {"topic": "t", "includeHeaders": "true"}, "'includeheaders' for writing"),
        (KafkaStreamReader, {"subscribe": "t", "assign": '{"t": [0]}'}, "exactly one of .*; got 'subscribe', 'assign'"),
        (KafkaStreamReader, {"assign": '["t"]'}, "assign must be JSON like"),
        (KafkaBatchWriter, {"topic": "t", "kafka.compression.type": "brotli"}, "compression.type='brotli'"),
    ],
)
def test_the_spark_source_refuses_an_option_it_does_not_understand(make, options, named):
    with pytest.raises(OffsetError, match=named):
        make(BASE | options)


def test_the_spark_source_takes_options_in_any_case_and_spark_s_own():
    reader = KafkaStreamReader(BASE | {"SUBSCRIBE": "t", "kafka.SSL.CAFILE": "/ca.pem", "includeheaders": "TRUE"})
    assert reader.options.include_headers and reader.options.properties == {"ssl.cafile": "/ca.pem"}
    writer = KafkaStreamWriter(BASE | {"topic": "t", "checkpointLocation": "/tmp/x", "kafka.acks": "all"})
    assert writer.options.properties == {"acks": "all"}
