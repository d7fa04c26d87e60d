"""Shadow traffic: the candidate also scores what the champion answered, off the request path.

A request answered by the champion offers its rows and the champion's probabilities here and
returns at once; one background task takes the waiting rows, scores them with the candidate in
passes of up to ``max_rows`` on its own thread, and counts per candidate version how often it
chose the champion's class (the agreement) and how far its mean class probabilities are from the
champion's (total variation distance). The queue is bounded: when ``max_queued_rows`` rows already
wait, an offer is dropped and counted, never waited for, so shadowing adds no latency to an answer.

>>> distribution_difference(np.array([1.0, 0.0]), np.array([0.25, 0.75]))
0.75
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

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
    """Scores the rows ``offer``-ed to it with ``host``'s candidate of their model; figures go to ``metrics``."""

    def __init__(self, host: ModelHost, metrics: Metrics, max_rows: int, max_queued_rows: int):
        self.host, self.metrics = host, metrics
        self.max_rows, self.max_queued_rows = max_rows, max_queued_rows
        self._queue: deque[tuple[Served, np.ndarray, np.ndarray]] = deque()
        self._rows = 0
        self._arrived = asyncio.Event()
        self._figures: dict[tuple[str, int], _Figures] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="streamfit-shadow")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="streamfit-shadow")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for candidate, _, _ in self._queue:
            candidate.release()
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def offer(self, answered: Served, x: np.ndarray, y: np.ndarray) -> None:
        """Queue rows ``x`` the version ``answered`` answered with ``y`` for the candidate, unless the
        candidate answered them itself; never waits."""
        candidate = self.host.acquire_candidate(answered.model)
        if candidate is None or candidate is answered:
            if candidate is not None:
                candidate.release()
            return
        if self._rows + len(x) > self.max_queued_rows:
            candidate.release()
            self.metrics.shadow_dropped.labels(answered.model).inc(len(x))
            return
        self._queue.append((candidate, x, y))
        self._rows += len(x)
        self._arrived.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            candidate, xs, champions = self._take()
            try:
                y = await loop.run_in_executor(self._executor, candidate.predict, np.concatenate(xs))
            except Exception:
                log.exception("%s: shadow scoring with v%d failed", candidate.model, candidate.version)
                continue
            finally:
                candidate.release()
            self._count(candidate, np.concatenate(champions), y)

    def _take(self) -> tuple[Served, list[np.ndarray], list[np.ndarray]]:
        """The oldest waiting rows and those after them for the same candidate, up to ``max_rows``; one lease kept."""
        candidate, x, champion = self._queue.popleft()
        xs, champions, rows = [x], [champion], len(x)
        while self._queue and self._queue[0][0] is candidate and rows + len(self._queue[0][1]) <= self.max_rows:
            _, x, champion = self._queue.popleft()
            candidate.release()  # the pass holds the first lease
            xs.append(x)
            champions.append(champion)
            rows += len(x)
        self._rows -= rows
        return candidate, xs, champions

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
