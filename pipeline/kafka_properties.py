"""Kafka client properties, by Kafka's own names, for every client streamfit opens.

A user writes them once, in the ``kafka`` setting (``security.protocol``, ``ssl.cafile``,
``sasl.mechanism``, ``sasl.plain.username``, ``compression.type``, ``acks``, ``linger.ms``, ...);
this module is the one mapping from those names to kafka-python's keyword arguments, to
librdkafka's configuration and to the ``kafka.*`` options of Spark's Kafka sources (Java's names
for Spark's own connector). A name it does not know is refused, naming it: a misspelt
``security.protocol`` must not quietly mean plaintext. Secret values never show in ``repr``/``str``.

>>> props = KafkaProperties({"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
...     "sasl.plain.username": "app", "sasl.plain.password": "hunter2", "compression.type": "zstd"})
>>> props
KafkaProperties({'security.protocol': 'SASL_SSL', 'sasl.mechanism': 'PLAIN', 'sasl.plain.username': 'app', \
'sasl.plain.password': '**********', 'compression.type': 'zstd'})
>>> python_kwargs(props, "consumer")["sasl_plain_password"]
'hunter2'
>>> librdkafka_config(props)["sasl.password"], librdkafka_config(props)["compression.type"]
('hunter2', 'zstd')
>>> KafkaProperties({"securty.protocol": "SSL"})
Traceback (most recent call last):
...
pipeline.kafka_properties.KafkaPropertyError: unknown Kafka client property 'securty.protocol'; known: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_core import core_schema

from pipeline.errors import StreamfitError

Role = Literal["producer", "consumer", "admin"]
ALL_ROLES: frozenset[Role] = frozenset({"producer", "consumer", "admin"})
PRODUCER: frozenset[Role] = frozenset({"producer"})
REDACTED = "**********"


class KafkaPropertyError(StreamfitError, ValueError):
    """A Kafka client property that is unknown, or whose value is not one Kafka accepts; names it."""


def _choice(*allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.upper()

    return check


def _lower_choice(*allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.lower()

    return check


def _count(value: str) -> str:
    if not value.isdigit():
        raise ValueError("must be a non-negative integer")
    return value


def _boolean(value: str) -> str:
    if value.lower() not in ("true", "false"):
        raise ValueError("must be true or false")
    return value.lower()


def _text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _acks(value: str) -> str:
    if value.lower() not in ("all", "-1", "0", "1"):
        raise ValueError("must be all, -1, 0 or 1")
    return "all" if value in ("all", "-1") else value


@dataclass(frozen=True)
class Property:
    """How one Kafka property reaches each client: kafka-python's keyword, librdkafka's and Java's names."""

    check: Callable[[str], str]
    python: str
    librdkafka: str | None
    java: str | None
    roles: frozenset[Role] = ALL_ROLES
    secret: bool = False


PROPERTIES: dict[str, Property] = {
    "security.protocol": Property(
        _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "security_protocol",
        "security.protocol",
        "security.protocol",
    ),
    "ssl.cafile": Property(_text, "ssl_cafile", "ssl.ca.location", "ssl.truststore.location"),
    "ssl.certfile": Property(_text, "ssl_certfile", "ssl.certificate.location", None),
    "ssl.keyfile": Property(_text, "ssl_keyfile", "ssl.key.location", None),
    "ssl.password": Property(_text, "ssl_password", "ssl.key.password", "ssl.key.password", secret=True),
    "ssl.check.hostname": Property(
        _boolean, "ssl_check_hostname", "ssl.endpoint.identification.algorithm", "ssl.endpoint.identification.algorithm"
    ),
    "sasl.mechanism": Property(
        _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), "sasl_mechanism", "sasl.mechanism", "sasl.mechanism"
    ),
    "sasl.plain.username": Property(_text, "sasl_plain_username", "sasl.username", None),
    "sasl.plain.password": Property(_text, "sasl_plain_password", "sasl.password", None, secret=True),
    "compression.type": Property(
        _lower_choice("none", "gzip", "snappy", "lz4", "zstd"),
        "compression_type",
        "compression.type",
        "compression.type",
        PRODUCER,
    ),
    "acks": Property(_acks, "acks", "acks", "acks", PRODUCER),
    "linger.ms": Property(_count, "linger_ms", "linger.ms", "linger.ms", PRODUCER),
    "batch.size": Property(_count, "batch_size", "batch.size", "batch.size", PRODUCER),
    "max.request.size": Property(_count, "max_request_size", "message.max.bytes", "max.request.size", PRODUCER),
}
"""Every property streamfit passes on. ``bootstrap.servers`` is the ``kafka_bootstrap`` setting;
``client.id`` streamfit sets per client (``streamfit-producer``, ``streamfit-spark-reader``, ...)."""


def property_name(name: str) -> str:
    """Kafka's name for ``name`` as an environment variable spells it (``SSL_CAFILE`` -> ``ssl.cafile``):
    Kafka's property names have no underscores, so each one stands for a dot."""
    return name.lower().replace("_", ".")


class KafkaProperties(Mapping[str, str]):
    """Checked Kafka client properties (name -> value as text), secret values redacted from ``repr``."""

    def __init__(self, values: Mapping[str, Any] | None = None):
        self._values: dict[str, str] = {}
        unknown = [name for name in values or {} if property_name(name) not in PROPERTIES]
        if unknown:
            raise KafkaPropertyError(
                f"unknown Kafka client {'property' if len(unknown) == 1 else 'properties'} "
                f"{', '.join(repr(n) for n in unknown)}; known: {', '.join(PROPERTIES)}"
            )
        for name, value in (values or {}).items():
            name = property_name(name)
            text = str(value).lower() if isinstance(value, bool) else str(value)
            try:
                self._values[name] = PROPERTIES[name].check(text.strip())
            except ValueError as exc:
                shown = REDACTED if PROPERTIES[name].secret else repr(text)
                raise KafkaPropertyError(f"Kafka client property {name}={shown}: {exc}") from None

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def redacted(self) -> dict[str, str]:
        """The properties with every secret value replaced by ``**********``: what may be shown or logged."""
        return {name: REDACTED if PROPERTIES[name].secret else value for name, value in self._values.items()}

    def __repr__(self) -> str:
        return f"KafkaProperties({self.redacted()!r})"

    __str__ = __repr__

    def environment(self, prefix: str) -> dict[str, str]:
        """The properties as environment variables ``<prefix>SSL_CAFILE=...``, as a child process reads them."""
        return {prefix + name.upper().replace(".", "_"): value for name, value in self._values.items()}

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        """As a settings field: built from any mapping, dumped redacted."""
        return core_schema.no_info_plain_validator_function(
            lambda value: value if isinstance(value, cls) else cls(_mapping(value)),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda value: value.redacted()),
        )


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of Kafka property names to values")
    return value


def _python_value(name: str, value: str) -> Any:
    if name in ("linger.ms", "batch.size", "max.request.size"):
        return int(value)
    if name == "ssl.check.hostname":
        return value == "true"
    if name == "compression.type":
        return None if value == "none" else value
    if name == "acks":
        return value if value == "all" else int(value)
    return value


def python_kwargs(properties: Mapping[str, str], role: Role) -> dict[str, Any]:
    """kafka-python keyword arguments of a ``role`` client (properties of other roles are left out)."""
    checked = properties if isinstance(properties, KafkaProperties) else KafkaProperties(properties)
    return {
        PROPERTIES[name].python: _python_value(name, value)
        for name, value in checked.items()
        if role in PROPERTIES[name].roles
    }


def librdkafka_config(properties: Mapping[str, str]) -> dict[str, str]:
    """librdkafka's configuration for the properties (a producer's: every property applies)."""
    checked = properties if isinstance(properties, KafkaProperties) else KafkaProperties(properties)
    config: dict[str, str] = {}
    for name, value in checked.items():
        target = PROPERTIES[name].librdkafka
        assert target is not None  # every property has a librdkafka name
        if name == "ssl.check.hostname":
            value = "https" if value == "true" else "none"
        config[target] = value
    if config.get("acks", "all") != "all":
        config["enable.idempotence"] = "false"  # librdkafka's idempotence needs acks=all, kafka-python drops it too
    return config


def spark_options(properties: Mapping[str, str], role: Role | None = None) -> dict[str, str]:
    """``kafka.<name>`` options of the ``streamfit-kafka`` Python source (a reader leaves the producer's out)."""
    checked = properties if isinstance(properties, KafkaProperties) else KafkaProperties(properties)
    return {f"kafka.{name}": v for name, v in checked.items() if role is None or role in PROPERTIES[name].roles}


JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def java_options(properties: Mapping[str, str], role: Role | None = None) -> dict[str, str]:
    """``kafka.<name>`` options of Spark's own Kafka connector, in Java client names: a PEM CA file is a
    PEM truststore, a SASL user and password a ``sasl.jaas.config`` line. Client certificate files have no
    Java equivalent here (Java wants a keystore) and are refused, naming them.

    >>> java_options({"ssl.cafile": "/ca.pem", "sasl.mechanism": "PLAIN", "sasl.plain.username": "u",
    ...     "sasl.plain.password": "p"})["kafka.sasl.jaas.config"]
    'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" password="p";'
    """
    checked = properties if isinstance(properties, KafkaProperties) else KafkaProperties(properties)
    options: dict[str, str] = {}
    unmappable = [name for name in checked if PROPERTIES[name].java is None and not name.startswith("sasl.plain.")]
    if unmappable:
        raise KafkaPropertyError(
            f"Spark's Kafka connector (kafka_source=native) cannot take {', '.join(unmappable)}: "
            "Java reads client certificates from a keystore; use kafka_source=python"
        )
    for name, value in checked.items():
        java = PROPERTIES[name].java
        if java is None or (role is not None and role not in PROPERTIES[name].roles):
            continue
        if name == "ssl.check.hostname":
            value = "https" if value == "true" else ""
        options[f"kafka.{java}"] = value
    if "ssl.cafile" in checked:
        options["kafka.ssl.truststore.type"] = "PEM"
    if "sasl.plain.username" in checked or "sasl.plain.password" in checked:
        module = JAAS_MODULES[checked.get("sasl.mechanism", "PLAIN")]
        username = _jaas_quoted(checked.get("sasl.plain.username", ""))
        password = _jaas_quoted(checked.get("sasl.plain.password", ""))
        options["kafka.sasl.jaas.config"] = f'{module} required username="{username}" password="{password}";'
    return options


def _jaas_quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def from_options(options: Mapping[str, str]) -> KafkaProperties:
    """The Kafka properties among a Spark source's options (``kafka.<name>``, any case; not bootstrap.servers)."""
    return KafkaProperties(
        {
            key[len("kafka.") :]: value
            for key, value in options.items()
            if key.lower().startswith("kafka.") and key.lower() != "kafka.bootstrap.servers"
        }
    )
