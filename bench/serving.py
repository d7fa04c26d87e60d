"""HTTP serving throughput on the default ~1.02 M-parameter model, next to a naive server and an echo.

``python -m bench.serving [--seconds S]`` prints one JSON object. At concurrency 1, 8 and 32,
single-row requests from a separate load-generator process go to, side by side in one run:

- ``streamfit``: ``POST /v1/models/higgs:predict`` of the serving app (dynamic batching, compiled
  inference), while a new version is registered and promoted every ``--swap-every`` seconds and
  announced on ``model-updates`` (a real embedded broker), so the server hot-swaps during the load;
- ``echo``: a route added to the same app and uvicorn that reads the body and returns a constant,
  no model: the ceiling of the HTTP stack (``efficiency_vs_echo`` = streamfit / echo, target >= 0.5);
- ``naive``: a FastAPI endpoint calling ``model.predict`` per request, as tutorials (and dist-keras)
  do (``speedup_vs_naive`` = streamfit / naive, target >= 20 at concurrency 32).

Each run reports requests/s, p50/p99 latency, errors (any non-200 answer or broken connection) and,
for streamfit, the swaps the server completed during it (target >= 10 at concurrency 32).

Then live evaluation of a candidate (``live_evaluation``), without promotions, in the same run: the
plain champion, a server with ``canary_share`` 0.05 and one with ``shadow`` on (each its own process,
with a ``candidate`` that differs from the champion), at concurrency 8 and 32.
``canary_vs_champion`` (target >= 0.9) and ``shadow_vs_champion`` (target >= 0.8) are requests/s
ratios at concurrency 32; ``shadow_p50_ms_added`` at concurrency 8 is shadow's p50 minus the champion's
(target: noise). The canary server's share of requests the candidate answered, and the shadow server's
rows scored, dropped and agreement, are read from their metrics.

The load generator speaks HTTP/1.1 over raw asyncio streams, one keep-alive connection per
concurrent client: on a 2-core machine it shares the CPU with the server, and an HTTP client
library costing several times more per request would measure itself as much as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson
from fastapi import Request

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.kafka import ensure_topics, topic_specs
from pipeline.model_updates import announcing_registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS

MODEL = "higgs"
SPEC = BUILTIN_SPECS[MODEL]
HOST = "127.0.0.1"
ECHO = "/bench/echo"


# ------------------------------------------------------------------------------------------ servers


def _streamfit_server(port: int) -> None:
    """The serving app exactly as ``streamfit serve`` runs it, plus the echo route."""
    from serving.app import create_app, run

    settings = load_settings(serve_port=port)
    app = create_app(settings, [MODEL])

    @app.post(ECHO)
    async def echo(request: Request) -> dict:
        await request.body()
        return {"predictions": [[0.5, 0.5]], "model_version": 0}

    run(app, settings)


def _naive_server(port: int) -> None:
    """One ``model.predict`` per request, in FastAPI's thread pool (a plain ``def`` endpoint)."""
    import uvicorn
    from fastapi import FastAPI

    from pipeline.registry import Registry

    settings = load_settings()
    bundle = Registry(settings.registry_url).load(MODEL, engine="tensorflow")
    bundle.model.predict(np.zeros((1, SPEC.n_features), np.float32), verbose=0)
    app = FastAPI()

    @app.post(f"/v1/models/{MODEL}:predict")
    def predict(body: dict) -> dict:
        x = np.asarray(body["instances"], np.float32)
        return {"predictions": bundle.model.predict(x, verbose=0).tolist(), "model_version": bundle.version}

    uvicorn.run(app, host=HOST, port=port, access_log=False, log_level="warning")


# ------------------------------------------------------------------------------------------ load


async def _client(port: int, request: bytes, stop_at: float, measure_from: float, latencies: list, tally: dict) -> None:
    """One keep-alive connection sending ``request`` back to back until ``stop_at``."""
    reader = writer = None
    while (now := time.perf_counter()) < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            start = lower.index(b"content-length:") + 15
            body = await reader.readexactly(int(lower[start : lower.index(b"\r\n", start)]))
            ok = head[9:12] == b"200"
            if ok:
                tally["versions"].add(orjson.loads(body)["model_version"])
            else:
                tally["samples"].append(f"{head[9:12].decode()} {body[:200].decode(errors='replace')}")
            if b"connection: close" in lower:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            ok = False
            tally["samples"].append(repr(exc))
            if writer is not None:
                writer.close()
            writer = None
        if now >= measure_from:
            if ok:
                latencies.append(time.perf_counter() - now)
            else:
                tally["errors"] += 1
    if writer is not None:
        writer.close()


def _load(port: int, path: str, concurrency: int, seconds: float, warmup: float, results) -> None:
    """Process entry: ``concurrency`` clients for ``warmup + seconds``; measures the last ``seconds``."""
    rng = np.random.default_rng(concurrency)
    bodies = [orjson.dumps({"instances": [rng.normal(size=SPEC.n_features).round(4).tolist()]}) for _ in range(64)]
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    latencies: list[float] = []
    tally = {"errors": 0, "versions": set(), "samples": []}

    async def main() -> None:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                _client(port, requests[i % len(requests)], start + warmup + seconds, start + warmup, latencies, tally)
                for i in range(concurrency)
            )
        )

    asyncio.run(main())
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    results.put(
        {
            "rps": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests": len(latencies),
            "errors": tally["errors"],
            "versions_seen": sorted(tally["versions"]),
            "error_samples": tally["samples"][:3],
        }
    )


def measure(port: int, path: str, concurrency: int, seconds: float, warmup: float) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_load, args=(port, path, concurrency, seconds, warmup, results))
    process.start()
    result = results.get(timeout=warmup + seconds + 120)
    process.join()
    if not result["error_samples"]:
        del result["error_samples"]
    return result


# ------------------------------------------------------------------------------------------ orchestration


def _initial_weights(seed: int) -> dict[str, np.ndarray]:
    """He-initialised weights of the spec's shapes (numpy, so this process never imports TensorFlow)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in SPEC.weight_shapes.items():
        if name == "standardise/std":
            weights[name] = np.ones(shape, np.float32)
        elif name.endswith("/kernel"):
            weights[name] = rng.normal(scale=np.sqrt(2 / shape[0]), size=shape).astype(np.float32)
        else:
            weights[name] = np.zeros(shape, np.float32)
    return weights


class Promoter(threading.Thread):
    """Registers a slightly changed version and makes it champion every ``interval`` s while ``active``."""

    def __init__(self, settings, interval: float):
        super().__init__(daemon=True)
        self.registry, self.announcer = announcing_registry(settings, required=True)
        self.interval = interval
        self.active, self.stopped = threading.Event(), threading.Event()
        self.weights = _initial_weights(0)
        self.rng = np.random.default_rng(1)

    def run(self) -> None:
        while not self.stopped.is_set():
            if not self.active.wait(0.1):
                continue
            changed = {
                k: v + self.rng.normal(scale=1e-3, size=v.shape).astype(np.float32) if k.endswith("/kernel") else v
                for k, v in self.weights.items()
            }
            version = self.registry.register(
                MODEL, changed, parent=self.registry.resolve(MODEL, "champion"), algorithm="bench"
            )
            self.registry.promote(MODEL, version)
            self.stopped.wait(self.interval)

    def close(self) -> None:
        self.stopped.set()
        self.join()
        self.announcer.close()


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as answer:
        return answer.read()


def _wait_ready(port: int, path: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(port, path)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"server on port {port} did not become ready: {process.stderr.read().decode()[-2000:]}"
                ) from None
            time.sleep(0.25)


def _scrape(port: int, name: str) -> float:
    """The sum of a metric's samples on the streamfit server's /metrics (those whose labels contain ``name``'s
    when it has some: ``streamfit_model_requests_total{model="higgs",version="2"``)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in _get(port, "/metrics").decode().splitlines()
        if line.startswith(name + ("," if "{" in name else "{"))
        or line.startswith(name + ("}" if "{" in name else " "))
    )


def _start_server(role: str, port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.serving", "--role", role, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def live_evaluation(
    promoter: Promoter, env: dict, champion_port: int, seconds: float, warmup: float, rounds: int
) -> dict:
    """The champion alone, under 5 % canary and with shadow, side by side (see the module's docstring), in
    ``rounds`` interleaved rounds: on a shared machine load from elsewhere then falls on every server alike."""
    registry = promoter.registry
    candidate = registry.register(MODEL, _initial_weights(7), algorithm="bench-candidate")
    registry.set_alias(MODEL, "candidate", candidate)
    live = {"canary": {"STREAMFIT_CANARY_SHARE": "0.05"}, "shadow": {"STREAMFIT_SHADOW": "true"}}
    ports = {"champion": champion_port} | {name: free_port(HOST) for name in live}
    servers = {name: _start_server("streamfit", ports[name], env | extra) for name, extra in live.items()}
    path = f"/v1/models/{MODEL}:predict"
    try:
        for name, server in servers.items():
            _wait_ready(ports[name], "/readyz", server)
            deadline = time.monotonic() + 60
            while _scrape(ports[name], "streamfit_model_version_loads_total") < 1:  # the candidate is loaded
                if time.monotonic() > deadline:
                    raise SystemExit(f"the {name} server did not load the candidate within 60 s")
                time.sleep(0.2)
        answered = f'streamfit_model_requests_total{{model="{MODEL}",version="{candidate}"'
        canary_before, all_before = (
            _scrape(ports["canary"], answered),
            _scrape(ports["canary"], "streamfit_model_requests_total"),
        )
        measured = [
            {
                "round": k,
                "concurrency": concurrency,
                **{name: measure(ports[name], path, concurrency, seconds, warmup) for name in names},
            }
            for k in range(rounds)
            for concurrency, names in ((8, ("champion", "shadow")), (32, ("champion", "canary", "shadow")))
        ]
        canary_share = (_scrape(ports["canary"], answered) - canary_before) / max(
            _scrape(ports["canary"], "streamfit_model_requests_total") - all_before, 1
        )
        shadow = {
            "rows_scored": int(_scrape(ports["shadow"], "streamfit_shadow_rows_total")),
            "rows_dropped": int(_scrape(ports["shadow"], "streamfit_shadow_dropped_rows_total")),
            "agreement_ratio": round(_scrape(ports["shadow"], "streamfit_shadow_agreement_ratio"), 4),
            "distribution_difference_ratio": round(
                _scrape(ports["shadow"], "streamfit_shadow_distribution_difference_ratio"), 4
            ),
        }
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(60)
    at8, at32 = _combine(measured, 8), _combine(measured, 32)
    return {
        "candidate_version": candidate,
        "canary_share_setting": 0.05,
        "canary_share_answered": round(canary_share, 4),
        "shadow": shadow,
        "canary_vs_champion": round(at32["canary"]["rps"] / max(at32["champion"]["rps"], 1e-9), 3),
        "target_canary_vs_champion": 0.9,
        "shadow_vs_champion": round(at32["shadow"]["rps"] / max(at32["champion"]["rps"], 1e-9), 3),
        "target_shadow_vs_champion": 0.8,
        "shadow_p50_ms_added_at_concurrency_8": round(at8["shadow"]["p50_ms"] - at8["champion"]["p50_ms"], 2),
        "shadow_p99_ms_added_at_concurrency_8": round(at8["shadow"]["p99_ms"] - at8["champion"]["p99_ms"], 2),
        "combined": {"concurrency_8": at8, "concurrency_32": at32},
        "runs": measured,
    }


def _combine(rounds: list[dict], concurrency: int) -> dict:
    """Per server, over the rounds at ``concurrency``: mean requests/s, median p50 and p99, errors summed."""
    runs = [r for r in rounds if r["concurrency"] == concurrency]
    names = [name for name in runs[0] if name not in ("round", "concurrency")]
    return {
        name: {
            "rps": round(float(np.mean([r[name]["rps"] for r in runs])), 1),
            "p50_ms": round(float(np.median([r[name]["p50_ms"] for r in runs])), 2),
            "p99_ms": round(float(np.median([r[name]["p99_ms"] for r in runs])), 2),
            "errors": sum(r[name]["errors"] for r in runs),
        }
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument(
        "--swap-every", type=float, default=0.4, help="seconds between promotions during streamfit runs"
    )
    parser.add_argument(
        "--live-rounds", type=int, default=2, help="interleaved rounds of the champion/canary/shadow comparison"
    )
    parser.add_argument("--role", choices=["streamfit", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        (_streamfit_server if args.role == "streamfit" else _naive_server)(args.port)
        return

    with tempfile.TemporaryDirectory() as home, EmbeddedBroker("noida", data_dir=Path(home) / "broker") as broker:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STREAMFIT_")},
            "STREAMFIT_HOME": home,
            "STREAMFIT_KAFKA_BOOTSTRAP": broker.bootstrap,
        }
        settings = load_settings(home=home, kafka_bootstrap=broker.bootstrap)
        ensure_topics(broker.bootstrap, topic_specs(settings))
        promoter = Promoter(settings, args.swap_every)
        promoter.registry.create_model(SPEC)
        promoter.registry.set_alias(
            MODEL, "champion", promoter.registry.register(MODEL, promoter.weights, algorithm="init")
        )
        ports = {"streamfit": free_port(HOST), "naive": free_port(HOST)}
        servers = {role: _start_server(role, port, env) for role, port in ports.items()}
        try:
            _wait_ready(ports["streamfit"], "/readyz", servers["streamfit"])
            _wait_ready(ports["naive"], "/docs", servers["naive"])
            promoter.start()
            sf = ports["streamfit"]
            rss_before = _scrape(sf, "process_resident_memory_bytes")
            runs = []
            for concurrency in (1, 8, 32):
                run = {"concurrency": concurrency}
                swaps = _scrape(sf, "streamfit_model_swaps_total")
                promoter.active.set()
                run["streamfit"] = measure(sf, f"/v1/models/{MODEL}:predict", concurrency, args.seconds, args.warmup)
                promoter.active.clear()
                time.sleep(2 * args.swap_every)  # the last promotion lands before counting
                run["streamfit"]["swaps"] = int(_scrape(sf, "streamfit_model_swaps_total") - swaps)
                run["echo"] = measure(sf, ECHO, concurrency, args.seconds, args.warmup)
                run["naive"] = measure(
                    ports["naive"], f"/v1/models/{MODEL}:predict", concurrency, args.seconds, args.warmup
                )
                run["speedup_vs_naive"] = round(run["streamfit"]["rps"] / max(run["naive"]["rps"], 1e-9), 1)
                run["efficiency_vs_echo"] = round(run["streamfit"]["rps"] / max(run["echo"]["rps"], 1e-9), 3)
                runs.append(run)
            rss_after = _scrape(sf, "process_resident_memory_bytes")
            batch_rows = _scrape(sf, "streamfit_batch_rows_sum") / max(_scrape(sf, "streamfit_batch_rows_count"), 1)
            live = live_evaluation(promoter, env, sf, args.seconds, args.warmup, args.live_rounds)
        finally:
            promoter.close()
            for process in servers.values():
                process.terminate()
            for process in servers.values():
                process.wait(60)
    last = runs[-1]
    print(
        json.dumps(
            {
                "benchmark": "serving",
                "model": MODEL,
                "parameters": int(sum(np.prod(s) for s in SPEC.weight_shapes.values())),
                "seconds_per_run": args.seconds,
                "request_rows": 1,
                "max_batch_size": settings.max_batch_size,
                "max_batch_wait_ms": settings.max_batch_wait_ms,
                "swap_every_s": args.swap_every,
                "at_concurrency_32": {
                    "speedup_vs_naive": last["speedup_vs_naive"],
                    "target_speedup": 20,
                    "efficiency_vs_echo": last["efficiency_vs_echo"],
                    "target_efficiency": 0.5,
                    "swaps": last["streamfit"]["swaps"],
                    "target_swaps": 10,
                },
                "errors": sum(r[k]["errors"] for r in runs for k in ("streamfit", "echo", "naive"))
                + sum(server["errors"] for run in live["combined"].values() for server in run.values()),
                "swaps": sum(r["streamfit"]["swaps"] for r in runs),
                "mean_rows_per_forward_pass": round(batch_rows, 2),
                "server_rss_mb": {"before": round(rss_before / 2**20, 1), "after": round(rss_after / 2**20, 1)},
                "runs": runs,
                "live_evaluation": live,
            }
        )
    )


if __name__ == "__main__":
    main()
