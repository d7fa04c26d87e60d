"""The parameter server's Prometheus metrics, scraped over HTTP from a real server on loopback:
every counter moves by exactly what the clients did, and ``streamfit ps --metrics-port`` serves them."""

from __future__ import annotations

import signal
import socket

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline.metrics import serve
from pipeline.ps.algorithms import UpdateRule
from pipeline.ps.checkpoint import Checkpoint
from pipeline.ps.client import Client, ServerError
from pipeline.ps.protocol import HEADER, CommitTag, FrameReader, MsgType
from pipeline.ps.server import CenterState, ParameterServer
from tests.helpers import STREAMFIT, scrape, start_with_metrics
from tests.waiting import wait_until

SECRET = b"metrics-test-secret"
WEIGHTS = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
DELTA = {name: np.full_like(value, 0.5) for name, value in WEIGHTS.items()}


def refused(samples: dict, reason: str) -> float:
    return samples[f'streamfit_ps_refused_frames_total{{reason="{reason}"}}']


@pytest.fixture
def served(tmp_path):
    """A server with a checkpoint, a publisher that fails once, one connection at most, and its metrics on HTTP."""
    published = []

    def publish(weights, counter, meta):
        published.append(counter)
        if len(published) == 1:
            raise OSError("registry unreachable")

    server = ParameterServer(
        CenterState(WEIGHTS, UpdateRule()),
        secret=SECRET,
        max_connections=1,
        checkpoint=Checkpoint(tmp_path / "ck"),
        on_publish=publish,
        publish_every_updates=5,
        publish_every_s=3600,
    ).start()
    exporter = serve(server.metrics.registry, 0, host="127.0.0.1")
    yield server, exporter.server_port, published
    exporter.shutdown()
    server.stop()


def test_counters_move_by_exactly_what_the_clients_did(served):
    server, port, published = served
    before = scrape(port)
    assert before["streamfit_ps_commits_total"] == 0 and refused(before, "auth") == 0

    with Client(*server.address, secret=SECRET) as client:
        client.pull()
        client.pull()  # 2 pulls, then 5 commits on the same pull: staleness 0, 1, 2, 3, 4
        for seq in range(5):
            client.commit(DELTA, tag=CommitTag("q", 7, 0, seq))
        assert client.commit(DELTA, tag=CommitTag("q", 7, 0, 2)).status == "skipped"  # a replay
        with pytest.raises(ServerError, match="rejected"):
            client.commit(DELTA, meta={"rows": -1})
        client.checkpoint()
        wait_until(lambda: len(published) == 2, 10)  # the first publication failed, its retry worked
        during = scrape(port)
        assert during["streamfit_ps_connections"] == 1
    closed(port)  # one connection at a time: the next would be refused as busy
    with Client(*server.address) as stranger, pytest.raises(ServerError, match="auth"):  # no secret
        stranger.pull()
    closed(port)
    assert error_code(server.address, b"GET / HTTP/1.1\r\n".ljust(HEADER.size)) == "protocol"  # not our protocol
    closed(port)
    after = scrape(port)

    assert after["streamfit_ps_pulls_total"] == 2
    assert after["streamfit_ps_commits_total"] == 5
    assert after["streamfit_ps_updates_total"] == 5 == after["streamfit_ps_update_counter"]
    assert after["streamfit_ps_replayed_commits_total"] == 1
    assert refused(after, "rejected") == 1 and refused(after, "protocol") == 1 and refused(after, "auth") == 1
    assert refused(after, "busy") == 0
    assert after["streamfit_ps_commit_staleness_count"] == 5
    assert after["streamfit_ps_commit_staleness_sum"] == 0 + 1 + 2 + 3 + 4
    assert after['streamfit_ps_commit_staleness_bucket{le="0.0"}'] == 1
    stats = server.stats()
    assert after["streamfit_ps_received_bytes_total"] == stats["bytes_in"] > 5 * 60
    assert after["streamfit_ps_sent_bytes_total"] == stats["bytes_out"] > 2 * 60
    assert after["streamfit_ps_checkpoint_duration_seconds_count"] == 1
    assert after["streamfit_ps_checkpoint_failures_total"] == 0
    assert after["streamfit_ps_publish_duration_seconds_count"] == 2
    assert after["streamfit_ps_publish_failures_total"] == 1
    assert after["streamfit_ps_connections"] == 0


def test_a_connection_past_the_bound_counts_as_busy(served):
    server, port, _ = served
    with Client(*server.address, secret=SECRET) as first:
        first.pull()
        assert error_code(server.address, b"") == "busy"
    assert refused(scrape(port), "busy") == 1 and refused(scrape(port), "protocol") == 0


def closed(port: int) -> None:
    """Wait until the server has no connection open, as its metrics say."""
    wait_until(lambda: scrape(port)["streamfit_ps_connections"] == 0, 10)


def error_code(address: tuple[str, int], payload: bytes) -> str:
    """The code of the ERROR frame the server answers ``payload`` with on a new connection."""
    with socket.create_connection(address, 5) as sock:
        sock.sendall(payload)
        reply = FrameReader(sock, secret=SECRET).read(idle_timeout=5, frame_timeout=5)
    assert reply is not None and reply.type == MsgType.ERROR, reply
    return reply.meta["code"]


def test_streamfit_ps_serves_its_metrics_on_the_metrics_port(cli_env, tmp_path):
    init = tmp_path / "init.safetensors"
    save_file(WEIGHTS, str(init))
    argv = [*STREAMFIT, "ps", "--model", "m", "--init-weights", str(init), "--port", "0", "--metrics-port", "0"]
    env = cli_env | {"STREAMFIT_REGISTRY": str(tmp_path / "registry")}
    process, line, metrics_port = start_with_metrics(argv, env, "stdout")
    try:
        ps_port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        with Client("127.0.0.1", ps_port) as client:
            client.pull()
            for seq in range(3):
                client.commit(DELTA, tag=CommitTag("cli", 1, 0, seq))
        samples = scrape(metrics_port)
        assert samples["streamfit_ps_commits_total"] == 3 == samples["streamfit_ps_updates_total"]
        assert samples["streamfit_ps_pulls_total"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
