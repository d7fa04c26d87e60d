"""Shadow traffic: the candidate also scores what the champion answered, off the request path.

A request answered by the champion offers its rows and the champion's probabilities here and
returns at once; ten times a second a background task has the candidate score the rows offered
meanwhile, in passes of up to ``max_rows`` on a thread of their own, and counts per candidate
version how often it chose the champion's class (the agreement) and how far its mean class
probabilities are from the champion's (total variation distance). What waits is bounded: when
``max_queued_rows`` rows already wait, an offer is dropped and counted, never waited for, so
shadowing adds no latency to an answer.

>>> distribution_difference(np.array([1.0, 0.0]), np.array([0.25, 0.75]))
0.75
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serving.metrics import Metrics
from serving.swap import ModelHost, Served

log = logging.getLogger(__name__)

EVERY_S = 0.1
"""How often the rows offered meanwhile are scored: the candidate's passes are few and full (a pass of one
row costs nearly what one of 64 does), and the event loop, which parses every request, is woken ten times
a second for shadowing instead of once per request; no one waits for these passes."""


def distribution_difference(champion: np.ndarray, candidate: np.ndarray) -> float:
    """Total variation distance between two class distributions (0: equal, 1: disjoint)."""
    return float(0.5 * np.abs(champion - candidate).sum())


class _Figures:
    """Running sums for one candidate version: rows, agreeing rows, summed probabilities of both models."""

    __slots__ = ("rows", "agreeing", "champion", "candidate")

    def __init__(self, classes: int):
        self.rows = self.agreeing = 0
        self.champion, self.candidate = np.zeros(classes), np.zeros(classes)


class Shadow:
    """Scores the rows ``offer``-ed to it with ``host``'s candidate of their model, every :data:`EVERY_S`
    in passes of up to ``max_rows`` on a thread of its own; figures go to ``metrics``."""

    def __init__(self, host: ModelHost, metrics: Metrics, max_rows: int, max_queued_rows: int):
        self.host, self.metrics = host, metrics
        self.max_rows, self.max_queued_rows = max_rows, max_queued_rows
        self._waiting: list[tuple[Served, np.ndarray, np.ndarray]] = []
        self._rows = 0
        self._figures: dict[tuple[str, int], _Figures] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="streamfit-shadow")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="streamfit-shadow")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)
        for candidate, _, _ in self._waiting:
            candidate.release()
        self._waiting.clear()

    def offer(self, answered: Served, x: np.ndarray, y: np.ndarray) -> None:
        """Keep rows ``x``, which the version ``answered`` answered with ``y``, for the candidate, unless the
        candidate answered them itself or ``max_queued_rows`` rows already wait (dropped, counted); never waits."""
        candidate = self.host.acquire_candidate(answered.model)
        if candidate is None or candidate is answered or self._rows + len(x) > self.max_queued_rows:
            if candidate is not None:
                candidate.release()
                if candidate is not answered:
                    self.metrics.shadow_dropped.labels(answered.model).inc(len(x))
            return
        self._waiting.append((candidate, x, y))
        self._rows += len(x)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(EVERY_S)
            if self._waiting:
                waiting, self._waiting, self._rows = self._waiting, [], 0
                await loop.run_in_executor(self._executor, self._score, waiting)

    def _score(self, waiting: list[tuple[Served, np.ndarray, np.ndarray]]) -> None:
        """On the shadow thread: each candidate's rows in passes of up to ``max_rows``; every lease released."""
        by_candidate: dict[int, list[tuple[Served, np.ndarray, np.ndarray]]] = {}
        for offered in waiting:
            by_candidate.setdefault(id(offered[0]), []).append(offered)
        for offers in by_candidate.values():
            candidate = offers[0][0]
            x, champion = np.concatenate([o[1] for o in offers]), np.concatenate([o[2] for o in offers])
            try:
                y = np.concatenate(
                    [candidate.predict(x[i : i + self.max_rows]) for i in range(0, len(x), self.max_rows)]
                )
                self._count(candidate, champion, y)
            except Exception:  # a candidate that fails must not stop shadowing; serving is unaffected
                log.exception("%s: shadow scoring with v%d failed", candidate.model, candidate.version)
            finally:
                for offered in offers:
                    offered[0].release()

    def _count(self, candidate: Served, champion: np.ndarray, y: np.ndarray) -> None:
        key = (candidate.model, candidate.version)
        figures = self._figures.get(key)
        if figures is None:  # a new candidate: the previous ones' sums are no longer needed
            self._figures = {k: f for k, f in self._figures.items() if k[0] != candidate.model}
            figures = self._figures[key] = _Figures(y.shape[1])
        agreeing = int((champion.argmax(axis=1) == y.argmax(axis=1)).sum())
        figures.rows += len(y)
        figures.agreeing += agreeing
        figures.champion += champion.sum(axis=0)
        figures.candidate += y.sum(axis=0)
        labels = (candidate.model, str(candidate.version))
        self.metrics.shadow_rows.labels(*labels).inc(len(y))
        self.metrics.shadow_agreeing_rows.labels(*labels).inc(agreeing)
        self.metrics.shadow_agreement.labels(*labels).set(figures.agreeing / figures.rows)
        self.metrics.shadow_difference.labels(*labels).set(
            distribution_difference(figures.champion / figures.rows, figures.candidate / figures.rows)
        )
