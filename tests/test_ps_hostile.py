"""A hostile peer against a real parameter server on loopback: a corpus of malformed, oversized and
unauthenticated frames and a connection flood, while a good client keeps pulling and committing.

Every bad frame gets an ERROR reply or a closed connection; nothing escapes a server thread; the
good client never fails; STATS still encodes as strict JSON afterwards; and the server restarts
from its checkpoint. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import hmac
import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from pipeline.ps.algorithms import UpdateRule
from pipeline.ps.checkpoint import Checkpoint
from pipeline.ps.client import Client
from pipeline.ps.protocol import FLAG_MAC, HEADER, MAGIC, VERSION, CommitTag, Frame, FrameReader, MsgType, encode
from pipeline.ps.server import CenterState, ParameterServer
from tests.waiting import wait_until

SECRET = b"hostile-test-secret"
WEIGHTS = {"kernel": np.zeros((3, 4), np.float32), "bias": np.zeros(4, np.float32)}
MAX_CONNECTIONS = 8


def raw(
    kind=MsgType.COMMIT,
    *,
    meta: bytes = b"",
    table: bytes = b"",
    data: bytes = b"",
    secret=SECRET,
    version=VERSION,
    lengths=None,
    query=b"evil",
    batch=1,
) -> bytes:
    """A frame built by hand, so that it can say what no well-behaved encoder would."""
    table_len, meta_len, data_len = lengths or (len(table), len(meta), len(data))
    header = HEADER.pack(
        MAGIC, version, kind, FLAG_MAC if secret else 0, table_len, meta_len, data_len, 0, batch, 0, 0, query
    )
    if not secret:
        return header + table + meta + data
    header_mac = hmac.digest(secret, header, "sha256")
    return (
        header
        + header_mac
        + table
        + meta
        + data
        + hmac.digest(secret, header + header_mac + table + meta + data, "sha256")
    )


def tensor_entry(name: str, dims: tuple[int, ...], code: int = 1) -> bytes:
    encoded = name.encode()
    return (
        struct.pack("<H", len(encoded))
        + encoded
        + struct.pack("<BB", code, len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
    )


BIAS = tensor_entry("bias", (4,))
ONE_BIAS = np.ones(4, np.float32).tobytes()


def commit(meta) -> bytes:
    """A signed commit of a valid delta whose metadata is ``meta`` (a dict, or raw JSON bytes)."""
    body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()  # json.dumps writes NaN as NaN
    return raw(meta=body, table=BIAS, data=ONE_BIAS)


KEEPS = "rejected"  # the error code after which the connection stays usable
CORPUS: dict[str, tuple[bytes, str | None]] = {
    # metadata: typed, finite, bounded -- rejected, the connection stays usable
    "NaN offset": (commit({"offsets": {"events": {"0": float("nan")}}}), KEEPS),
    "infinite rows": (commit(b'{"rows": Infinity}'), KEEPS),
    "offset as a string": (commit({"offsets": {"events": {"0": "10"}}}), KEEPS),
    "partition not a number": (commit({"offsets": {"events": {"p0": 1}}}), KEEPS),
    "negative rows": (commit({"rows": -5}), KEEPS),
    "rows beyond int64": (commit({"rows": 2**70}), KEEPS),
    "rows as a bool": (commit({"rows": True}), KEEPS),
    "unknown key": (commit({"offsets": {}, "exec": "rm -rf /"}), KEEPS),
    "too many partitions": (commit({"offsets": {"events": {str(i): i for i in range(20_000)}}}), KEEPS),
    "too many topics": (commit({"offsets": {f"t{i}": {"0": 1} for i in range(100)}}), KEEPS),
    "topic name of 10 kB": (commit({"offsets": {"t" * 10_000: {"0": 1}}}), KEEPS),
    "metadata not an object of the schema": (commit({"offsets": [1, 2, 3]}), KEEPS),
    "empty delta": (raw(meta=b'{"rows": 1}'), KEEPS),
    "unknown tensor": (raw(table=tensor_entry("evil", (4,)), data=ONE_BIAS), KEEPS),
    "wrong shape": (raw(table=tensor_entry("bias", (2, 2)), data=ONE_BIAS), KEEPS),
    "NaN in a tensor": (raw(table=BIAS, data=np.full(4, np.nan, np.float32).tobytes()), KEEPS),
    # malformed frames -- an error reply, then the connection is closed
    "deeply nested metadata": (commit(b'{"rows": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "protocol"),
    "metadata not JSON": (commit(b"\xff\xfe{"), "protocol"),
    "metadata a JSON list": (commit(b"[1]"), "protocol"),
    "NaN wait_s": (raw(MsgType.PULL, meta=b'{"wait_s": NaN}'), "protocol"),
    "huge dims": (raw(table=tensor_entry("bias", (2**40, 2**40)), data=ONE_BIAS), "protocol"),
    "dims no array can have": (raw(table=tensor_entry("bias", (0, 2**63))), "protocol"),
    "nine dims": (raw(table=tensor_entry("bias", (1,) * 9), data=ONE_BIAS), "protocol"),
    "unknown dtype": (raw(table=tensor_entry("bias", (4,), code=99), data=ONE_BIAS), "protocol"),
    "duplicate tensor": (raw(table=BIAS + BIAS, data=ONE_BIAS * 2), "protocol"),
    "table shorter than it says": (raw(table=BIAS[:-3], data=ONE_BIAS), "protocol"),
    "data longer than the table": (raw(table=BIAS, data=ONE_BIAS * 2), "protocol"),
    "'negative' table length": (raw(lengths=(2**32 - 1, 0, 0)), "too_large"),
    "'negative' data length": (raw(lengths=(0, 0, 2**64 - 1)), "too_large"),
    "frame of 10 GB": (raw(lengths=(0, 0, 10 * 2**30)), "too_large"),
    "wrong version": (raw(version=VERSION + 1), "version"),
    "unknown message type": (raw(kind=99), "protocol"),
    "server-only message type": (raw(MsgType.WEIGHTS), "protocol"),
    "not our protocol": (b"GET / HTTP/1.1\r\nHost: ps\r\n\r\n" + b"\0" * 200, "protocol"),
    # authentication -- checked on the header, before the server reads (or allocates) the body
    "no MAC": (raw(secret=None), "auth"),
    "unauthenticated frame of 10 GB": (raw(secret=None, lengths=(0, 0, 10 * 2**30)), "auth"),
    "header MAC of another secret": (raw(secret=b"guess"), "auth"),
    "body changed after signing": (commit({"rows": 1}).replace(b'"rows": 1', b'"rows": 9'), "auth"),
    # truncated: the peer hangs up mid-frame; nothing to answer
    "truncated header": (raw()[: HEADER.size // 2], None),
    "truncated body": (commit({"rows": 1})[: HEADER.size + 40], None),
}


class GoodClient(threading.Thread):
    """Pulls and commits in a loop (bounded) until stopped; any failure is kept and fails the test."""

    def __init__(self, address):
        super().__init__(name="good-client", daemon=True)
        self.address, self.stop, self.errors, self.commits = address, threading.Event(), [], 0

    def run(self):
        try:
            with Client(*self.address, secret=SECRET, timeout_s=10) as client:
                for seq in range(100_000):
                    if self.stop.is_set():
                        return
                    client.pull()
                    ack = client.commit(
                        {"bias": np.full(4, 0.001, np.float32)},
                        tag=CommitTag("good", 0, 0, seq),
                        meta={"offsets": {"events": {"0": seq + 1}}, "rows": 2},
                    )
                    assert ack.status == "applied", ack
                    self.commits += 1
                    time.sleep(0.002)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


@pytest.fixture
def escaped(monkeypatch):
    """Exceptions that escaped any thread during the test."""
    caught = []
    monkeypatch.setattr(threading, "excepthook", lambda args: caught.append(args.exc_value))
    return caught


def answer(address, payload: bytes, *, hang_up: bool) -> tuple[Frame | None, socket.socket]:
    """Send ``payload`` on a new connection (then end our side with ``hang_up``); the server's reply
    (None: it closed) and the socket."""
    sock = socket.create_connection(address, timeout=5)
    try:
        sock.sendall(payload)
    except OSError:
        pass  # the server may close before reading everything (an error reply is still there to read)
    if hang_up:
        sock.shutdown(socket.SHUT_WR)
    try:
        return FrameReader(sock, secret=SECRET).read(idle_timeout=5, frame_timeout=5), sock
    except ConnectionError:
        return None, sock


def test_hostile_corpus_and_flood_leave_the_server_serving(tmp_path, escaped):
    checkpoint = Checkpoint(tmp_path / "ckpt")
    state = CenterState(WEIGHTS, UpdateRule())
    server = ParameterServer(
        state,
        secret=SECRET,
        checkpoint=checkpoint,
        io_timeout_s=1.0,
        idle_timeout_s=3.0,
        max_connections=MAX_CONNECTIONS,
        checkpoint_every_s=0.5,
    ).start()
    good = GoodClient(server.address)
    good.start()
    started = time.monotonic()
    try:
        wait_until(lambda: good.commits > 0, 15, interval_s=0.02, message="the good client never committed")
        for case, (payload, code) in CORPUS.items():
            reply, sock = answer(server.address, payload, hang_up=code is None)
            with sock:
                if code is None:
                    assert reply is None, case
                    continue
                assert reply is not None and reply.type == MsgType.ERROR and reply.meta["code"] == code, (case, reply)
                if code == KEEPS:  # the same connection still answers
                    sock.sendall(b"".join(bytes(p) for p in encode(Frame(MsgType.STATS), SECRET)))
                    stats = FrameReader(sock, secret=SECRET).read(idle_timeout=5, frame_timeout=5)
                    assert stats.type == MsgType.STATS_REPLY, case
                else:
                    sock.settimeout(5)
                    assert sock.recv(1) == b"", case  # then closed
            assert not good.errors and not escaped, case

        # a flood of connections that never authenticate: beyond the cap each one is told "busy"
        flood, busy = [], 0
        for _ in range(4 * MAX_CONNECTIONS):
            flood.append(socket.create_connection(server.address, timeout=5))
        for sock in flood:
            sock.settimeout(0.2)
            try:
                reply = FrameReader(sock, secret=SECRET).read(idle_timeout=0.2, frame_timeout=1)
            except (TimeoutError, ConnectionError):
                continue  # held by the server within the cap
            busy += reply is not None and reply.meta["code"] == "busy"
        assert busy >= 4 * MAX_CONNECTIONS - MAX_CONNECTIONS
        for sock in flood:
            sock.close()
        wait_until(
            lambda: server.stats()["connections"] <= 2,
            15,
            interval_s=0.02,
            message=lambda: f"{server.stats()['connections']} connections still open after the flood",
        )  # the good client (and none of the flood)
        with Client(*server.address, secret=SECRET) as newcomer:
            stats = newcomer.stats()
        json.dumps(stats, allow_nan=False)
        assert not good.errors and not escaped and good.commits > 0
        assert set(stats["queries"]) == {"good"}  # no rejected commit left a trace
        assert time.monotonic() - started < 60
    finally:
        good.stop.set()
        good.join(timeout=10)
        server.stop()
    assert not good.errors and not escaped

    counter, rows = state.counter, state.stats()["queries"]["good"]["rows"]
    assert counter == good.commits and rows == 2 * counter
    resumed, found = CenterState.resume(checkpoint, UpdateRule(), lambda: pytest.fail("no checkpoint"))
    assert found and resumed.counter == counter and resumed.stats()["queries"]["good"]["rows"] == rows
    with ParameterServer(resumed, secret=SECRET) as again, Client(*again.address, secret=SECRET) as client:
        assert client.pull()[1] == counter
        assert client.commit({"bias": np.ones(4, np.float32)}, tag=CommitTag("good", 0, 0, 0)).status == "skipped"
        assert client.commit({"bias": np.ones(4, np.float32)}, tag=CommitTag("good", 1, 0, 0)).status == "applied"
