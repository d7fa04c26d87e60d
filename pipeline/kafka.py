"""Kafka plumbing shared by every component: finding the cluster, topics, clients.

All talk to Kafka goes over the Kafka protocol, so the same code runs against the
embedded broker and a real Apache Kafka cluster. kafka-python does the reads, admin
and the small producers; the hot write path (``streamfit produce``, the Spark writer)
uses :func:`fast_producer`: librdkafka (confluent-kafka) when installed, whose producer
costs 2.9 µs of CPU per record here against kafka-python's 34 µs.

Every client takes ``properties``: the ``kafka`` setting's Kafka client properties (TLS, SASL,
compression, producer tuning; :mod:`pipeline.kafka_properties` maps them to each client). A cluster that
cannot be reached over TLS is named as such (:class:`KafkaTlsError`), not as one that does not answer.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, TypeVar, get_args

try:
    import confluent_kafka
except ImportError:  # pragma: no cover - kafka-python then does the hot path too
    confluent_kafka = None  # type: ignore[assignment]  # fast_producer checks for None and uses kafka-python

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import IllegalStateError, KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code

from pipeline.errors import StreamfitError
from pipeline.kafka_properties import KafkaProperties, Role, librdkafka_config, python_kwargs
from pipeline.settings import KafkaClient, Settings

log = logging.getLogger(__name__)

BROKER_FILE = "broker.json"


KAFKA_CLIENTS = get_args(KafkaClient)

_Client = TypeVar("_Client")


class KafkaUnavailable(StreamfitError, RuntimeError):
    """No Kafka cluster could be reached or found; the message says what to do."""


class KafkaTlsError(KafkaUnavailable):
    """The TLS handshake with the cluster failed (a CA that did not sign the broker's certificate, a
    name the certificate does not cover, a listener that does not speak TLS); the message says which."""


class DeliveryError(KafkaError):
    """librdkafka gave up on a record for a reason of its own (timed out, unknown partition, ...);
    a broker's error code raises kafka-python's class for it instead (``OutOfOrderSequenceNumberError``)."""


def broker_file(settings: Settings) -> Path:
    return settings.home / BROKER_FILE


def bootstrap(settings: Settings) -> str:
    """The cluster to use: ``STREAMFIT_KAFKA_BOOTSTRAP`` if set, else the running embedded broker."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    path = broker_file(settings)
    try:
        return json.loads(path.read_text())["bootstrap"]
    except FileNotFoundError:
        raise KafkaUnavailable(
            f"no Kafka configured: start one with `streamfit broker` (it writes {path}) "
            "or set STREAMFIT_KAFKA_BOOTSTRAP=host:port"
        ) from None
    except (ValueError, KeyError) as exc:
        raise KafkaUnavailable(f"{path} is unreadable ({exc}); restart `streamfit broker`") from None


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count for every topic streamfit uses."""
    return {
        settings.topic_events: settings.events_partitions,
        settings.topic_dlq: settings.topic_partitions,
        settings.topic_predictions: settings.events_partitions,
        settings.topic_model_updates: settings.topic_partitions,
        settings.topic_training_metrics: settings.topic_partitions,
    }


def admin(bootstrap_servers: str, timeout_s: float, properties: Mapping[str, str] | None = None) -> KafkaAdminClient:
    return _reached(
        KafkaAdminClient,
        bootstrap_servers,
        properties,
        "admin",
        request_timeout_ms=int(timeout_s * 1000),
        bootstrap_timeout_ms=int(timeout_s * 1000),
        client_id="streamfit-admin",
    )


def _reached(
    client: Callable[..., _Client],
    bootstrap_servers: str,
    properties: Mapping[str, str] | None,
    role: Role,
    **config: Any,
) -> _Client:
    """A kafka-python ``client`` of ``bootstrap_servers`` with the ``role``'s ``properties`` over ``config``
    (its constructor fails when no broker answers)."""
    try:
        return client(bootstrap_servers=bootstrap_servers, **(config | python_kwargs(properties or {}, role)))
    except KafkaError:
        raise unreachable(bootstrap_servers, properties) from None


def unreachable(bootstrap_servers: str, properties: Mapping[str, str] | None, cause: str = "") -> KafkaUnavailable:
    """The error for a cluster no client could reach: :class:`KafkaTlsError` naming the cause when a TLS
    handshake with it fails, else :class:`KafkaUnavailable` (with the client's ``cause`` when it gave one,
    and the SASL settings to check when SASL is on)."""
    checked = KafkaProperties(properties)
    problem = tls_problem(bootstrap_servers, checked)
    if problem:
        return KafkaTlsError(problem)
    message = f"no Kafka broker answers at {bootstrap_servers}" + (f": {cause}" if cause else "")
    if checked.get("security.protocol", "").startswith("SASL"):
        message += (
            f" (or none accepts SASL {checked.get('sasl.mechanism', 'PLAIN')} user "
            f"{checked.get('sasl.plain.username')!r}: check kafka sasl.mechanism, sasl.plain.username and "
            "sasl.plain.password)"
        )
    return KafkaUnavailable(message)


def tls_problem(bootstrap_servers: str, properties: KafkaProperties, timeout_s: float = 5.0) -> str | None:
    """Why a TLS client with ``properties`` cannot talk to ``bootstrap_servers``, or None (no TLS configured,
    a handshake that succeeds, or no server answering at all). Python's own TLS says what the clients'
    logs bury: an unknown CA, a certificate for another name, a plaintext listener."""
    if properties.get("security.protocol", "PLAINTEXT") not in ("SSL", "SASL_SSL"):
        return None
    cafile = properties.get("ssl.cafile")
    try:
        context = ssl.create_default_context(cafile=cafile)
        if "ssl.certfile" in properties:
            context.load_cert_chain(
                properties["ssl.certfile"], properties.get("ssl.keyfile"), properties.get("ssl.password")
            )
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load the TLS files of the kafka settings (ssl.cafile={cafile}): {exc}"
    context.check_hostname = properties.get("ssl.check.hostname", "true") == "true"
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
                with context.wrap_socket(sock, server_hostname=host) as tls:
                    return _refused_after_handshake(tls, server.strip(), properties)
        except ssl.SSLError as exc:
            return (
                f"TLS handshake with the Kafka broker at {server.strip()} failed: {exc.reason or exc} "
                f"(verify_message: {getattr(exc, 'verify_message', None) or '-'}); "
                f"check kafka ssl.cafile ({cafile or 'the system CAs'}) and that the broker listens with TLS there"
            )
        except OSError:
            continue
    return None


def _refused_after_handshake(tls: ssl.SSLSocket, server: str, properties: KafkaProperties) -> str | None:
    """A TLS 1.3 server checks the client's certificate after the handshake the client saw succeed: its
    refusal arrives on the first read, as an alert or the connection closed. A server that accepted waits
    for a request (the read times out): None."""
    tls.settimeout(0.5)
    try:
        why = "it closed the connection" if tls.recv(1) == b"" else None
    except ssl.SSLError as exc:
        why = str(exc.reason or exc)
    except ConnectionError as exc:
        why = f"it closed the connection ({exc})"
    except OSError:  # the timeout: nothing to say, as it should be
        why = None
    return why and (
        f"the Kafka broker at {server} refused this client's TLS certificate: {why}; check kafka ssl.certfile "
        f"({properties.get('ssl.certfile') or 'not set'}) and ssl.keyfile: the broker asks for a certificate "
        "its CA signed (mutual TLS)"
    )


def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    timeout_s: float = 15.0,
    properties: Mapping[str, str] | None = None,
    replication_factor: int = -1,
) -> list[str]:
    """Create the missing topics (``replication_factor`` -1: the broker's default); returns the names
    created. Existing topics are left as they are."""
    client = admin(bootstrap_servers, timeout_s, properties)
    try:
        existing = set(client.list_topics())
        missing = [
            NewTopic(name, partitions, replication_factor)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if missing:
            try:
                client.create_topics(missing, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass  # another process created them first
        _wait_for_topics(client, list(topics), timeout_s)
        return [t.name for t in missing]
    finally:
        client.close()


def _wait_for_topics(client: KafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """Topic creation is asynchronous on some brokers: wait until metadata lists every partition leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = client.describe_topics(names)
        ready = all(
            t["error_code"] == 0 and t["partitions"] and all(p["leader_id"] >= 0 for p in t["partitions"])
            for t in described
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise KafkaUnavailable(f"topics {names} not ready after {timeout_s:.0f}s")
        time.sleep(0.1)


def describe(
    bootstrap_servers: str, timeout_s: float = 15.0, properties: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Topic name -> partition count of every topic on the cluster, asked again until ``timeout_s`` passes
    when the broker drops the connection meanwhile (a consumer starting while its broker restarts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        client = admin(bootstrap_servers, max(1.0, deadline - time.monotonic()), properties)
        try:
            return {t["name"]: len(t["partitions"]) for t in client.describe_topics(client.list_topics())}
        except KafkaError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
        finally:
            client.close()


BATCH_BYTES = 256 * 1024
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def producer(
    bootstrap_servers: str, timeout_s: float = 15.0, properties: Mapping[str, str] | None = None, **overrides
) -> KafkaProducer:
    """A producer that waits for full acknowledgement, retries through a broker restart, and fails a
    send only once ``timeout_s`` (+5 s) passed without an acknowledgement. ``properties`` (the ``kafka``
    setting) come last: a user's ``acks`` or ``linger.ms`` wins."""
    config = dict(
        acks="all",
        linger_ms=5,
        batch_size=BATCH_BYTES,
        max_request_size=MAX_REQUEST_BYTES,
        retries=2**31
        - 1,  # as Apache Kafka's own client: retry until delivery_timeout_ms, so a broker restart loses nothing
        request_timeout_ms=int(timeout_s * 1000),
        max_block_ms=int(timeout_s * 1000),
        bootstrap_timeout_ms=int(timeout_s * 1000),
        delivery_timeout_ms=int(timeout_s * 1000) + 5000,
        client_id="streamfit-producer",
    )
    return _reached(KafkaProducer, bootstrap_servers, properties, "producer", **(config | overrides))


def fast_producer(
    bootstrap_servers: str,
    timeout_s: float = 15.0,
    client: KafkaClient = "auto",
    linger_ms: int = 5,
    client_id: str = "streamfit-producer",
    properties: Mapping[str, str] | None = None,
):
    """The hot write path's producer: ``send(topic, key=, value=, partition=, headers=)`` returning a future
    (``is_done``, ``get(timeout)``), ``flush(timeout)``, ``close(timeout)``, with :func:`producer`'s
    guarantees. ``auto``: librdkafka if confluent-kafka is installed, else kafka-python."""
    if client not in KAFKA_CLIENTS:
        raise ValueError(f"unknown Kafka client {client!r}; choose one of {', '.join(KAFKA_CLIENTS)}")
    if client == "kafka-python" or (client == "auto" and confluent_kafka is None):
        return producer(bootstrap_servers, timeout_s, properties, linger_ms=linger_ms, client_id=client_id)
    if confluent_kafka is None:
        raise KafkaUnavailable(
            "kafka_client=confluent, but confluent-kafka is not installed "
            "(pip install confluent-kafka, or set kafka_client=kafka-python)"
        )
    return ConfluentProducer(
        confluent_config(bootstrap_servers, timeout_s, linger_ms, client_id, properties), timeout_s, properties
    )


def confluent_config(
    bootstrap_servers: str,
    timeout_s: float = 15.0,
    linger_ms: int = 5,
    client_id: str = "streamfit-producer",
    properties: Mapping[str, str] | None = None,
) -> dict:
    """librdkafka's settings for :func:`producer`'s guarantees (idempotence retries until the delivery
    timeout); Kafka's murmur2 partitioner, so a key lands where kafka-python and Java put it. The
    ``properties`` (the ``kafka`` setting) come last."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": linger_ms,
        "batch.size": BATCH_BYTES,
        "message.max.bytes": MAX_REQUEST_BYTES,
        "request.timeout.ms": int(timeout_s * 1000),
        "message.timeout.ms": int(timeout_s * 1000) + 5000,
        "partitioner": "murmur2_random",
        "logger": logging.getLogger("librdkafka"),
    } | librdkafka_config(properties or {})


def _delivery_error(err, where: str) -> KafkaError:
    """A librdkafka error as an exception naming the record's place and the cause: a broker's error
    code gives kafka-python's class for it (``OutOfOrderSequenceNumberError``), a local one DeliveryError."""
    kind = for_code(err.code()) if err.code() > 0 else DeliveryError
    return kind(f"{where}: {err.str()} ({err.name()})")


def _place(topic: str, partition: int | None) -> str:
    return topic if partition is None or partition < 0 else f"{topic}[{partition}]"


def _fatal_error(exc: BaseException | None):
    """The fatal librdkafka error behind ``exc``, or None. confluent-kafka raises a fatal error from
    ``poll``/``flush``, as a SystemError chained to it when delivery callbacks ran in the same call."""
    while exc is not None:
        if (
            isinstance(exc, confluent_kafka.KafkaException)
            and exc.args
            and (exc.args[0].fatal() or exc.args[0].code() == confluent_kafka.KafkaError._FATAL)
        ):
            return exc.args[0]
        exc = exc.__cause__ or exc.__context__
    return None


class _Handle:
    """One librdkafka producer and the fatal error that ended it, if one did."""

    __slots__ = ("kafka", "fatal")

    def __init__(self, kafka):
        self.kafka, self.fatal = kafka, None


class Delivery:
    """One send's outcome, shaped like kafka-python's future; ``get`` serves librdkafka's callbacks
    (they only fire from ``poll``/``flush``) until this record's came. A record of a producer a fatal
    error ended has failed even if its callback never comes (confluent-kafka drops the callbacks it
    serves in the call that raises the fatal error)."""

    __slots__ = ("_owner", "_handle", "_done", "value", "exception")

    def __init__(self, owner: ConfluentProducer, handle: _Handle):
        self._owner, self._handle, self._done, self.value, self.exception = owner, handle, False, None, None

    def __call__(self, err, msg) -> None:
        if err is None:
            self.value = msg
        else:  # a record failed by a fatal error (or purged after one) says what the error was
            cause = self._handle.fatal if err.code() < 0 and self._handle.fatal else err
            self.exception = _delivery_error(cause, _place(msg.topic(), msg.partition()))
        self._done = True

    @property
    def is_done(self) -> bool:
        return self._done or self._handle.fatal is not None

    def get(self, timeout: float | None = None):
        """The acknowledged message (topic(), partition(), offset()); raises the record's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_done:
            wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if wait <= 0:
                raise KafkaTimeoutError(f"no acknowledgement within {timeout} s")
            self._owner.poll(wait)
        if self.exception is not None:
            raise self.exception
        if not self._done:
            raise _delivery_error(self._handle.fatal, "a record in flight")
        return self.value


class ConfluentProducer:
    """The subset of ``KafkaProducer`` the hot paths use, on librdkafka.

    A fatal error (librdkafka's idempotent producer gives up, e.g. on a broker restarted after a
    SIGKILL answering OutOfOrderSequenceNumber) fails every record in flight and would refuse all
    later ones: the next ``send`` starts a new librdkafka producer, so a caller that resends (the
    Sender) carries on, as it does with kafka-python.
    """

    def __init__(self, config: dict, timeout_s: float, properties: Mapping[str, str] | None = None):
        self.config, self.timeout_s, self.properties = config, timeout_s, properties
        self._closed = False
        self._handle = self._connect()

    def _connect(self) -> _Handle:
        kafka = confluent_kafka.Producer(self.config)
        try:
            kafka.list_topics(timeout=self.timeout_s)  # as kafka-python: an unreachable cluster fails here
        except confluent_kafka.KafkaException as exc:
            raise unreachable(self.config["bootstrap.servers"], self.properties, exc.args[0].str()) from None
        return _Handle(kafka)

    def _serve(self, handle: _Handle, call, *args):
        """``call(producer, *args)`` (poll, flush, purge); a fatal error ends ``handle`` instead of escaping."""
        try:
            return call(handle.kafka, *args)
        except (confluent_kafka.KafkaException, SystemError) as exc:
            self._end(handle, exc)
            return None

    def _end(self, handle: _Handle, exc: BaseException) -> None:
        """Mark ``handle`` ended by the fatal error in ``exc``; re-raise anything else."""
        fatal = _fatal_error(exc)
        if fatal is None:
            raise exc
        if handle.fatal is None:
            log.warning(
                "librdkafka producer failed: %s; its records in flight fail, the next send starts a new producer",
                fatal.str(),
            )
            handle.fatal = fatal

    def poll(self, timeout: float = 0) -> None:
        self._serve(self._handle, confluent_kafka.Producer.poll, timeout)

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> Delivery:
        if self._closed:
            raise IllegalStateError("producer closed")
        blocked_until = None
        while True:
            if self._handle.fatal is not None:
                self._discard(self._handle)
                self._handle = self._connect()
            handle = self._handle
            delivery = Delivery(self, handle)
            try:
                handle.kafka.produce(
                    topic, value, key, -1 if partition is None else partition, delivery, headers=headers
                )
            except BufferError:  # librdkafka's queue is full: wait for acknowledgements, as kafka-python's max_block_ms
                blocked_until = blocked_until or time.monotonic() + self.timeout_s
                if time.monotonic() > blocked_until:
                    raise KafkaTimeoutError(f"producer queue full for {self.timeout_s} s") from None
                self._serve(handle, confluent_kafka.Producer.poll, 0.05)
                continue
            except confluent_kafka.KafkaException as exc:
                if _fatal_error(exc) is None:
                    raise _delivery_error(exc.args[0], _place(topic, partition)) from None
                self._end(handle, exc)
                continue
            self._serve(handle, confluent_kafka.Producer.poll, 0)
            return delivery

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record sent so far is acknowledged or failed (KafkaTimeoutError otherwise)."""
        left = self._serve(self._handle, confluent_kafka.Producer.flush, -1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records not acknowledged within {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout`` seconds, fail whatever is still unacknowledged, and close."""
        if self._closed:
            return
        self._closed = True
        self._serve(self._handle, confluent_kafka.Producer.flush, -1 if timeout is None else timeout)
        self._discard(self._handle)

    def _discard(self, handle: _Handle) -> None:
        """Fail the records still queued or in flight (their futures say so) and close the producer."""
        self._serve(handle, confluent_kafka.Producer.purge)
        self._serve(handle, confluent_kafka.Producer.poll, 0)  # serves the purged records' delivery callbacks
        self._serve(handle, confluent_kafka.Producer.close)


def consumer(
    bootstrap_servers: str, timeout_s: float = 15.0, properties: Mapping[str, str] | None = None, **overrides
) -> KafkaConsumer:
    """A consumer with manual offset control; callers assign partitions themselves."""
    config = dict(
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        bootstrap_timeout_ms=int(timeout_s * 1000),
        client_id="streamfit-consumer",
    )
    return _reached(KafkaConsumer, bootstrap_servers, properties, "consumer", **(config | overrides))
