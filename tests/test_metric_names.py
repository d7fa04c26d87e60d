"""Every metric streamfit exports follows Prometheus's naming conventions, and README lists each one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from consumers.training import TrainingGauges
from deploy.check import PS_STATS
from pipeline.metrics import naming_problems
from pipeline.ps.metrics import ServerMetrics
from pipeline.spark.progress import ProgressMetrics
from producers.metrics import producer_registry
from producers.sender import Summary
from serving.metrics import Metrics

README = Path(__file__).resolve().parents[1] / "README.md"


def registries() -> dict[str, CollectorRegistry]:
    """The registry of every part, as each builds it."""
    return {
        "serve": Metrics().registry,
        "ps": ServerMetrics(lambda: PS_STATS).registry,
        "produce": producer_registry(Summary()),
        "predict": ProgressMetrics("streamfit_predict").registry,
        "train": TrainingGauges().registry,
    }


def exported() -> list[tuple[str, str, str, list[str]]]:
    """(part, type, family name, sample names) of every streamfit metric."""
    return [
        (part, metric.type, metric.name, [s.name for s in metric.samples])
        for part, registry in registries().items()
        for metric in registry.collect()
        if metric.name.startswith("streamfit_")
    ]


@pytest.mark.parametrize("part", ["serve", "ps", "produce", "predict", "train"])
def test_every_metric_follows_the_conventions(part):
    metrics = [m for m in exported() if m[0] == part]
    assert metrics
    problems = [problem for _, kind, name, _ in metrics for problem in naming_problems(kind, name)]
    assert problems == []
    for _, kind, name, samples in metrics:
        if kind == "counter":
            assert all(sample == name + "_total" for sample in samples), (name, samples)


def test_the_rules_catch_what_they_are_for():
    registry = CollectorRegistry()
    Gauge("streamfit_batch_latency_ms", "a latency in milliseconds", registry=registry)
    Gauge("streamfit_rows_total", "a gauge posing as a counter", registry=registry)
    Gauge("streamfit_accuracy", "a value between 0 and 1", registry=registry)
    Counter("streamfit_sent", "a counter", registry=registry)
    problems = [p for metric in registry.collect() for p in naming_problems(metric.type, metric.name)]
    assert problems == [
        "streamfit_batch_latency_ms: not in a base unit (_ms)",
        "streamfit_rows_total: a gauge named like a counter (_total)",
        "streamfit_accuracy: a value between 0 and 1 ends in _ratio",
    ]


def test_readme_lists_every_exported_metric():
    text = README.read_text()
    listed = set(re.findall(r"`(streamfit_[a-z0-9_]+)`", text))
    missing = sorted(
        name + ("_total" if kind == "counter" else "")
        for _, kind, name, _ in exported()
        if name + ("_total" if kind == "counter" else "") not in listed
    )
    assert missing == []
