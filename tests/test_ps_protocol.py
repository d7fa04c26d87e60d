"""The parameter-server wire format: round trips, HMAC, bounds, and hostile input."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest

from pipeline.ps.protocol import (
    HEADER,
    MAGIC,
    VERSION,
    Ack,
    AuthenticationError,
    Frame,
    FrameReader,
    FrameTimeout,
    FrameTooLarge,
    MsgType,
    ProtocolError,
    TruncatedFrame,
    VersionMismatch,
    encode,
    send_frame,
)

SECRET = b"s3cret"


def wire(frame: Frame, secret: bytes | None = None) -> bytes:
    return b"".join(bytes(part) for part in encode(frame, secret))


def header(*, magic=MAGIC, version=VERSION, kind=MsgType.COMMIT, flags=0, table=0, meta=0, data=0) -> bytes:
    return HEADER.pack(magic, version, kind, flags, table, meta, data, 0, -1, 0, 0, b"")


def read_open(raw: bytes, *, frame_timeout: float = 5.0) -> Frame | None:
    """Feed ``raw`` to a FrameReader and keep the connection open, as a stalled peer would."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        return FrameReader(b, max_frame_bytes=1 << 20).read(idle_timeout=5.0, frame_timeout=frame_timeout)


def read_closed(raw: bytes, **kwargs) -> Frame | None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        return FrameReader(b, **kwargs).read(idle_timeout=5.0, frame_timeout=5.0)


def roundtrip(frame: Frame, *, send_secret=None, recv_secret=None, reader_kwargs=None) -> Frame:
    a, b = socket.socketpair()
    with a, b:
        writer = threading.Thread(target=send_frame, args=(a, frame, send_secret))
        writer.start()
        got = FrameReader(b, secret=recv_secret, **(reader_kwargs or {})).read(idle_timeout=5.0, frame_timeout=5.0)
        writer.join()
        return got


def test_round_trip_keeps_every_field_dtype_and_shape():
    rng = np.random.default_rng(0)
    tensors = {
        "dense/kernel": rng.standard_normal((30, 50)).astype(np.float32),
        "dense/bias": rng.standard_normal(50).astype(np.float32),
        "f64": rng.standard_normal((3, 1, 2)),
        "i32": np.arange(5, dtype=np.int32),
        "i64": np.arange(7, dtype=np.int64).reshape(7, 1),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "odd": np.ones(3, np.float32),  # 12 bytes: exercises the 8-byte padding
        "big-endian": np.arange(4, dtype=">f4"),
    }
    frame = Frame(
        MsgType.COMMIT,
        counter=2**40,
        worker_id=7,
        query_id="é-query-☃",
        batch_id=-5,
        seq=3,
        tensors=tensors,
        meta={"offsets": {"events": {"0": 12}}, "note": "ok"},
    )
    got = roundtrip(frame)
    assert (got.type, got.counter, got.worker_id, got.query_id, got.batch_id, got.seq) == (
        MsgType.COMMIT,
        2**40,
        7,
        "é-query-☃",
        -5,
        3,
    )
    assert got.meta == frame.meta
    assert list(got.tensors) == list(tensors)
    for name, value in tensors.items():
        assert got.tensors[name].shape == value.shape
        assert got.tensors[name].dtype == value.dtype.newbyteorder("<")
        np.testing.assert_array_equal(got.tensors[name], value)


def test_fresh_buffers_are_owned_and_a_reused_buffer_is_shared():
    frame = Frame(MsgType.WEIGHTS, tensors={"w": np.arange(4, dtype=np.float32)})
    first, second = roundtrip(frame), roundtrip(frame)
    assert first.tensors["w"].flags.writeable and not np.shares_memory(first.tensors["w"], second.tensors["w"])
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, frame)
        send_frame(a, frame)
        reader = FrameReader(b, reuse_buffer=True)
        one = reader.read(idle_timeout=1, frame_timeout=1).tensors["w"]
        two = reader.read(idle_timeout=1, frame_timeout=1).tensors["w"]
        assert np.shares_memory(one, two)  # the server consumes a commit before reading the next frame


def test_hmac_accepted_with_the_right_secret():
    got = roundtrip(Frame(MsgType.PULL, counter=3), send_secret=SECRET, recv_secret=SECRET)
    assert got.counter == 3


def test_receiver_without_secret_ignores_the_mac():
    assert roundtrip(Frame(MsgType.PULL, counter=4), send_secret=SECRET).counter == 4


@pytest.mark.parametrize("send_secret", [None, b"wrong"])
def test_missing_or_wrong_hmac_is_rejected(send_secret):
    with pytest.raises(AuthenticationError):
        read_closed(wire(Frame(MsgType.PULL), send_secret), secret=SECRET)


def test_tampered_frame_fails_the_hmac():
    raw = bytearray(wire(Frame(MsgType.COMMIT, tensors={"w": np.ones(4, np.float32)}), SECRET))
    raw[HEADER.size + 20] ^= 0x01  # a bit of tensor data
    with pytest.raises(AuthenticationError):
        read_closed(bytes(raw), secret=SECRET)


def test_header_claiming_10_gb_is_rejected_before_reading_the_body():
    with pytest.raises(FrameTooLarge):
        read_open(header(data=10 * 2**30))  # nothing else is sent: it must not wait for a body


@pytest.mark.parametrize(
    "raw,error",
    [
        (header(magic=b"HTTP"), ProtocolError),
        (header(version=VERSION + 1), VersionMismatch),
        (header(kind=99), ProtocolError),
        (header(flags=0x8000), ProtocolError),
        (header(table=(1 << 20) + 1), FrameTooLarge),
    ],
)
def test_bad_headers(raw, error):
    with pytest.raises(error):
        read_closed(raw)


def test_tensor_table_and_data_must_agree():
    table = struct.pack("<H", 1) + b"w" + struct.pack("<BBQ", 1, 1, 25)  # 25 float32 = 100 bytes
    raw = header(table=len(table), data=8) + table + bytes(8)
    with pytest.raises(ProtocolError, match="overrun"):
        read_closed(raw)


@pytest.mark.parametrize("meta", [b"[1, 2]", b"{not json", b"\xff\xfe"])
def test_metadata_must_be_a_json_object(meta):
    with pytest.raises(ProtocolError):
        read_closed(header(kind=MsgType.STATS, meta=len(meta)) + meta)


def test_clean_close_between_frames_is_not_an_error():
    assert read_closed(b"") is None


def test_close_mid_frame_is_a_truncated_frame():
    raw = wire(Frame(MsgType.COMMIT, tensors={"w": np.ones(100, np.float32)}))
    with pytest.raises(TruncatedFrame):
        read_closed(raw[: len(raw) // 2])


def test_stalled_frame_times_out():
    raw = wire(Frame(MsgType.PULL))
    with pytest.raises(FrameTimeout):
        read_open(raw[:10], frame_timeout=0.2)


def test_random_bytes_and_corrupted_frames_only_raise_protocol_errors():
    rng = np.random.default_rng(1)
    good = wire(
        Frame(
            MsgType.COMMIT,
            worker_id=1,
            query_id="q",
            tensors={"a": np.ones((3, 4), np.float32), "b": np.arange(3.0)},
            meta={"k": [1, 2]},
        )
    )
    samples = [rng.bytes(int(rng.integers(1, 300))) for _ in range(50)]
    samples += [MAGIC + bytes([VERSION]) + rng.bytes(int(rng.integers(0, 300))) for _ in range(50)]
    for _ in range(200):
        corrupted = bytearray(good)
        for pos in rng.integers(0, len(good), size=int(rng.integers(1, 4))):
            corrupted[pos] = int(rng.integers(0, 256))
        samples.append(bytes(corrupted[: int(rng.integers(1, len(good) + 1))]))
    for raw in samples:
        try:
            read_closed(raw, max_frame_bytes=1 << 16)
        except ProtocolError:
            pass


@pytest.mark.parametrize(
    "frame,error",
    [
        (Frame(MsgType.COMMIT, tensors={"c": np.ones(2, np.complex64)}), TypeError),
        (Frame(MsgType.COMMIT, tensors={"u": np.ones(2, np.uint8)}), TypeError),
        (Frame(MsgType.COMMIT, query_id="q" * 65), ValueError),
        (Frame(MsgType.COMMIT, meta={"x": float("nan")}), ValueError),
        (Frame(MsgType.COMMIT, meta={"x": "y" * (1 << 20)}), ValueError),
    ],
)
def test_encode_refuses_what_cannot_be_sent(frame, error):
    with pytest.raises(error):
        encode(frame)


def test_ack_combine_over_shards():
    acks = [Ack("skipped", 5, 0), Ack("applied", 4, 2), Ack("skipped", 6, 1)]
    assert Ack.combine(acks) == Ack("applied", 4, 2)
    assert Ack.combine([Ack("skipped", 1, 0)] * 2).status == "skipped"
    assert Ack.combine([Ack("pending", 1, 0), Ack("skipped", 1, 0)]).status == "pending"
