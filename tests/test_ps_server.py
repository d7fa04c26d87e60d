"""The parameter server: serving, replay guard, robustness, sharding, checkpoints, publishing, CLI."""

from __future__ import annotations

import hmac
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline.ps import client as client_module, server as server_module, sharding
from pipeline.ps.algorithms import ReplicaSlots, StalenessScaled, SynchronousRound, UpdateRule
from pipeline.ps.checkpoint import Checkpoint, CheckpointError
from pipeline.ps.client import Client, ServerError, ShardedClient
from pipeline.ps.protocol import FLAG_MAC, HEADER, MAGIC, VERSION, CommitTag, Frame, FrameReader, MsgType, encode
from pipeline.ps.server import CenterState, ParameterServer

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"shared-secret"
WEIGHTS = {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "bias": np.zeros(4, np.float32)}
ONES = {name: np.ones_like(value) for name, value in WEIGHTS.items()}


@pytest.fixture
def serve():
    """Start servers (torn down after the test): ``serve(weights=None, rule=None, **server_kwargs)``."""
    servers = []

    def start(weights=None, rule=None, **kwargs):
        state = CenterState(WEIGHTS if weights is None else weights, rule or UpdateRule())
        server = ParameterServer(state, **{"io_timeout_s": 2.0, "idle_timeout_s": 5.0, **kwargs}).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def raw_reply(address, payload: bytes) -> Frame:
    """Send raw bytes, read the server's reply, and check the server then closes the connection."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(payload)
        reply = FrameReader(sock).read(idle_timeout=5, frame_timeout=5)
        assert sock.recv(1) == b""
        return reply


def wire(frame: Frame, secret: bytes | None = None) -> bytes:
    return b"".join(bytes(part) for part in encode(frame, secret))


def test_pull_commit_stats():
    with ParameterServer(CenterState(WEIGHTS, UpdateRule())) as server, Client(*server.address) as client:
        weights, counter = client.pull()
        assert counter == 0 and weights.keys() == WEIGHTS.keys()
        np.testing.assert_array_equal(weights["kernel"], WEIGHTS["kernel"])
        assert client.commit(ONES, tag=CommitTag(worker_id=3)).status == "applied"
        client.commit({"bias": np.ones(4, np.float32)}, tag=CommitTag(worker_id=3))  # a partial delta
        weights, counter = client.pull()
        assert counter == 2
        np.testing.assert_array_equal(weights["kernel"], WEIGHTS["kernel"] + 1)
        np.testing.assert_array_equal(weights["bias"], np.full(4, 2, np.float32))
        stats = client.stats()
    assert stats["counter"] == 2 and stats["commits"] == {"applied": 2, "pending": 0, "skipped": 0}
    assert stats["workers"]["3"] == {"commits": 2, "staleness_mean": 0.5, "staleness_max": 1, "staleness_last": 1}
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 2 * sum(v.nbytes for v in WEIGHTS.values())
    assert stats["parameters"] == 16 and stats["tensors"] == {"kernel": [3, 4], "bias": [4]}


def test_replayed_tags_are_acknowledged_but_not_applied(serve):
    server = serve()
    with Client(*server.address) as client:

        def commit(batch, seq, query="q1"):
            return client.commit(ONES, tag=CommitTag(query, batch, 0, seq)).status

        assert [commit(5, 0), commit(5, 1), commit(5, 0), commit(5, 1)] == ["applied", "applied", "skipped", "skipped"]
        assert commit(5, 0, query="q2") == "applied"  # another query has its own history
        assert commit(6, 0) == "applied"
        assert commit(5, 2) == "skipped"  # an older micro-batch of the same query
        assert [client.commit(ONES).status for _ in range(2)] == ["applied", "applied"]  # untagged: always applied
        weights, counter = client.pull()
    assert counter == 6
    np.testing.assert_array_equal(weights["bias"], np.full(4, 6, np.float32))
    assert server.stats()["commits"]["skipped"] == 3


def test_concurrent_commits_all_land(serve):
    server = serve()

    def worker(worker_id):
        with Client(*server.address) as client:
            for _ in range(25):
                client.commit(ONES, tag=CommitTag(worker_id=worker_id))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    weights, counter = server.state.pull()
    assert counter == 100
    np.testing.assert_array_equal(weights["bias"], np.full(4, 100, np.float32))


def _header(secret: bytes | None = None, **fields) -> bytes:
    """A bare header (signed with ``secret``: flag and header MAC), as no well-behaved client sends it."""
    values = {"magic": MAGIC, "version": VERSION, "kind": MsgType.PULL, "data": 0, **fields}
    header = HEADER.pack(
        values["magic"],
        values["version"],
        values["kind"],
        FLAG_MAC if secret else 0,
        0,
        0,
        values["data"],
        0,
        -1,
        0,
        0,
        b"",
    )
    return header + hmac.digest(secret, header, "sha256") if secret else header


BAD_INPUTS = {
    "random bytes": (np.random.default_rng(7).bytes(300), "protocol"),
    "frame claiming 10 GB": (_header(SECRET, kind=MsgType.COMMIT, data=10 * 2**30), "too_large"),
    "unauthenticated frame claiming 10 GB": (_header(kind=MsgType.COMMIT, data=10 * 2**30), "auth"),
    "wrong protocol version": (_header(version=VERSION + 1), "version"),
    "wrong HMAC": (wire(Frame(MsgType.PULL), b"not-the-secret"), "auth"),
    "no HMAC": (wire(Frame(MsgType.PULL)), "auth"),
    "server-only message type": (wire(Frame(MsgType.WEIGHTS), SECRET), "protocol"),
    "bad wait_s": (wire(Frame(MsgType.PULL, meta={"wait_s": "soon"}), SECRET), "protocol"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_frames_get_an_error_reply_and_the_server_keeps_serving(serve, case):
    payload, code = BAD_INPUTS[case]
    server = serve(secret=SECRET)
    with Client(*server.address, secret=SECRET) as bystander:
        bystander.pull()
        reply = raw_reply(server.address, payload)
        assert reply.type == MsgType.ERROR and reply.meta["code"] == code and reply.meta["error"]
        assert bystander.pull()[1] == 0  # an open connection is unaffected
    with Client(*server.address, secret=SECRET) as newcomer:
        assert newcomer.commit(ONES).status == "applied"


def test_client_with_the_wrong_secret_gets_a_clear_error(serve):
    server = serve(secret=SECRET)
    with Client(*server.address, secret=b"wrong") as client, pytest.raises(Exception, match="HMAC"):
        client.pull()


def test_truncated_frame_does_not_hold_the_server(serve):
    server = serve()
    raw = wire(Frame(MsgType.COMMIT, tensors=ONES))
    with socket.create_connection(server.address) as sock:
        sock.sendall(raw[: len(raw) // 2])
    wait_until(lambda: server.stats()["connections"] == 0)
    with Client(*server.address) as client:
        assert client.commit(ONES).counter == 1


def test_stalled_frame_is_cut_off_by_the_io_timeout(serve):
    server = serve(io_timeout_s=0.3)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(wire(Frame(MsgType.PULL))[:20])
        reply = FrameReader(sock).read(idle_timeout=5, frame_timeout=5)
        assert reply.meta["code"] == "frame_timeout" and sock.recv(1) == b""
    with Client(*server.address) as client:
        assert client.pull()[1] == 0


def test_idle_connections_are_closed_and_the_client_reconnects(serve):
    server = serve(idle_timeout_s=0.3)
    with Client(*server.address) as client:
        client.pull()
        wait_until(lambda: server.stats()["connections"] == 0)
        assert client.commit(ONES).status == "applied"


@pytest.mark.parametrize(
    "delta,message",
    [
        ({"nope": np.ones(2, np.float32)}, "unknown tensor"),
        ({"bias": np.ones(5, np.float32)}, "shape"),
        ({"bias": np.array([1, np.nan, 0, 0], np.float32)}, "non-finite"),
    ],
)
def test_invalid_commits_are_rejected_and_the_connection_stays_usable(serve, delta, message):
    server = serve()
    with Client(*server.address) as client:
        with pytest.raises(ServerError, match=message) as error:
            client.commit(delta)
        assert error.value.code == "rejected"
        assert client.commit(ONES).status == "applied"
    assert server.state.counter == 1


def test_synchronous_round_holds_commits_and_pulls_wait_for_it(serve):
    server = serve(rule=SynchronousRound(2))
    with Client(*server.address) as first, Client(*server.address) as second:
        first.pull()
        second.pull()
        assert first.commit(ONES, tag=CommitTag(worker_id=0)).status == "pending"
        with pytest.raises(ServerError) as error:
            first.pull(min_counter=1, wait_s=0.1)
        assert error.value.code == "pull_timeout"
        with pytest.raises(ServerError, match="already committed"):
            first.commit(ONES, tag=CommitTag(worker_id=0))
        waiting = {}
        waiter = threading.Thread(target=lambda: waiting.update(result=first.pull(min_counter=1, wait_s=5)))
        waiter.start()
        time.sleep(0.1)
        assert second.commit(ONES, tag=CommitTag(worker_id=1)).status == "applied"
        waiter.join()
    weights, counter = waiting["result"]
    assert counter == 1
    np.testing.assert_array_equal(weights["bias"], np.full(4, 2, np.float32))


def test_three_shards_give_bit_identical_weights_to_one(serve):
    rng = np.random.default_rng(3)
    shapes = {
        "l0/kernel": (30, 50),
        "l0/bias": (50,),
        "l1/kernel": (50, 100),
        "l1/bias": (100,),
        "l2/kernel": (100, 50),
        "l2/bias": (50,),
        "l3/kernel": (50, 2),
        "l3/bias": (2,),
    }
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    layout = sharding.plan({name: value.nbytes for name, value in weights.items()}, 3)
    assert all(layout) and sorted(sum(layout, [])) == sorted(weights)
    single = serve(weights, StalenessScaled())
    shards = [serve({name: weights[name] for name in names}, StalenessScaled()) for names in layout]
    with Client(*single.address) as one, ShardedClient([s.address for s in shards]) as three:
        for step in range(12):
            if step % 3 == 0:  # pulls every third commit: staleness 0, 1, 2 scales the commits
                one.pull()
                three.pull()
            delta = {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in weights.items()}
            tag = CommitTag("query", step // 4, 0, step % 4)
            assert one.commit(delta, tag=tag) == three.commit(delta, tag=tag)
        assert one.commit(delta, tag=tag).status == three.commit(delta, tag=tag).status == "skipped"
        (w1, n1), (w3, n3) = one.pull(), three.pull()
        assert three.stats()["counter"] == three.pulled == n1 == n3 == 12
    assert w1.keys() == w3.keys()
    for name in w1:
        assert w1[name].dtype == w3[name].dtype and w1[name].tobytes() == w3[name].tobytes(), name


def test_publish_callback_runs_in_the_background_and_survives_failures(serve):
    published = queue.Queue()

    def on_publish(weights, counter, meta):
        published.put((threading.current_thread().name, counter, meta, weights["bias"].copy()))
        if counter <= 2:
            raise RuntimeError("registry unavailable")

    server = serve(on_publish=on_publish, publish_every_updates=2, publish_every_s=0.2)
    with Client(*server.address) as client:
        for batch in range(4):
            client.commit(ONES, tag=CommitTag("q", batch), meta={"offsets": {"events": {"0": batch}}})
    calls = []
    while not calls or calls[-1][1] < 4:
        calls.append(published.get(timeout=5))
    thread, counter, meta, bias = calls[-1]
    assert thread == "publish" and counter == 4 and meta["counter"] == 4
    assert meta["commits"]["q"] == {"offsets": {"events": {"0": 3}}, "rows": 0, "batch": 3}
    np.testing.assert_array_equal(bias, np.full(4, 4, np.float32))
    assert server.stats()["publish"]["error"] is None


def test_checkpoint_every_t_seconds_and_on_stop(tmp_path):
    checkpoint = Checkpoint(tmp_path / "ckpt")
    state = CenterState(WEIGHTS, UpdateRule())
    server = ParameterServer(
        state, checkpoint=checkpoint, checkpoint_every_updates=1000, checkpoint_every_s=0.2
    ).start()
    try:
        with Client(*server.address) as client:
            client.commit(ONES, tag=CommitTag("q", 1, 0, 0), meta={"offsets": {"events": {"0": 10}}})
            wait_until(lambda: client.stats()["checkpoint"]["counter"] == 1)
            client.commit(ONES, tag=CommitTag("q", 2, 0, 0), meta={"offsets": {"events": {"0": 20}}})
    finally:
        server.stop()
    snapshot = checkpoint.load()
    assert snapshot.counter == 2 and snapshot.guard["q"]["offsets"] == {"events": {"0": 20}}
    resumed = CenterState.from_snapshot(snapshot, UpdateRule())
    assert resumed.commit(ONES, pulled=2, tag=CommitTag("q", 2, 0, 0)).status == "skipped"
    weights, counter = resumed.pull()
    assert counter == 2 and list(weights) == list(WEIGHTS)
    np.testing.assert_array_equal(weights["kernel"], WEIGHTS["kernel"] + 2)
    names = sorted(p.name for p in checkpoint.directory.iterdir())
    assert len(names) == 2 and names[0] == "state.json" and names[1].startswith("weights-")  # old files are gone


@pytest.mark.parametrize("make_rule", [lambda: SynchronousRound(2), ReplicaSlots])
def test_rule_state_survives_a_restart(tmp_path, make_rule):
    state = CenterState(WEIGHTS, make_rule())
    state.commit(ONES, pulled=0, tag=CommitTag(worker_id=0))
    Checkpoint(tmp_path).save(state.snapshot())
    resumed = CenterState.from_snapshot(Checkpoint(tmp_path).load(), make_rule())
    for current in (state, resumed):
        current.commit(ONES, pulled=current.counter, tag=CommitTag(worker_id=1))
        weights, _ = current.pull(worker_id=0)
        np.testing.assert_array_equal(
            weights["bias"], np.full(4, 2 if isinstance(current.rule, SynchronousRound) else 1)
        )
    assert state.publication()[0].keys() == resumed.publication()[0].keys()
    assert state.counter == resumed.counter


def test_damaged_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.load() is None
    checkpoint.save(CenterState(WEIGHTS, UpdateRule()).snapshot())
    weights_file = next(tmp_path.glob("weights-*.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load()


# ------------------------------------------------------------------------------------------ the CLI


def _start_cli(cli_env, tmp_path, *args, shards=1, env=None):
    """Run ``streamfit ps --port 0 ARGS``; returns the process, the shards' addresses, and its stdout lines."""
    log_path = tmp_path / f"ps-{time.monotonic_ns()}.log"
    with open(log_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "ps", "--port", "0", *args],
            cwd=ROOT,
            env={**cli_env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    ports = []
    while len(ports) < shards:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"streamfit ps did not start: {log_path.read_text()}")
        if "listening on" in line:
            ports.append(int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]))
    return proc, [("127.0.0.1", port) for port in ports], lines


def _write_init(tmp_path) -> str:
    path = tmp_path / "init.safetensors"
    save_file(WEIGHTS, path)
    return str(path)


def test_kill_9_and_restart_resumes_from_the_checkpoint(cli_env, tmp_path):
    init = _write_init(tmp_path)
    env = {"STREAMFIT_PS_CHECKPOINT_EVERY_UPDATES": "1"}
    proc, [address], _ = _start_cli(cli_env, tmp_path, "--init-weights", init, env=env)
    try:
        with Client(*address) as client:
            client.pull()
            for seq in range(3):
                client.commit(ONES, tag=CommitTag("q", 1, 0, seq), meta={"offsets": {"events": {"0": seq}}})
            wait_until(lambda: client.stats()["checkpoint"]["counter"] == 3)
            before, _ = client.pull()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, [address], lines = _start_cli(cli_env, tmp_path, "--init-weights", init, env=env)
    try:
        with Client(*address) as client:
            after, counter = client.pull()
            assert counter == 3
            for name in WEIGHTS:
                assert after[name].tobytes() == before[name].tobytes()
            assert client.commit(ONES, tag=CommitTag("q", 1, 0, 2)).status == "skipped"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    output = []
    while not lines.empty():
        output.append(lines.get())
    assert any("stopped at counter 3" in line for line in output)


def test_cli_runs_shards_as_processes(cli_env, tmp_path):
    proc, addresses, _ = _start_cli(
        cli_env, tmp_path, "--init-weights", _write_init(tmp_path), "--shards", "2", shards=2
    )
    try:
        with ShardedClient(addresses) as client:
            weights, _ = client.pull()
            assert weights.keys() == WEIGHTS.keys()
            assert client.commit(ONES).counter == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    for index in range(2):
        snapshot = Checkpoint(Path(cli_env["STREAMFIT_HOME"]) / "ps" / "higgs" / f"shard-{index}-of-2").load()
        assert snapshot.counter == 1


def test_cli_without_weights_or_checkpoint_fails_clearly(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("STREAMFIT_HOME", str(tmp_path))
    assert main(["ps"]) == 1
    assert "no --init-weights" in capsys.readouterr().err


def _small_registry(cli_env) -> Path:
    """A registry under the CLI's home holding model ``small`` with a champion (version 1)."""
    from pipeline.bundle import ModelBundle
    from pipeline.registry import Registry
    from pipeline.spec import BUILTIN_SPECS

    registry = Registry(Path(cli_env["STREAMFIT_HOME"]) / "registry")
    registry.create_model(BUILTIN_SPECS["small"])
    registry.set_alias(
        "small", "champion", registry.register("small", ModelBundle(BUILTIN_SPECS["small"]).get_weights())
    )
    return registry


@pytest.mark.parametrize("shards", [1, 2])
def test_cli_starts_from_the_champion_and_publishes_announced_candidates(cli_env, tmp_path, kafka, topic, shards):
    from pipeline.kafka import ensure_topics
    from tests.kafka_reader import read_topic

    registry = _small_registry(cli_env)
    ensure_topics(kafka, {topic: 1})
    env = {
        "STREAMFIT_KAFKA_BOOTSTRAP": kafka,
        "STREAMFIT_TOPIC_MODEL_UPDATES": topic,
        "STREAMFIT_MODEL": "small",
        "STREAMFIT_PS_PUBLISH_EVERY_UPDATES": "2",
        "STREAMFIT_PS_PUBLISH_EVERY_S": "60",
    }
    proc, addresses, _ = _start_cli(cli_env, tmp_path, "--shards", str(shards), shards=shards, env=env)
    try:
        with ShardedClient(addresses) as client:
            start, _ = client.pull()
            champion = registry.weights("small", 1)[1]
            assert all(np.array_equal(start[name], champion[name]) for name in champion)
            ones = {name: np.ones_like(value) for name, value in start.items()}
            for seq in range(2):
                client.commit(ones, tag=CommitTag("q", 1, 0, seq), meta={"offsets": {"events": {"0": 10 + seq}}})
            wait_until(lambda: "candidate" in registry.aliases("small"), timeout=30)
            version = registry.resolve("small", "candidate")
            published = registry.weights("small", version)[1]
            assert all(np.allclose(published[name], champion[name] + 2) for name in champion)
            meta = registry.meta("small", version)
            assert meta["parent"] == 1 and meta["updates"] == 2 and meta["offsets"] == {"events": {"0": 11}}
            client.commit(ones)  # one more change: published on shutdown
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    final = registry.resolve("small", "candidate")
    assert final == version + 1 and registry.meta("small", final)["updates"] == 3
    announced = [json.loads(r.value) for r in read_topic(kafka, topic, expected=2)]
    assert [(e["alias"], e["version"]) for e in announced] == [("candidate", version), ("candidate", final)]


def test_cli_refuses_a_sharded_ensemble(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("STREAMFIT_HOME", str(tmp_path))
    assert main(["ps", "--algorithm", "ensemble", "--shards", "2"]) == 1
    assert "--shards 1" in capsys.readouterr().err


def test_cli_refuses_an_unauthenticated_public_address(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("STREAMFIT_HOME", str(tmp_path))
    assert main(["ps", "--host", "0.0.0.0"]) == 1
    assert "STREAMFIT_PS_SECRET" in capsys.readouterr().err
    monkeypatch.setenv("STREAMFIT_PS_SECRET", "")
    assert main(["ps"]) == 2  # a bad setting
    assert "empty secret" in capsys.readouterr().err


# ------------------------------------------------------------------------- metadata, rows, checkpoint()


def test_empty_secret_is_an_error_not_off():
    with pytest.raises(ValueError, match="empty"):
        ParameterServer(CenterState(WEIGHTS, UpdateRule()), secret=b"")
    with pytest.raises(ValueError, match="empty"):
        Client(secret=b"")


def test_queries_count_rows_of_accepted_commits_and_keep_the_latest_offsets():
    state = CenterState(WEIGHTS, UpdateRule())
    state.commit(ONES, pulled=0, tag=CommitTag("q", 4, 0, 0), meta={"offsets": {"events": {"0": 10}}, "rows": 5})
    state.commit(ONES, pulled=1, tag=CommitTag("q", 5, 1, 0), meta={"rows": 7})  # no offsets: the last ones stay
    assert state.commit(ONES, pulled=2, tag=CommitTag("q", 4, 0, 0), meta={"rows": 100}).status == "skipped"
    state.commit(ONES, pulled=2, meta={"rows": 3})
    assert state.stats()["queries"] == {
        "": {"offsets": {}, "rows": 3, "batch": -1},
        "q": {"offsets": {"events": {"0": 10}}, "rows": 12, "batch": 5},
    }


@pytest.mark.parametrize(
    "meta, problem",
    [
        ({"offsets": {"events": {"0": float("nan")}}}, "offsets.events.0"),
        ({"offsets": {"events": {"0": "10"}}}, "valid integer"),
        ({"offsets": {"events": {"zero": 1}}}, "pattern"),
        ({"rows": -1}, "rows"),
        ({"rows": True}, "rows"),
        ({"note": "hi"}, "Extra inputs"),
    ],
)
def test_invalid_metadata_or_an_empty_delta_is_rejected_and_nothing_changes(meta, problem):
    client = client_module.LocalClient(CenterState(WEIGHTS, UpdateRule()))
    with pytest.raises(server_module.CommitRejected, match=problem):
        client.commit(ONES, tag=CommitTag("q", 1), meta=meta)
    with pytest.raises(server_module.CommitRejected, match="no tensors"):
        client.commit({}, tag=CommitTag("q", 1))
    stats = client.stats()
    assert stats["counter"] == 0 and stats["queries"] == {} and json.dumps(stats, allow_nan=False)


def test_stats_reply_that_cannot_be_encoded_is_an_error_on_that_connection_only(serve, monkeypatch):
    server = serve()
    with Client(*server.address) as bystander, Client(*server.address) as asker:
        bystander.pull()
        monkeypatch.setattr(server.state, "stats", lambda: {"counter": float("nan")})
        with pytest.raises(ServerError) as error:
            asker.stats()
        assert error.value.code == "internal"
        assert bystander.commit(ONES).status == "applied"


def test_checkpoint_on_request_is_durable_when_it_answers(tmp_path):
    checkpoint = Checkpoint(tmp_path / "ckpt")
    state = CenterState(WEIGHTS, UpdateRule())
    with (
        ParameterServer(
            state, checkpoint=checkpoint, checkpoint_every_updates=10**6, checkpoint_every_s=3600
        ) as server,
        Client(*server.address) as client,
    ):
        client.commit(ONES, tag=CommitTag("q", 7, 0, 0), meta={"offsets": {"events": {"0": 42}}, "rows": 64})
        reply = client.checkpoint()
        expected = {"q": {"offsets": {"events": {"0": 42}}, "rows": 64, "batch": 7}}
        assert reply.written and reply.counter == 1 and reply.queries == expected
        resumed, found = CenterState.resume(
            Checkpoint(checkpoint.directory), UpdateRule(), lambda: pytest.fail("fresh")
        )
        assert found and resumed.counter == 1 and resumed.stats()["queries"] == expected
        again = client.checkpoint()  # nothing changed since: nothing written, the same answer
        assert not again.written and (again.counter, again.queries) == (1, expected)


def test_checkpoint_request_without_a_directory_or_failing_is_an_error_the_caller_sees(serve, tmp_path):
    with Client(*serve().address) as client:
        with pytest.raises(ServerError) as error:
            client.checkpoint()
        assert error.value.code == "no_checkpoint" and client.pull()[1] == 0  # the connection stays usable
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    server = serve(checkpoint=Checkpoint(blocker / "ckpt"), checkpoint_every_updates=10**6, checkpoint_every_s=3600)
    with Client(*server.address) as client:
        client.commit(ONES)
        with pytest.raises(ServerError) as error:
            client.checkpoint()
        assert error.value.code == "checkpoint_failed" and client.stats()["checkpoint"]["error"]


def test_a_failed_checkpoint_is_retried_while_idle(tmp_path):
    blocker = tmp_path / "ckpt"
    blocker.write_text("")  # the checkpoint directory cannot be created while this file is there
    state = CenterState(WEIGHTS, UpdateRule())
    with ParameterServer(
        state, checkpoint=Checkpoint(blocker), checkpoint_every_updates=1, checkpoint_every_s=3600
    ) as server:
        with Client(*server.address) as client:
            client.commit(ONES)
            wait_until(lambda: client.stats()["checkpoint"]["error"] is not None)
        blocker.unlink()  # no commit arrives after the fix: only a retry can write it
        wait_until(lambda: server.stats()["checkpoint"]["counter"] == 1)
    assert Checkpoint(blocker).load().counter == 1


def test_the_final_checkpoint_runs_when_the_last_one_failed(tmp_path):
    blocker = tmp_path / "ckpt"
    blocker.write_text("")
    state = CenterState(WEIGHTS, UpdateRule())
    server = ParameterServer(
        state, checkpoint=Checkpoint(blocker), checkpoint_every_updates=1, checkpoint_every_s=3600
    ).start()
    state.commit(ONES, pulled=0)
    wait_until(lambda: server.stats()["checkpoint"]["error"] is not None)
    blocker.unlink()
    server.stop()
    assert Checkpoint(blocker).load().counter == 1


def test_sharded_checkpoint_and_a_commit_that_misses_a_shard(tmp_path):
    layout = sharding.plan({name: value.size for name, value in WEIGHTS.items()}, 2)
    states = [CenterState({name: WEIGHTS[name] for name in names}, UpdateRule()) for names in layout]
    servers = [
        ParameterServer(state, checkpoint=Checkpoint(tmp_path / f"shard-{i}"), checkpoint_every_s=3600).start()
        for i, state in enumerate(states)
    ]
    try:
        with ShardedClient([s.address for s in servers]) as client:
            ack = client.commit({"bias": np.ones(4, np.float32)}, tag=CommitTag("q", 3), meta={"rows": 9})
            assert ack.status == "applied" and [s.counter for s in states] == [1, 1]  # both shards moved
            reply = client.checkpoint()
            assert reply.counter == 1 and reply.queries == {"q": {"offsets": {}, "rows": 9, "batch": 3}}
            assert client.stats()["queries"] == reply.queries
    finally:
        for server in servers:
            server.stop()
    weights = {}
    for i in range(2):
        weights.update(Checkpoint(tmp_path / f"shard-{i}").load().weights)
    np.testing.assert_array_equal(weights["bias"], np.ones(4, np.float32))
    np.testing.assert_array_equal(weights["kernel"], WEIGHTS["kernel"])


def test_checkpoint_with_invalid_or_old_metadata_loads_cleaned(tmp_path, caplog):
    checkpoint = Checkpoint(tmp_path)
    checkpoint.save(CenterState(WEIGHTS, UpdateRule()).snapshot())
    state_file = tmp_path / "state.json"
    stored = json.loads(state_file.read_text())
    stored["guard"] = {
        "bad": {"batch": 2, "applied": [[0, 0]], "offsets": {"events": {"0": float("nan")}}, "rows": 1},
        "old": {"batch": 3, "applied": [[1, 0]], "meta": {"offsets": {"events": {"1": 5}}}},
    }
    state_file.write_text(json.dumps(stored))  # NaN, as a server before the schema could write it
    resumed = CenterState.from_snapshot(checkpoint.load(), UpdateRule())
    assert resumed.stats()["queries"] == {
        "bad": {"offsets": {}, "rows": 0, "batch": 2},
        "old": {"offsets": {"events": {"1": 5}}, "rows": 0, "batch": 3},
    }
    assert "'bad' has invalid metadata" in caplog.text
    assert resumed.commit(ONES, pulled=0, tag=CommitTag("bad", 2, 0, 0)).status == "skipped"  # guard kept
    json.dumps(resumed.stats(), allow_nan=False)
