"""Shadow traffic: the candidate also scores what the champion answered, off the request path.

A request answered by the champion offers its rows and the champion's probabilities here and
returns at once; a background task has the candidate score them, in passes of up to ``max_rows``
coalesced on a thread of their own, and counts per candidate version how often it chose the
champion's class (the agreement) and how far its mean class probabilities are from the champion's
(total variation distance). The queue is bounded: when ``max_queued_rows`` rows already wait, an
offer is dropped and counted, never waited for, so shadowing adds no latency to an answer.

>>> distribution_difference(np.array([1.0, 0.0]), np.array([0.25, 0.75]))
0.75
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from serving.batching import Batcher, Overloaded
from serving.metrics import Metrics
from serving.swap import ModelHost, Served

log = logging.getLogger(__name__)


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
    """Scores the rows ``offer``-ed to it with ``host``'s candidate of their model; figures go to ``metrics``.

    Its own :class:`~serving.batching.Batcher` (own queue, own thread) coalesces the candidate's passes
    and bounds the rows waiting; the champion's batcher never sees shadow rows."""

    def __init__(self, host: ModelHost, metrics: Metrics, max_rows: int, max_queued_rows: int):
        self.host, self.metrics = host, metrics
        self.batcher = Batcher(max_rows, 0.0, max_queued_rows, on_batch=lambda rows, requests, seconds: None)
        self._figures: dict[tuple[str, int], _Figures] = {}
        self._scoring: set[asyncio.Task] = set()

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        for task in self._scoring:
            task.cancel()
        await asyncio.gather(*self._scoring, return_exceptions=True)
        await self.batcher.stop()

    def offer(self, answered: Served, x: np.ndarray, y: np.ndarray) -> None:
        """Have the candidate score rows ``x`` the version ``answered`` answered with ``y``, unless the
        candidate answered them itself; returns at once."""
        candidate = self.host.acquire_candidate(answered.model)
        if candidate is None or candidate is answered:
            if candidate is not None:
                candidate.release()
            return
        task = asyncio.get_running_loop().create_task(self._score(candidate, x, y))
        self._scoring.add(task)
        task.add_done_callback(self._scoring.discard)

    async def _score(self, candidate: Served, x: np.ndarray, champion: np.ndarray) -> None:
        try:
            y = await self.batcher.predict(candidate, x)  # releases the candidate's lease
        except Overloaded:
            self.metrics.shadow_dropped.labels(candidate.model).inc(len(x))
            return
        except Exception:  # a candidate that fails must not stop shadowing; serving is unaffected
            log.exception("%s: shadow scoring with v%d failed", candidate.model, candidate.version)
            return
        self._count(candidate, champion, y)

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
