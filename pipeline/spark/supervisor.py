"""Keeps a streaming query running through outages of what it depends on.

A micro-batch that cannot reach the broker or the parameter server fails its query. Spark's answer
is a restart from the query's checkpoint: the offsets of the failed micro-batch are in the offset
log without a commit, so the restarted query runs the same micro-batch again (its commits carry the
same tags, and the parameter server skips what it already applied). The supervisor does that
restart, after a back-off that doubles up to ``max_delay_s`` while the failures go on, and resets
once the query has run ``max_delay_s`` without failing. Content failures (a poison event) are not
its business: the consumers handle them inside the micro-batch, so they never reach here.

>>> class Flaky:  # a stand-in with a query's surface: fails once, then runs
...     def __init__(self, active): self.isActive, self.name = active, "q"
...     def exception(self): return None if self.isActive else "broker down"
>>> supervisor = QuerySupervisor(Flaky(False), lambda: Flaky(True), first_delay_s=0.0)
>>> supervisor.poll(), supervisor.poll(), supervisor.restarts, supervisor.query.isActive
(True, True, 1, True)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class QuerySupervisor:
    """Watches a started ``query`` and starts it again with ``restart()`` whenever it fails;
    ``on_restart()`` is called after each restart (a metric). ``poll()`` does the work and is called
    every second or so."""

    def __init__(
        self,
        query: Any,
        restart: Callable[[], Any],
        *,
        first_delay_s: float = 1.0,
        max_delay_s: float = 15.0,
        on_restart: Callable[[], None] | None = None,
    ):
        self.query, self.name = query, query.name
        self._start = restart
        self._first_delay, self._max_delay = first_delay_s, max_delay_s
        self._delay = first_delay_s
        self._on_restart = on_restart
        self.restarts = 0
        self.last_error: str | None = None
        self._retry_at: float | None = None
        self._started = time.monotonic()

    def poll(self) -> bool:
        """Restart a failed query once its back-off has passed; True while the query is supervised
        (a query stopped on purpose, without an exception, ends the supervision)."""
        now = time.monotonic()
        if self._retry_at is None:
            if self.query.isActive:
                if now - self._started >= self._max_delay:
                    self._delay = self._first_delay  # it ran long enough: the outage is over
                return True
            error = self.query.exception()
            if error is None:
                return False
            self.last_error = _first_line(error)
            self._retry_at = now + self._delay
            log.warning(
                "query %s failed (%s); restarting it from its checkpoint in %.0f s",
                self.name,
                self.last_error,
                self._delay,
            )
            self._delay = min(2 * self._delay, self._max_delay)
        if now < self._retry_at:
            return True
        try:
            self.query = self._start()
        except Exception as exc:  # noqa: BLE001 - the broker may still be down: try again after the back-off
            self.last_error = _first_line(exc)
            self._retry_at = now + self._delay
            log.warning("query %s did not restart (%s); next try in %.0f s", self.name, self.last_error, self._delay)
            self._delay = min(2 * self._delay, self._max_delay)
            return True
        self._retry_at, self._started = None, now
        self.restarts += 1
        log.info("query %s restarted from its checkpoint (restart %d)", self.name, self.restarts)
        if self._on_restart is not None:
            self._on_restart()
        return True


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
