"""Parameter-server throughput for the default ~1.02 M-parameter model, next to raw loopback TCP.

``python -m bench.ps [--seconds S]`` prints one JSON object: for 1, 2 and 4 worker
processes, commits/s, pulls/s, MB/s each way and p50/p99 round trips against a
``streamfit ps`` subprocess; and, in the same run, a raw loopback TCP copy of the same
byte count (send a commit's bytes, receive a pull's bytes). ``efficiency`` = PS
bytes/s / raw bytes/s with one worker (target >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from pipeline.broker import free_port
from pipeline.ps.client import Client
from pipeline.spec import BUILTIN_SPECS

SHAPES = BUILTIN_SPECS["higgs"].weight_shapes  # the default spec's tensors, without importing TensorFlow


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(scale=0.01, size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _worker(port: int, worker_id: int, seconds: float, results) -> None:
    delta = {name: np.full(shape, 1e-6, np.float32) for name, shape in SHAPES.items()}
    pulls, commits = [], []
    with Client("127.0.0.1", port) as client:
        client.pull(worker_id=worker_id)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            client.pull(worker_id=worker_id)
            pulled = time.perf_counter()
            client.commit(delta)
            commits.append(time.perf_counter() - pulled)
            pulls.append(pulled - started)
    results.put((pulls, commits))


def _raw_echo_server(listener: socket.socket, nbytes: int) -> None:
    """Receive ``nbytes``, answer with ``nbytes``: the floor any TCP protocol pays for a commit and a pull."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    while True:
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:])
            if not n:
                return
            got += n
        conn.sendall(view)


def raw_bytes_per_s(nbytes: int, seconds: float) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    context = multiprocessing.get_context("fork")
    server = context.Process(target=_raw_echo_server, args=(listener, nbytes), daemon=True)
    server.start()
    payload = memoryview(bytearray(os.urandom(1024) * (nbytes // 1024 + 1))[:nbytes])
    inbox = memoryview(bytearray(nbytes))
    moved = 0
    with socket.create_connection(listener.getsockname()) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            conn.sendall(payload)
            got = 0
            while got < nbytes:
                got += conn.recv_into(inbox[got:])
            moved += 2 * nbytes
        elapsed = time.perf_counter() - started
    server.terminate()
    listener.close()
    return moved / elapsed


def run_workers(port: int, workers: int, seconds: float, tensor_bytes: int) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(port, i, seconds, results)) for i in range(workers)]
    for process in processes:
        process.start()
    outcome = [results.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join()
    pulls = np.array([t for p, _ in outcome for t in p])
    commits = np.array([t for _, c in outcome for t in c])

    def ms(values, q):
        return round(float(np.percentile(values, q)) * 1000, 2)

    return {
        "workers": workers,
        "pulls_per_s": round(len(pulls) / seconds, 1),
        "commits_per_s": round(len(commits) / seconds, 1),
        "pull_mb_per_s": round(len(pulls) * tensor_bytes / seconds / 1e6, 1),
        "commit_mb_per_s": round(len(commits) * tensor_bytes / seconds / 1e6, 1),
        "pull_p50_ms": ms(pulls, 50),
        "pull_p99_ms": ms(pulls, 99),
        "commit_p50_ms": ms(commits, 50),
        "commit_p99_ms": ms(commits, 99),
        "bytes_per_s": (len(pulls) + len(commits)) * tensor_bytes / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per configuration")
    args = parser.parse_args()
    initial = weights()
    tensor_bytes = sum(w.nbytes for w in initial.values())
    with tempfile.TemporaryDirectory() as home:
        init = Path(home) / "init.safetensors"
        save_file(initial, str(init))
        port = free_port("127.0.0.1")
        env = {**os.environ, "STREAMFIT_HOME": home}
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "ps",
                "--init-weights",
                str(init),
                "--port",
                str(port),
                "--algorithm",
                "downpour",
                "--model",
                "bench",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"streamfit ps did not start: {server.stderr.read().decode()}") from None
                    time.sleep(0.1)
            raw = raw_bytes_per_s(tensor_bytes, args.seconds)
            runs = [run_workers(port, n, args.seconds, tensor_bytes) for n in (1, 2, 4)]
        finally:
            server.terminate()
            server.wait(60)
    print(
        json.dumps(
            {
                "benchmark": "ps",
                "parameters": tensor_bytes // 4,
                "tensor_mb": round(tensor_bytes / 1e6, 2),
                "raw_tcp_mb_per_s": round(raw / 1e6, 1),
                "efficiency": round(runs[0]["bytes_per_s"] / raw, 3),
                "target_efficiency": 0.5,
                "runs": [{k: v for k, v in r.items() if k != "bytes_per_s"} for r in runs],
            }
        )
    )


if __name__ == "__main__":
    main()
