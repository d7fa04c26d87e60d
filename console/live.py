"""The pipeline's live figures for the console: :class:`~pipeline.status.StatusBoard`'s, sampled each second.

The board is the one ``streamfit up`` draws in the terminal (throughput from the topics' end offsets,
the registry's aliases, serving's ``/metrics``); its training history comes from the ``training-metrics``
topic here. The queries' lag (:class:`~pipeline.spark.lag.QueryLag`, known to the process that runs them)
is measured in a thread of its own: it reads a record per partition, which takes longer than a second on
a busy machine, and the rates should not wait for it. Each sample says which source could not be reached.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from kafka.errors import KafkaError

from pipeline.errors import StreamfitError
from pipeline.settings import Settings
from pipeline.spark.lag import QueryLag
from pipeline.status import Figures, StatusBoard

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 1.0
RATE_OVER_S = 5.0
"""Rates are over the last few seconds: micro-batches move the totals in steps, a one-second rate flickers to 0."""
LAG_EVERY_S = 3.0
RATES = {
    "events": "events_per_s",
    "predictions": "predictions_per_s",
    "dead_letters": "dead_letters_per_s",
    "trained_events": "trained_per_s",
    "serve_requests": "serve_requests_per_s",
}


class LiveView:
    """Samples the pipeline every :data:`SAMPLE_EVERY_S` in a thread; :attr:`latest` is the newest sample
    as JSON-ready figures, with ``sources`` naming what could not be reached (None: reached)."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: Callable[[], str],
        serve_url: str,
        training_history: Callable[[], list[dict]],
        feed_problem: Callable[[], str | None],
        lags: Mapping[str, QueryLag] | None = None,
    ):
        self.settings, self.bootstrap, self.serve_url = settings, bootstrap, serve_url
        self.training_history, self.feed_problem, self.lags = training_history, feed_problem, lags or {}
        self.latest: dict = {"at": None, "sources": {}}
        self._lag: dict[str, dict | None] = {}
        self._board: StatusBoard | None = None
        self._recent: deque[Figures] = deque()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._every, args=(SAMPLE_EVERY_S, self._sample), name="console-live", daemon=True),
            threading.Thread(
                target=self._every, args=(LAG_EVERY_S, self._measure_lag), name="console-lag", daemon=True
            ),
        ]

    def start(self) -> LiveView:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._board is not None:
            self._board.close()

    def _every(self, interval_s: float, step: Callable[[], None]) -> None:
        while not self._stop.wait(interval_s):
            try:
                step()
            except Exception:  # a bug in one sample must not end the live view: logged with its traceback
                log.exception("console: sampling the pipeline failed")

    def _sample(self) -> None:
        self.latest = self.sample()

    def _measure_lag(self) -> None:
        for query, lag in self.lags.items():
            behind = lag.measure()
            self._lag[query] = behind and {"records": behind[0], "seconds": behind[1]}

    def sample(self) -> dict:
        if self._board is None:
            try:
                self._board = StatusBoard(self.settings, self.bootstrap(), self.serve_url, self.training_history)
            except (KafkaError, StreamfitError, OSError) as exc:
                return {"at": time.time(), "sources": {"kafka": f"Kafka: {exc}"}}
        figures = self._board.sample()
        view = dataclasses.asdict(figures) | {"at": time.time(), "lag": dict(self._lag)}
        while self._recent and figures.at - self._recent[0].at > RATE_OVER_S:
            self._recent.popleft()
        for total, rate in RATES.items():
            view[rate] = _rate(figures, self._recent[0] if self._recent else None, total)
        self._recent.append(figures)
        view["sources"] = {
            source: next((note for note in figures.notes if note.lower().startswith(source)), None)
            for source in ("kafka", "serving", "registry")
        }
        view["sources"]["kafka"] = view["sources"]["kafka"] or self.feed_problem()
        return view


def _rate(now: Figures, before: Figures | None, total: str) -> float | None:
    if before is None or getattr(now, total) is None or getattr(before, total) is None or now.at <= before.at:
        return None
    return max(0.0, (getattr(now, total) - getattr(before, total)) / (now.at - before.at))
