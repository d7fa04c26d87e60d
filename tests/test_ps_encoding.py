"""Compressed commits and pulls (issue 21): every encoding through the frame reader, negotiation,
corrupted sparse frames, and every algorithm with every encoding against a real server over TCP."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest

from pipeline.ps.algorithms import ALGORITHMS, UpdateRule
from pipeline.ps.checkpoint import Checkpoint
from pipeline.ps.client import Client, ServerError, ShardedClient
from pipeline.ps.encoding import ENCODINGS, Encoder, pull_tensors
from pipeline.ps.protocol import (
    HEADER,
    CommitTag,
    Frame,
    FrameReader,
    MsgType,
    ProtocolError,
    ScaledTensor,
    SparseTensor,
    encode,
    send_frame,
)
from pipeline.ps.server import CenterState, ParameterServer
from pipeline.ps.softmax import SoftmaxRegression

RNG = np.random.default_rng(7)
DELTA = {"kernel": RNG.normal(size=(40, 25)).astype(np.float32), "bias": RNG.normal(size=25).astype(np.float32)}


def read_back(frame: Frame) -> Frame:
    """``frame`` through a socket pair and the frame reader, with all its bounds checks."""
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, frame)
        decoded = FrameReader(right).read(idle_timeout=2, frame_timeout=2)
    assert decoded is not None
    return decoded


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_round_trips_and_its_residual_holds_the_rest(encoding):
    encoder = Encoder(encoding, topk_fraction=0.1)
    sent = read_back(Frame(MsgType.COMMIT, tensors=encoder.encode(DELTA))).tensors
    held = encoder.flush()
    for name, value in DELTA.items():
        received = sent[name].dense() if isinstance(sent[name], SparseTensor) else np.asarray(sent[name], np.float32)
        rest = 0 if held is None or name not in held else held[name]
        rest = rest.dense() if isinstance(rest, SparseTensor) else rest
        np.testing.assert_allclose(received + rest, value, rtol=0, atol=1e-6)  # nothing is lost
        if encoding == "topk":
            assert np.count_nonzero(received) == np.ceil(0.1 * value.size)
    frame_bytes = sum(len(part) for part in encode(Frame(MsgType.COMMIT, tensors=Encoder(encoding).encode(DELTA))))
    dense_bytes = sum(len(part) for part in encode(Frame(MsgType.COMMIT, tensors=DELTA)))
    assert frame_bytes <= dense_bytes * {"float32": 1, "float16": 0.55, "int8": 0.3, "topk": 0.15}[encoding]


def test_lossy_pulls_are_scaled_float16_of_any_range():
    weights = {"tiny": np.linspace(-1e-6, 1e-6, 9, dtype=np.float32), "large": np.array([1e6, -3.0], np.float32)}
    wire = pull_tensors(weights, "topk")
    assert all(isinstance(t, ScaledTensor) and t.values.dtype == np.float16 for t in wire.values())
    pulled = read_back(Frame(MsgType.WEIGHTS, tensors=wire)).tensors
    for name, value in weights.items():
        assert pulled[name].dtype == np.float32
        np.testing.assert_allclose(pulled[name], value, rtol=0, atol=np.abs(value).max() * 2**-11)
    assert np.count_nonzero(pulled["tiny"]) == 8  # nothing vanishes below float16's range
    assert pull_tensors(weights, "float32")["tiny"] is weights["tiny"]


def sparse_commit(indices, values, shape=(40, 25)) -> Frame:
    tensor = SparseTensor(shape, np.asarray(indices, np.uint32), np.asarray(values, np.float32))
    return Frame(MsgType.COMMIT, tensors={"kernel": tensor})


@pytest.fixture
def server():
    state = CenterState({"kernel": np.zeros((40, 25), np.float32), "bias": np.zeros(25, np.float32)}, UpdateRule())
    with ParameterServer(state, io_timeout_s=2.0, idle_timeout_s=5.0) as running:
        yield running


def reply_to(address, payload: bytes) -> Frame:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(payload)
        reply = FrameReader(sock).read(idle_timeout=5, frame_timeout=5)
        assert reply is not None
        return reply


def payload(frame: Frame) -> bytes:
    return b"".join(bytes(part) for part in encode(frame))


@pytest.mark.parametrize(
    "frame, problem",
    [
        (sparse_commit([3, 1000], [1.0, 2.0]), "out of range or not strictly increasing"),
        (sparse_commit([5, 5], [1.0, 2.0]), "out of range or not strictly increasing"),
        (sparse_commit([7, 2], [1.0, 2.0]), "out of range or not strictly increasing"),
    ],
)
def test_a_corrupted_sparse_frame_gets_an_error_reply(server, frame, problem):
    reply = reply_to(server.address, payload(frame))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "protocol" and problem in reply.meta["error"]
    assert server.state.counter == 0


def test_a_sparse_frame_whose_counts_lie_gets_an_error_reply(server):
    raw = bytearray(payload(sparse_commit([1, 2], [1.0, 2.0])))
    nnz_at = HEADER.size + 2 + len(b"kernel") + 2 + 2 * 8  # after name, dtype code, ndim and two dims
    for nnz, problem in ((1001, "sparse values for shape"), (0, "but the tensor table describes 0")):
        struct.pack_into("<Q", raw, nnz_at, nnz)
        reply = reply_to(server.address, bytes(raw))
        assert reply.type == MsgType.ERROR and reply.meta["code"] == "protocol" and problem in reply.meta["error"]
    with pytest.raises(ProtocolError, match="dtype code"):  # a scaled tensor that is not int8
        left, right = socket.socketpair()
        with left, right:
            raw = bytearray(payload(Frame(MsgType.COMMIT, tensors={"bias": np.ones(2, np.float32)})))
            raw[HEADER.size + 2 + len(b"bias")] |= 0x40
            left.sendall(raw)
            FrameReader(right).read(idle_timeout=2, frame_timeout=2)


def test_a_sparse_tensor_of_another_shape_is_rejected_and_the_connection_kept(server):
    with Client(*server.address) as client:
        with pytest.raises(ServerError) as refused:
            client._send_commit(sparse_commit([1], [1.0], shape=(25, 40)).tensors, CommitTag(), {}, None)
        assert refused.value.code == "rejected" and "is not a center tensor's" in str(refused.value)
        assert client.stats()["counter"] == 0


def test_an_unknown_encoding_gets_an_error_reply(server):
    reply = reply_to(server.address, payload(Frame(MsgType.HELLO, meta={"encoding": "zip"})))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "encoding" and "'zip'" in reply.meta["error"]
    with pytest.raises(ValueError, match="unknown parameter-server encoding 'zip'"):
        Client(*server.address, encoding="zip")


def test_a_negotiated_connection_pulls_float16_and_commits_compressed(server):
    with Client(*server.address, encoding="topk", topk_fraction=0.02) as client:
        client.pull()
        before = server.stats()["bytes_in"]
        assert client.commit(DELTA).status == "applied"
        commit_bytes = server.stats()["bytes_in"] - before
        out_before = server.stats()["bytes_out"]
        weights, _ = client.pull()
        pull_bytes = server.stats()["bytes_out"] - out_before
        center = server.state.pull()[0]["kernel"]
        assert weights["kernel"].dtype == np.float32 and not np.array_equal(weights["kernel"], center)
        np.testing.assert_allclose(weights["kernel"], center, rtol=0, atol=np.abs(center).max() * 2**-11)
        assert client.flush().status == "applied"
    dense = sum(v.nbytes for v in DELTA.values())
    assert commit_bytes < dense / 8 and pull_bytes < 0.6 * dense
    center = server.state.pull()[0]
    for name, value in DELTA.items():
        np.testing.assert_allclose(center[name], value, atol=1e-6)


def separable(rows: int = 256):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_with_every_encoding_and_replays_are_skipped(name, encoding, tmp_path):
    params = (
        {"workers": 1, "wait_s": 5.0}
        if name == "sync"
        else {"learning_rate": 0.1, "rho": 2.0}
        if "easgd" in name
        else {}
    )
    algorithm = ALGORITHMS[name](**params)
    model = SoftmaxRegression(features=4, classes=2)
    x, y = separable()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)] * 3
    tag = CommitTag(query_id="q", batch_id=0, worker_id=0)
    state = CenterState(model.get_weights(), algorithm.rule())
    checkpoint = Checkpoint(tmp_path)
    with ParameterServer(state, checkpoint=checkpoint) as server:
        with Client(*server.address, encoding=encoding, topk_fraction=0.25) as client:
            report = algorithm.run(model, client, batches, tag=tag)
            assert report.commits > 0 and report.skipped == 0
            trained = client.stats()["counter"]
            if not algorithm.synchronous:  # a replayed barrier round never closes: the server skips it
                replay = algorithm.run(SoftmaxRegression(features=4, classes=2), client, batches, tag=tag)
                assert replay.skipped == replay.commits == report.commits and state.counter == trained
            assert client.checkpoint().counter == trained
    published = state.publication()[0]
    member = {k.split("/", 1)[-1]: v for k, v in published.items()}  # an ensemble publishes member<id>/...
    check = SoftmaxRegression(features=4, classes=2)
    check.set_weights(member)
    assert (check.predict(x) == y).mean() > 0.9
    resumed = CenterState.from_snapshot(checkpoint.load(), algorithm.rule())
    for tensor, value in state.pull()[0].items():
        np.testing.assert_array_equal(resumed.pull()[0][tensor], value)


def test_a_throttled_link_holds_pulls_to_its_rate():
    state = CenterState({"w": np.zeros(250_000, np.float32)}, UpdateRule())  # a 1 MB pull
    with ParameterServer(state, link_bytes_per_s=4e6) as server, Client(*server.address) as client:
        started = time.monotonic()
        for _ in range(4):
            client.pull()
        assert 0.9 < time.monotonic() - started < 5  # 4 MB at 4 MB/s, less the bucket's 0.05 s burst


def test_a_sharded_client_compresses_and_flushes_every_shard():
    states = [CenterState({name: np.zeros_like(value)}, UpdateRule()) for name, value in DELTA.items()]
    with ParameterServer(states[0]) as first, ParameterServer(states[1]) as second:
        with ShardedClient([first.address, second.address], encoding="int8") as client:
            client.pull()
            assert client.lossy and client.commit(DELTA).status == "applied"
            assert client.flush().status == "applied"
    for state in states:
        for name, value in state.pull()[0].items():
            np.testing.assert_allclose(value, DELTA[name], atol=1e-6)
