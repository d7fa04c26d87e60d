"""A long ``streamfit up`` run under serving load and forced promotions: does anything grow?

``python -m bench.soak [--minutes 30] [--rate 1000]`` runs ``streamfit up`` (model ``small``, a fresh
home, its embedded broker) for ``--minutes`` after start-up, with:

- a champion move every 20 s through serving's admin API (promote the newest version when it is not
  champion, else roll back), on top of the gate's own auto-promotions;
- serving load from a separate process (multiprocessing, spawn): single-row predictions at
  ``--load-rate`` requests/s (4 paced client threads), every status code and error kind counted,
  every change of the answering
  ``model_version`` counted (a swap seen by a client: the most any one client saw);
- every ~10 s: the resident memory and open file descriptors of every process of the run, by role
  (``up`` driver, broker, ps, serve, Spark JVM, Spark Python workers, producer), and both queries'
  consumer lag: events produced (the end offsets of ``events``) minus the events the query has
  processed (the ``events`` offsets of its last committed micro-batch, read from its checkpoint).

It prints one JSON object: memory and descriptors per role after warm-up (5 minutes in, or 1/6 of a
shorter run) and at the end, RSS growth % per role (the median of the samples of the last five minutes
over the median of those of the five minutes right after warm-up), the lag series and its quarter means, request
counts and errors, swaps (seen by the load, and serving's ``streamfit_model_swaps`` counter), and
targets with a ``met`` flag each: RSS growth < 10 % per role, descriptors end - start <= 10 per role,
lag without an upward trend (mean over the last quarter <= 1.5 x the mean over the second quarter,
the latter floored at one second of events), 0 request errors.

:class:`bench.e2e.UpRun` runs ``up``; :mod:`bench.processes` finds and measures its processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.e2e import UpRun
from bench.processes import ROLES, EventCount, committed_events, snapshot
from pipeline.registry import Registry, RegistryError

ADMIN_TOKEN = "soak-admin"
SAMPLE_EVERY_S = 10.0
PROMOTE_EVERY_S = 20.0
RSS_GROWTH_TARGET_PCT = 10.0
RSS_WINDOW_S = 300.0
"""Seconds of memory samples (one every :data:`SAMPLE_EVERY_S`) whose median stands for the start and for
the end of the run. The embedded broker's RSS swings by half a gigabyte as it snapshots its log and
drops expired segments, a few minutes apart: five one-minute samples (this bench's first estimator)
put its growth anywhere from -1 % to +19 % between runs that ended alike."""
FD_SLACK = 10
LAG_TREND_FACTOR = 1.5


# ------------------------------------------------------------------------------------------ serving load

LOAD_CLIENTS = 4
"""Paced clients in the load process: a single one, waiting for each answer, falls short of 50/s on a busy box."""


def serving_load(url: str, model: str, n_features: int, rate: float, stop, results) -> None:
    """Runs in its own process: ``rate`` single-row predictions/s from :data:`LOAD_CLIENTS` paced clients
    (threads) until ``stop`` is set, then sends its counts through ``results``."""
    statuses: Counter = Counter()
    errors: Counter = Counter()
    versions: Counter = Counter()
    latencies: list[float] = []
    changes: list[int] = []
    lock = threading.Lock()
    started = time.monotonic()

    def client_loop(seed: int) -> None:
        rng, share = random.Random(seed), rate / LOAD_CLIENTS
        mine: Counter = Counter()
        waits: list[float] = []
        changed, last_version, sent = 0, None, 0
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.is_set():
                due = started + (sent + seed / LOAD_CLIENTS) / share
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                elif now - due > 1.0:  # fell a second behind: skip the missed ticks instead of bursting
                    sent = int((now - started) * share)
                row = [rng.uniform(0.0, 1.0) for _ in range(n_features)]
                began = time.perf_counter()
                try:
                    answer = client.post(f"/v1/models/{model}:predict", json={"instances": [row]})
                    mine["status " + str(answer.status_code)] += 1
                    if answer.status_code == 200:
                        version = answer.json()["model_version"]
                        mine["version " + str(version)] += 1
                        changed += last_version is not None and version != last_version
                        last_version = version
                    else:
                        try:
                            message = answer.json().get("error", "")
                        except ValueError:
                            message = answer.text
                        mine[f"error {answer.status_code} {str(message)[:120]}"] += 1
                except httpx.HTTPError as exc:
                    mine["status transport error"] += 1
                    mine["error " + type(exc).__name__] += 1
                waits.append(time.perf_counter() - began)
                sent += 1
        with lock:
            for key, count in mine.items():
                kind, _, name = key.partition(" ")
                {"status": statuses, "version": versions, "error": errors}[kind][name] += count
            latencies.extend(waits)
            changes.append(changed)

    clients = [threading.Thread(target=client_loop, args=(i,)) for i in range(LOAD_CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1) if latencies else None

    seconds = time.monotonic() - started
    results.send(
        {
            "requests": sum(statuses.values()),
            "seconds": round(seconds, 1),
            "clients": LOAD_CLIENTS,
            "requests_per_s": round(sum(statuses.values()) / max(seconds, 1e-9), 1),
            "status_codes": dict(statuses),
            "errors": sum(errors.values()),
            "error_kinds": dict(errors),
            "version_changes_seen": max(changes, default=0),
            "versions_answered": len(versions),
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0)},
        }
    )
    results.close()


class Load:
    """:func:`serving_load` in a spawned process."""

    def __init__(self, url: str, model: str, n_features: int, rate: float):
        context = multiprocessing.get_context("spawn")
        self.stop_event = context.Event()
        self.receive, send = context.Pipe(duplex=False)
        self.process = context.Process(
            target=serving_load,
            args=(url, model, n_features, rate, self.stop_event, send),
            name="soak-serving-load",
            daemon=True,
        )
        self.process.start()
        send.close()

    def finish(self, timeout_s: float = 60.0) -> dict:
        self.stop_event.set()
        try:
            result = self.receive.recv() if self.receive.poll(timeout_s) else None
        except EOFError:  # the load process died
            result = None
        result = result or {
            "errors": None,
            "note": f"the load process sent nothing (exit code {self.process.exitcode})",
        }
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
        return result


# ---------------------------------------------------------------------------------------- promotions


class Promoter(threading.Thread):
    """Every ``every_s``, through serving's admin API: promote the newest version, or the one before the champion
    when the newest already is champion, so the champion moves every time."""

    def __init__(self, run: UpRun, every_s: float):
        super().__init__(daemon=True)
        self.run_, self.every_s = run, every_s
        self.stopped = threading.Event()
        self.moves: Counter = Counter()
        self.failures: Counter = Counter()

    def run(self) -> None:
        registry = Registry(self.run_.home / "registry")
        model = self.run_.model
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=self.run_.url, headers=headers, timeout=60) as client:
            while not self.stopped.wait(self.every_s):
                try:
                    versions, champion = registry.versions(model), registry.resolve(model, "champion")
                    if versions[-1] != champion:
                        action, target = "promote newest", versions[-1]
                    elif any(v < champion for v in versions):  # the gate got there first: go back one version
                        action, target = "promote older", max(v for v in versions if v < champion)
                    else:
                        self.moves["skipped: no other version yet"] += 1
                        continue
                    answer = client.post(f"/admin/models/{model}/promote", json={"version": target})
                except (RegistryError, OSError, ValueError, IndexError, httpx.HTTPError) as exc:
                    self.failures[type(exc).__name__] += 1
                    continue
                if answer.status_code == 200:
                    self.moves[action] += 1
                else:
                    self.failures[f"{action} {answer.status_code} {answer.text[:120]}"] += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=90)


def served_swaps(url: str, model: str) -> int | None:
    """Serving's own count of completed swaps (``streamfit_model_swaps``)."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "streamfit_model_swaps":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("model") == model:
                    return int(sample.value)
    return None


# -------------------------------------------------------------------------------------------- figures


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def lag_trend(series: list[tuple], index: int, duration_s: float, floor: float) -> dict:
    """Mean lag over the second and the last quarter of the run; met when the last <= factor x the second."""
    second = [s[index] for s in series if s[index] is not None and duration_s / 4 <= s[0] < duration_s / 2]
    last = [s[index] for s in series if s[index] is not None and s[0] >= 3 * duration_s / 4]
    q2, q4 = _mean(second), _mean(last)
    met = q2 is not None and q4 is not None and q4 <= LAG_TREND_FACTOR * max(q2, floor)
    return {
        "second_quarter_mean": q2,
        "last_quarter_mean": q4,
        "max": max((s[index] for s in series if s[index] is not None), default=None),
        "ratio": round(q4 / max(q2, floor), 2) if q2 is not None and q4 is not None else None,
        "met": met,
    }


def rss_window(memory: list[dict], warm_up_s: float) -> tuple[list[dict], list[dict]]:
    """The memory samples RSS growth compares: those of :data:`RSS_WINDOW_S` right after warm-up and as
    many at the end (a quarter of the run after warm-up each on a short run, never overlapping)."""
    after = [m for m in memory if m["t"] >= warm_up_s]
    n = max(1, min(round(RSS_WINDOW_S / SAMPLE_EVERY_S), len(after) // 4))
    return after[:n], after[-n:]


def figures(start: dict, end: dict, memory: list[dict], warm_up_s: float) -> dict:
    """Per role: the snapshots after warm-up and at the end, descriptor delta, and RSS growth as the
    median of the last samples over the median of the first (one snapshot alone would compare, say,
    the broker in the middle of writing its log snapshot with the broker between two)."""
    first, last = rss_window(memory, warm_up_s)
    per_role = {}
    for role in sorted(set(start) | set(end), key=lambda r: (r not in ROLES, ROLES.index(r) if r in ROLES else 0)):
        a, b = start.get(role), end.get(role)
        before = [m[role] for m in first if m.get(role)]
        after = [m[role] for m in last if m.get(role)]
        growth = (
            round(100 * (statistics.median(after) / statistics.median(before) - 1), 1) if before and after else None
        )
        fd_delta = b["fds"] - a["fds"] if a and b else None
        per_role[role] = {"start": a, "end": b, "rss_growth_pct": growth, "fd_delta": fd_delta}
    return per_role


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run after start-up (default 30)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s the producer sends (default 1000)")
    parser.add_argument(
        "--load-rate", type=float, default=50.0, help="serving requests/s from the load process (default 50)"
    )
    parser.add_argument("--model", default="small", help="model to train and serve (default small)")
    args = parser.parse_args()
    duration = args.minutes * 60
    warm_up = min(300.0, duration / 6)
    with tempfile.TemporaryDirectory(prefix="streamfit-soak-") as tmp:
        home = Path(tmp) / "home"
        env = {"STREAMFIT_ADMIN_TOKEN": ADMIN_TOKEN, "STREAMFIT_PS_PUBLISH_EVERY_S": "10"}
        # up's own deadline is a backstop: the bench ends the run itself, after its last sample
        run = UpRun(home, duration + 600, rate=args.rate, model=args.model, env=env, topics=())
        try:
            result = soak(run, args, duration, warm_up)
        finally:
            run.kill()
    print(json.dumps(result))


def soak(run: UpRun, args, duration: float, warm_up: float) -> dict:
    if not run.ready.wait(600) or run.process.poll() is not None:
        run.kill()
        sys.exit("streamfit up did not start:\n" + "\n".join(run.output[-30:]))
    began = time.monotonic()
    n_features = Registry(run.home / "registry").spec(args.model).n_features
    load = Load(run.url, args.model, n_features, args.load_rate)
    promoter = Promoter(run, PROMOTE_EVERY_S)
    promoter.start()
    counter = EventCount(run.home)
    checkpoints = run.home / "checkpoints"
    lag: list[tuple] = []
    memory: list[dict] = []
    start = end = None
    failed = None
    swaps_at_start = None
    try:
        next_sample = began
        while True:
            now = time.monotonic() - began
            if run.process.poll() is not None:
                failed = f"streamfit up exited with status {run.process.returncode} after {now:.0f} s"
                break
            produced = counter()
            inference, training = (
                committed_events(checkpoints / "inference"),
                committed_events(checkpoints / "training"),
            )
            lag.append(
                (
                    round(now, 1),
                    produced,
                    produced - inference if produced is not None and inference is not None else None,
                    produced - training if produced is not None and training is not None else None,
                )
            )
            memory.append({"t": round(now), **{r: v["rss_mb"] for r, v in snapshot(run.home, run.process.pid).items()}})
            if start is None and now >= warm_up:
                start = {"t": round(now, 1), "roles": snapshot(run.home, run.process.pid)}
                swaps_at_start = served_swaps(run.url, args.model)
            if now >= duration:
                end = {"t": round(now, 1), "roles": snapshot(run.home, run.process.pid)}
                break
            next_sample += SAMPLE_EVERY_S
            time.sleep(max(0.0, min(next_sample, began + duration) - time.monotonic()))
    finally:
        promoter.stop()
        requests = load.finish()
        swaps = served_swaps(run.url, args.model)
        counter.close()
        status = run.stop(300)
    if start is None or end is None:
        sys.exit(f"{failed or 'the run ended early'}:\n" + "\n".join(run.output[-30:]))

    per_role = figures(start["roles"], end["roles"], memory, warm_up)
    floor = args.rate  # one second of events: a lag below it is noise, not a trend
    trends = {"predict": lag_trend(lag, 2, duration, floor), "train": lag_trend(lag, 3, duration, floor)}
    rss_met = {
        r: v["rss_growth_pct"] is not None and v["rss_growth_pct"] < RSS_GROWTH_TARGET_PCT for r, v in per_role.items()
    }
    fd_met = {r: v["fd_delta"] is not None and v["fd_delta"] <= FD_SLACK for r, v in per_role.items()}
    return {
        "benchmark": "soak",
        "minutes": args.minutes,
        "model": args.model,
        "events_per_s": args.rate,
        "warm_up_s": round(warm_up),
        "failed": failed,
        "up_exit_status": status,
        "up_output_tail": run.output[-8:] if status != 0 else None,
        "processes": per_role,
        "rss_mb_over_time": memory[:: round(60 / SAMPLE_EVERY_S)],  # one a minute: the shape of any growth
        "lag": {
            "definition": "events produced (end offsets of 'events') minus events the query processed (the "
            "'events' offsets of its last committed micro-batch); sampled every "
            f"{SAMPLE_EVERY_S:g} s; t in s since serving was ready",
            "predict": trends["predict"],
            "train": trends["train"],
            "series_t_produced_predict_train": lag,
        },
        "serving_load": requests,
        "probe_errors": len(run.request_errors),
        "promotions": {"every_s": PROMOTE_EVERY_S, "moves": dict(promoter.moves), "failures": dict(promoter.failures)},
        "swaps": {
            "seen_by_load": requests.get("version_changes_seen"),
            "serving_counter_total": swaps,
            "serving_counter_after_warm_up": swaps - swaps_at_start
            if swaps is not None and swaps_at_start is not None
            else None,
        },
        "targets": {
            "rss_growth_pct_after_warm_up": {
                "target": f"< {RSS_GROWTH_TARGET_PCT:g} per role",
                "per_role": rss_met,
                "met": all(rss_met.values()),
            },
            "open_fds": {
                "target": f"end - start <= {FD_SLACK} per role",
                "per_role": fd_met,
                "met": all(fd_met.values()),
            },
            "lag_bounded": {
                "target": f"last-quarter mean lag <= {LAG_TREND_FACTOR:g} x second-quarter mean lag (floored "
                f"at {floor:g} events), each query",
                "predict": trends["predict"]["met"],
                "train": trends["train"]["met"],
                "met": trends["predict"]["met"] and trends["train"]["met"],
            },
            "request_errors": {"target": 0, "value": requests.get("errors"), "met": requests.get("errors") == 0},
        },
    }


if __name__ == "__main__":
    main()
