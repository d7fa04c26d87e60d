"""A TLS-terminating proxy in front of a plaintext Kafka broker, so the tests can talk TLS to the embedded one.

Kafka clients use the bootstrap address once, then connect to the addresses the broker advertises in
its Metadata answers. The proxy listens on the broker's host and rewrites the advertised port to its
own (a fixed-size field, so no length changes), so every connection comes back through TLS. It also
reads the compression codec and size of every record batch clients produce, by topic (:attr:`codecs`,
:attr:`batch_bytes`): what the compression tests check. Given ``credentials``, it checks SASL/PLAIN
itself (noida-db answers the SASL handshake but accepts any user and password): a wrong password is answered
SASL_AUTHENTICATION_FAILED, and a connection that sends anything but ApiVersions and the SASL
requests before authenticating is closed.

Certificates come from :func:`make_ca` and :func:`make_certificate` (``cryptography``), made per test run.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import struct
import threading
from collections import defaultdict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PRODUCE, METADATA, SASL_HANDSHAKE, API_VERSIONS, SASL_AUTHENTICATE = 0, 3, 17, 18, 36
SASL_AUTHENTICATION_FAILED = 58
CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(directory: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA, its certificate written to ``<directory>/<name>.pem``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_certificate(
    directory: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    host: str = "127.0.0.1",
    name: str = "broker",
    usage: x509.ObjectIdentifier = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
) -> tuple[Path, Path]:
    """A certificate for ``host`` (and localhost) signed by the CA, a server's by default (``usage``
    CLIENT_AUTH: a client's): (``<name>.pem``, ``<name>.key``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    return cert_path, key_path


class _Reader:
    """Kafka's primitive types, read from a buffer (classic and flexible encodings)."""

    def __init__(self, data: bytes, at: int = 0):
        self.data, self.at = data, at

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def string(self, flexible: bool) -> str | None:
        size = self.uvarint() - 1 if flexible else self.take(">h")
        if size < 0:
            return None
        self.at += size
        return self.data[self.at - size : self.at].decode()

    def array(self, flexible: bool) -> int:
        return self.uvarint() - 1 if flexible else self.take(">i")

    def tags(self, flexible: bool) -> None:
        if flexible:
            for _ in range(self.uvarint()):
                self.uvarint()
                self.at += self.uvarint()


def rewrite_ports(frame: bytearray, version: int, old: int, new: int) -> None:
    """In a Metadata response (``frame`` without its size), every advertised broker port ``old`` -> ``new``."""
    flexible = version >= 9
    r = _Reader(bytes(frame), 4)  # correlation id
    r.tags(flexible)  # response header v1
    if version >= 3:
        r.take(">i")  # throttle time
    for _ in range(r.array(flexible)):
        r.take(">i")  # node id
        r.string(flexible)  # host
        if r.take(">i") == old:
            struct.pack_into(">i", frame, r.at - 4, new)
        if version >= 1:
            r.string(flexible)  # rack
        r.tags(flexible)


def produced_batches(frame: bytes, version: int) -> list[tuple[str, str, int]]:
    """(topic, codec, bytes) of every record batch in a Produce request (``frame`` without its size), v3-v12."""
    flexible = version >= 9
    r = _Reader(frame, 8)  # api key, api version, correlation id
    r.string(False)  # client id: a classic string in every request header
    r.tags(flexible)
    r.string(flexible)  # transactional id
    r.take(">h")  # acks
    r.take(">i")  # timeout
    found = []
    for _ in range(r.array(flexible)):
        topic = r.string(flexible) or ""
        for _ in range(r.array(flexible)):
            r.take(">i")  # partition
            size = r.uvarint() - 1 if flexible else r.take(">i")
            records, r.at = frame[r.at : r.at + max(size, 0)], r.at + max(size, 0)
            at = 0
            while at + 23 <= len(records):  # base offset, length, leader epoch, magic, crc, attributes
                (length,) = struct.unpack_from(">i", records, at + 8)
                (attributes,) = struct.unpack_from(">h", records, at + 21)
                found.append((topic, CODECS.get(attributes & 0x7, str(attributes & 0x7)), 12 + length))
                at += 12 + length
            r.tags(flexible)
        r.tags(flexible)
    return found


def plain_credentials(frame: bytes, version: int) -> tuple[str, str]:
    """(user, password) of a SaslAuthenticate request carrying PLAIN's ``authzid NUL user NUL password``."""
    flexible = version >= 2
    r = _Reader(frame, 8)
    r.string(False)  # client id
    r.tags(flexible)
    size = r.uvarint() - 1 if flexible else r.take(">i")
    _, user, password = frame[r.at : r.at + size].split(b"\0")
    return user.decode(), password.decode()


def sasl_failure(correlation: int, version: int, message: str) -> bytes:
    """A SaslAuthenticate response (size included) answering SASL_AUTHENTICATION_FAILED with ``message``."""
    flexible, text = version >= 2, message.encode()
    body = struct.pack(">i", correlation) + (b"\0" if flexible else b"")
    body += struct.pack(">h", SASL_AUTHENTICATION_FAILED)
    body += bytes([len(text) + 1]) + text if flexible else struct.pack(">h", len(text)) + text
    body += b"\x01" if flexible else struct.pack(">i", 0)  # no auth bytes
    body += struct.pack(">q", 0) if version >= 1 else b""  # session lifetime
    body += b"\0" if flexible else b""
    return struct.pack(">i", len(body)) + body


class TlsProxy:
    """TLS on ``host:<port>`` to the plaintext broker at ``upstream``; ``start()`` returns the bootstrap.
    With ``credentials`` (user, password), clients must authenticate with SASL/PLAIN as that user; with
    ``client_ca``, they must show a certificate that CA signed (mutual TLS)."""

    def __init__(
        self,
        upstream: str,
        certfile: Path,
        keyfile: Path,
        credentials: tuple[str, str] | None = None,
        client_ca: Path | None = None,
    ):
        self.host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certfile, keyfile)
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.codecs: dict[str, set[str]] = defaultdict(set)
        self.batch_bytes: dict[str, int] = defaultdict(int)  # produced record batches' bytes, by topic
        self.credentials = credentials
        self.authenticated: list[str] = []  # the user of each connection that authenticated
        self.refused: list[str] = []  # why a connection was refused
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> str:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, self.host, 0, ssl=self.context), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            broker_in, broker_out = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            client_out.close()
            return
        pending: dict[int, tuple[int, int]] = {}  # correlation id -> (api key, api version)
        tasks = [
            asyncio.ensure_future(self._requests(client_in, broker_out, pending, client_out)),
            asyncio.ensure_future(self._responses(broker_in, client_out, pending)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_out, broker_out):
            writer.close()

    async def _requests(self, source, sink, pending, client_out) -> None:
        authenticated = self.credentials is None
        while True:
            size = await source.readexactly(4)
            frame = await source.readexactly(struct.unpack(">i", size)[0])
            key, version, correlation = struct.unpack_from(">hhi", frame)
            if not authenticated and key == SASL_AUTHENTICATE:
                user, password = plain_credentials(frame, version)
                if (user, password) != self.credentials:
                    self.refused.append(f"wrong password for {user!r}")
                    client_out.write(sasl_failure(correlation, version, f"Authentication failed for user {user}"))
                    await client_out.drain()
                    return
                authenticated = True
                self.authenticated.append(user)
            elif not authenticated and key not in (API_VERSIONS, SASL_HANDSHAKE):
                self.refused.append(f"api key {key} before authenticating")
                return
            pending[correlation] = (key, version)
            if key == PRODUCE:
                for topic, codec, batch in produced_batches(frame, version):
                    self.codecs[topic].add(codec)
                    self.batch_bytes[topic] += batch
            sink.write(size + frame)
            await sink.drain()

    async def _responses(self, source, sink, pending) -> None:
        while True:
            size = await source.readexactly(4)
            frame = bytearray(await source.readexactly(struct.unpack(">i", size)[0]))
            key, version = pending.pop(struct.unpack_from(">i", frame)[0], (None, 0))
            if key == METADATA:
                rewrite_ports(frame, version, self.upstream_port, self.port)
            sink.write(size + bytes(frame))
            await sink.drain()
