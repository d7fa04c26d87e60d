"""The pipeline's live figures for the console: :class:`~pipeline.status.StatusBoard`'s, sampled each second.

The board is the one ``streamfit up`` draws in the terminal (throughput from the topics' end offsets,
the registry's aliases, serving's ``/metrics``, each query's lag); its training history comes from the
``training-metrics`` topic here. Each sample says which source could not be reached.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping

from kafka.errors import KafkaError

from pipeline.errors import StreamfitError
from pipeline.settings import Settings
from pipeline.spark.lag import QueryLag
from pipeline.status import Figures, StatusBoard

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 1.0


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
        self.training_history, self.feed_problem, self.lags = training_history, feed_problem, lags
        self.latest: dict = {"sources": {"kafka": "not sampled yet", "serving": None, "registry": None}}
        self._board: StatusBoard | None = None
        self._previous: Figures | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-live", daemon=True)

    def start(self) -> LiveView:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._board is not None:
            self._board.close()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                self.latest = self.sample()
            except Exception:
                log.exception("console: sampling the pipeline failed")

    def sample(self) -> dict:
        if self._board is None:
            try:
                self._board = StatusBoard(
                    self.settings, self.bootstrap(), self.serve_url, self.training_history, self.lags
                )
            except (KafkaError, StreamfitError, OSError) as exc:
                return {"at": time.time(), "sources": {"kafka": f"Kafka: {exc}"}}
        figures = self._board.sample()
        view = dataclasses.asdict(figures) | {"at": time.time()}
        view["lag"] = {
            query: behind and {"records": behind[0], "seconds": behind[1]} for query, behind in figures.lag.items()
        }
        for total, rate in (("dead_letters", "dead_letters_per_s"), ("trained_events", "trained_per_s")):
            view[rate] = _rate(figures, self._previous, total)
        self._previous = figures
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
