"""The live figures of a running pipeline, read from where they really are, and their terminal view.

Throughput and the dead-letter count come from the topics' end offsets (what the broker holds,
not what a component claims), prequential accuracy and drift from the training consumer's
records, champion and candidate from the registry, the served version and request rate from
the serving app's ``/metrics``, each query's lag in events and seconds from Kafka
(:mod:`pipeline.spark.lag`). Every source may be briefly unavailable (a component starting or
stopping): its figures then show as ``-`` instead of stopping the display.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx
from kafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from pipeline.registry import Registry, RegistryError
from pipeline.settings import Settings
from pipeline.spark.lag import QueryLag
from pipeline.spark.offsets import KafkaOffsetReader, OffsetError

PREDICT_ROUTE = "/v1/models/{model}:predict"


@dataclass
class Figures:
    """One sample of the pipeline's state; rates are over the time since the previous sample."""

    at: float
    events: int | None = None
    predictions: int | None = None
    dead_letters: int | None = None
    events_per_s: float | None = None
    predictions_per_s: float | None = None
    trained_events: int = 0
    training_batches: int = 0
    window_accuracy: float | None = None
    drifts: int = 0
    champion: int | None = None
    candidate: int | None = None
    served: int | None = None
    serve_requests: float | None = None
    serve_requests_per_s: float | None = None
    lag: dict[str, tuple[int, float] | None] = field(default_factory=dict)  # query: (records, seconds) behind
    notes: list[str] = field(default_factory=list)


class StatusBoard:
    """Samples :class:`Figures`; ``training_history`` returns the training consumer's recent records."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        serve_url: str,
        training_history: Callable[[], Sequence[dict]] = tuple,
        lags: Mapping[str, QueryLag] | None = None,
    ):
        self.settings, self.serve_url, self.training_history = settings, serve_url, training_history
        self.lags = lags or {}
        self.topics = [settings.topic_events, settings.topic_predictions, settings.topic_dlq]
        self.offsets = KafkaOffsetReader(bootstrap, self.topics, settings.kafka_timeout_s, settings.kafka)
        self.registry = Registry(settings.registry_url)
        self.http = httpx.Client(timeout=2.0)
        self.previous: Figures | None = None
        self.drifts = self.trained = 0
        self._seen_batches: set[int] = set()

    def sample(self) -> Figures:
        figures = Figures(at=time.monotonic())
        self._topics(figures)
        self._training(figures)
        self._registry(figures)
        self._serving(figures)
        figures.lag = {query: lag.measure() for query, lag in self.lags.items()}
        if self.previous is not None:
            elapsed = figures.at - self.previous.at
            for total, rate in (
                ("events", "events_per_s"),
                ("predictions", "predictions_per_s"),
                ("serve_requests", "serve_requests_per_s"),
            ):
                now, before = getattr(figures, total), getattr(self.previous, total)
                if now is not None and before is not None and elapsed > 0:
                    setattr(figures, rate, max(0.0, (now - before) / elapsed))
        self.previous = figures
        return figures

    def close(self) -> None:
        self.offsets.close()
        self.http.close()

    def _topics(self, figures: Figures) -> None:
        try:
            ends = self.offsets.latest()
        except (KafkaError, OffsetError, OSError) as exc:
            figures.notes.append(f"Kafka: {exc}")
            return
        events, predictions, dlq = (sum(ends.get(topic, {}).values()) for topic in self.topics)
        figures.events, figures.predictions, figures.dead_letters = events, predictions, dlq

    def _training(self, figures: Figures) -> None:
        records = list(self.training_history())
        for record in records:
            if record["batch_id"] not in self._seen_batches:
                self._seen_batches.add(record["batch_id"])
                self.drifts += bool(record.get("drift"))
                self.trained += record.get("trained_rows", 0)
        labelled = [r for r in records if "window_accuracy" in r]
        figures.training_batches = len(self._seen_batches)
        figures.trained_events, figures.drifts = self.trained, self.drifts
        figures.window_accuracy = labelled[-1]["window_accuracy"] if labelled else None

    def _registry(self, figures: Figures) -> None:
        try:
            aliases = self.registry.aliases(self.settings.model)
        except RegistryError as exc:
            figures.notes.append(f"registry: {exc}")
            return
        figures.champion, figures.candidate = aliases.get("champion"), aliases.get("candidate")

    def _serving(self, figures: Figures) -> None:
        try:
            text = self.http.get(self.serve_url + "/metrics").text
        except httpx.HTTPError:
            figures.notes.append("serving: not answering yet")
            return
        requests = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "streamfit_model_version" and sample.labels.get("model") == self.settings.model:
                    figures.served = int(sample.value)
                elif sample.name == "streamfit_http_requests_total" and sample.labels.get("route") == PREDICT_ROUTE:
                    requests += sample.value
        figures.serve_requests = requests


def _show(value, fmt: str = "{:,}") -> str:
    """``value`` formatted, or ``-`` when its source had nothing to say."""
    return "-" if value is None else fmt.format(value)


def render(figures: Figures, title: str):
    """A rich table of ``figures``."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", min_width=60)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("events in", f"{_show(figures.events)} ({_show(figures.events_per_s, '{:,.0f}')}/s)")
    table.add_row("predictions out", f"{_show(figures.predictions)} ({_show(figures.predictions_per_s, '{:,.0f}')}/s)")
    table.add_row("dead letters", _show(figures.dead_letters))
    table.add_row("trained events", f"{figures.trained_events:,} in {figures.training_batches} micro-batches")
    table.add_row("prequential accuracy", _show(figures.window_accuracy, "{:.3f}") + " (recent window)")
    table.add_row("drift flags", str(figures.drifts))
    table.add_row("champion / candidate", f"v{_show(figures.champion)} / v{_show(figures.candidate)}")
    table.add_row("served version", "v" + _show(figures.served))
    table.add_row(
        "serving requests",
        f"{_show(figures.serve_requests, '{:,.0f}')} ({_show(figures.serve_requests_per_s, '{:,.1f}')}/s)",
    )
    if figures.lag:
        table.add_row("lag", ", ".join(f"{query} {_lag(behind)}" for query, behind in figures.lag.items()))
    for note in figures.notes:
        table.add_row("[yellow]note", f"[yellow]{note}")
    return table


def _lag(behind: tuple[int, float] | None) -> str:
    """``12 events (0.3 s)``, or ``-`` before the query's first micro-batch."""
    return "-" if behind is None else f"{behind[0]:,} events ({behind[1]:.1f} s)"


def one_line(figures: Figures) -> str:
    """The same figures as one log line (when stdout is not a terminal)."""
    return (
        f"events={_show(figures.events, '{}')} events/s={_show(figures.events_per_s, '{:.0f}')} "
        f"predictions={_show(figures.predictions, '{}')} "
        f"predictions/s={_show(figures.predictions_per_s, '{:.0f}')} "
        f"dlq={_show(figures.dead_letters, '{}')} trained={figures.trained_events} "
        f"accuracy={_show(figures.window_accuracy, '{:.3f}')} drifts={figures.drifts} "
        f"champion={_show(figures.champion, '{}')} candidate={_show(figures.candidate, '{}')} "
        f"served={_show(figures.served, '{}')} "
        f"serve_requests/s={_show(figures.serve_requests_per_s, '{:.1f}')}"
        + "".join(f" lag_{query}_s={_show(b and b[1], '{:.1f}')}" for query, b in figures.lag.items())
    )
