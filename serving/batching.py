"""Dynamic batching: concurrent requests coalesced into one forward pass, off the event loop.

A forward pass of one row costs nearly as much as one of 64, so under load the server
answers many requests per pass. Requests queue with the model version they leased; one
task takes the oldest, lets it wait at most ``max_wait_s`` (counted from its arrival) for
companions on the same version, up to ``max_rows`` rows, and runs the pass on a dedicated
inference thread. While a pass runs the event loop keeps parsing requests, so the next
batch gathers meanwhile: a request queued behind a busy model has already waited and goes
in the next pass at once. Each request's lease is returned once its pass is done.

The queue is bounded (``max_queued_rows``): past it a request is refused at once with
:class:`Overloaded` (the app answers 503 with ``Retry-After``), so overload costs clients a
retry rather than costing the server memory and every queued request its latency. A request
larger than the bound is still taken when the queue is empty, so no request is refused forever.

>>> import asyncio, numpy as np
>>> class Doubler:  # anything with predict(x) and release()
...     def predict(self, x): return x * 2
...     def release(self): pass
>>> async def demo():
...     batcher = Batcher(max_rows=64, max_wait_s=0.01, max_queued_rows=1024,
...                       on_batch=lambda rows, n, s: print(rows, "rows in", n, "requests"))
...     batcher.start()
...     model = Doubler()
...     out = await asyncio.gather(*(batcher.predict(model, np.full((1, 1), i)) for i in range(3)))
...     await batcher.stop()
...     return [float(o[0, 0]) for o in out]
>>> asyncio.run(demo())
3 rows in 3 requests
[0.0, 2.0, 4.0]
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np


class Leased(Protocol):
    """A model version leased by a request: ``predict`` rows, ``release`` the lease when done."""

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def release(self) -> None: ...


class Overloaded(Exception):
    """The queue holds ``max_queued_rows`` already; the request was not queued (its lease is released)."""


class _Request:
    __slots__ = ("model", "x", "future", "arrived")

    def __init__(self, model: Leased, x: np.ndarray, future: asyncio.Future, arrived: float):
        self.model, self.x, self.future, self.arrived = model, x, future, arrived


class Batcher:
    """Coalesces ``predict`` calls of the same leased version into passes of at most ``max_rows`` rows.

    ``on_batch(rows, requests, seconds)`` is told about every pass (for metrics). A request
    with more rows than ``max_rows`` runs alone. At most ``max_queued_rows`` rows wait.
    """

    def __init__(
        self, max_rows: int, max_wait_s: float, max_queued_rows: int, on_batch: Callable[[int, int, float], None]
    ):
        self.max_rows, self.max_wait_s, self.on_batch = max_rows, max_wait_s, on_batch
        self.max_queued_rows = max_queued_rows
        self._queue: deque[_Request] = deque()
        self._rows = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="streamfit-inference")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="streamfit-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for request in self._queue:
            request.model.release()
            request.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True)

    @property
    def queued_rows(self) -> int:
        return self._rows

    async def predict(self, model: Leased, x: np.ndarray) -> np.ndarray:
        """``model.predict(x)``, computed in a pass shared with concurrent requests; releases ``model`` after.

        Raises :class:`Overloaded` when ``x`` does not fit in the queue."""
        if self._queue and self._rows + len(x) > self.max_queued_rows:
            model.release()
            raise Overloaded(
                f"{self._rows} rows are already waiting for the model and this request's {len(x)} "
                f"would pass the {self.max_queued_rows}-row bound (setting max_queued_rows)"
            )
        loop = asyncio.get_running_loop()
        request = _Request(model, x, loop.create_future(), loop.time())
        self._queue.append(request)
        self._rows += len(x)
        self._arrived.set()
        return await request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].arrived + self.max_wait_s
            while self._rows < self.max_rows and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            await self._forward(self._take())

    def _take(self) -> list[_Request]:
        """The oldest request and the waiting ones on the same version, up to ``max_rows`` rows; requests
        for other versions (canary, pinned) keep their places, so they do not split the champion's passes."""
        first = self._queue.popleft()
        batch, rows, passed = [first], len(first.x), list[_Request]()
        while self._queue and rows < self.max_rows and len(passed) < self.max_rows:
            request = self._queue.popleft()
            if request.model is first.model and rows + len(request.x) <= self.max_rows:
                batch.append(request)
                rows += len(request.x)
            else:
                passed.append(request)
        self._queue.extendleft(reversed(passed))
        self._rows -= rows
        return batch

    async def _forward(self, batch: list[_Request]) -> None:
        model = batch[0].model
        x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
        started = time.perf_counter()
        try:
            y = await asyncio.get_running_loop().run_in_executor(self._executor, model.predict, x)
        except asyncio.CancelledError:  # shutting down
            for request in batch:
                request.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request: its handler decides the answer
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        finally:
            for request in batch:
                request.model.release()
        self.on_batch(len(x), len(batch), time.perf_counter() - started)
        start = 0
        for request in batch:
            end = start + len(request.x)
            if not request.future.done():  # a cancelled request has no one waiting
                request.future.set_result(y[start:end])
            start = end
