"""Prometheus exposition shared by every part: a registry served on ``/metrics``, and the naming rules.

Each part (serving, the parameter server, the producer, both consumers) keeps its metrics in its
own ``CollectorRegistry``; the ones without a web app of their own serve it with :func:`serve`.
Names follow Prometheus's conventions, which :func:`naming_problems` checks: base units
(``_seconds``, ``_bytes``), ``_total`` on counters and only there, ``_ratio`` for a value between 0
and 1, and counters rather than last-micro-batch gauges wherever a scrape could miss a batch.

>>> naming_problems("counter", "streamfit_x_sent_total"), naming_problems("gauge", "streamfit_x_latency_ms")
([], ['streamfit_x_latency_ms: not in a base unit (_ms)'])
"""

from __future__ import annotations

import re

from prometheus_client import disable_created_metrics, start_http_server

disable_created_metrics()  # no ``*_created`` series: they double the output and no dashboard reads them

NOT_BASE_UNITS = ("_ms", "_millis", "_milliseconds", "_us", "_micros", "_minutes", "_hours", "_kb", "_mb", "_percent")
"""Name parts that say a value is not in a base unit (seconds, bytes, ratios of 0..1)."""


def serve(registry, port: int, host: str = "0.0.0.0"):
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread; returns the HTTP
    server (``shutdown()`` stops it, ``server_port`` is the port bound when ``port`` is 0)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def naming_problems(kind: str, name: str) -> list[str]:
    """What is wrong with metric family ``name`` of type ``kind`` (``counter``, ``gauge``, ...), as
    prometheus-client reports it (a counter's family name without ``_total``, its samples with it)."""
    problems = []
    if not re.fullmatch(r"streamfit_[a-z0-9_]+", name) and not name.startswith(("process_", "python_")):
        problems.append(f"{name}: not streamfit_<snake_case>")
    units = [unit for unit in NOT_BASE_UNITS if re.search(rf"{unit}(_|$)", name)]
    if units:
        problems.append(f"{name}: not in a base unit ({', '.join(units)})")
    if kind != "counter" and name.endswith("_total"):
        problems.append(f"{name}: a {kind} named like a counter (_total)")
    if re.search(r"_(accuracy|fraction|share)$", name):
        problems.append(f"{name}: a value between 0 and 1 ends in _ratio")
    return problems
