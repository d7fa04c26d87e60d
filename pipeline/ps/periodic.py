"""An action run in its own thread every N updates or S seconds with changes, retried with back-off.

The parameter server checkpoints and publishes with it (watching its
:class:`~pipeline.ps.server.CenterState`), and a sharded server publishes with it from next to the
shards (watching their counters over the network, :class:`PolledProgress`).

>>> progress = PolledProgress(lambda: 3, counter=0, poll_s=0.01)
>>> runs = []
>>> periodic = Periodic("demo", progress, lambda: runs.append(progress.counter), every_updates=2, every_s=60)
>>> periodic.start(); progress.wait(lambda _: bool(runs), 5); periodic.stop(final=True)
True
>>> runs, periodic.info["counter"]
([3], 3)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What :class:`Periodic` watches: an update counter, a count of changes (a change need not move
    the counter: a pending commit), and a way to wait for a condition on them."""

    @property
    def counter(self) -> int: ...

    @property
    def changes(self) -> int: ...

    def wait(self, predicate: Callable[[Any], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds, at most ``timeout`` seconds (0: check once)."""
        ...

    def wake(self) -> None:
        """Make waiters re-check their predicate now."""
        ...


class PolledProgress:
    """A counter read with ``read()`` every ``poll_s`` seconds while someone waits (a sharded
    server's ``stats``); every update is a change. A failed read is logged and the last value kept.
    ``counter`` is where the count starts."""

    def __init__(self, read: Callable[[], int], *, counter: int, poll_s: float = 0.5):
        self._read, self._counter, self._poll_s = read, counter, poll_s
        self._woken = threading.Event()

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def changes(self) -> int:
        return self._counter

    def refresh(self) -> None:
        try:
            self._counter = self._read()
        except Exception:  # an unreachable source is logged; the last value stands until it answers
            log.exception("reading the update counter failed")

    def wait(self, predicate: Callable[[Any], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):  # e.g. stopping: no read needed
                return True
            self.refresh()
            if predicate(self):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._woken.wait(min(self._poll_s, remaining)):
                self._woken.clear()

    def wake(self) -> None:
        self._woken.set()


class Periodic:
    """Runs ``action`` in its own thread after ``every_updates`` updates, or once ``every_s`` seconds
    passed since the last run with any change in between; a slow or failing action (registry down,
    disk full) is logged and retried, it never blocks or breaks a request.

    Only a successful run counts as done: a failed one is retried after a back-off (doubling from
    ``RETRY_FIRST_S`` up to ``RETRY_MAX_S``) even while no new update arrives, and ``stop(final=True)``
    runs again unless the last success covers every change. Runs never overlap (:meth:`run_now` may
    be called from a request thread).

    A run covers the counter and changes read just before ``action``; an action that learns a later
    counter (a pull) returns it, and it then counts as covering that many updates and changes (for
    sources whose every change is an update, :class:`PolledProgress`)."""

    RETRY_FIRST_S = 0.5
    RETRY_MAX_S = 30.0

    def __init__(
        self, name: str, progress: Progress, action: Callable[[], int | None], every_updates: int, every_s: float
    ):
        self.name = name
        self._state = progress
        self._action = action
        self._every_updates = every_updates
        self._every_s = every_s
        self._done_counter = progress.counter
        self._done_changes = progress.changes
        self._last = time.monotonic()
        self._failures = 0
        self._retry_at = 0.0
        self._run_lock = threading.RLock()
        self._stopping = False
        self.info: dict[str, Any] = {"runs": 0, "counter": None, "at": None, "error": None}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, final: bool) -> None:
        """Stop the thread; with ``final``, run once more unless the last success covers every change."""
        self._stopping = True
        self._state.wake()
        self._thread.join()
        if final and self._state.wait(self._pending, 0):
            self.run_once()

    def run_once(self) -> None:
        """Run now; a failure is logged and scheduled for a retry."""
        try:
            self._run()
        except Exception:  # any failure of a plug-in action is logged, then retried
            log.exception(
                "%s failed at update %d (attempt %d); retrying in %gs",
                self.name,
                self._state.counter,
                self._failures,
                self._retry_at - time.monotonic(),
            )

    def run_now(self) -> bool:
        """Run synchronously unless the last success covers every change; True if it ran. Raises what
        the action raised (the failure is also scheduled for a retry)."""
        with self._run_lock:
            if self._state.changes == self._done_changes:
                return False
            self._run()
            return True

    def _run(self) -> None:
        with self._run_lock:
            counter, changes = self._state.counter, self._state.changes  # read before the action's snapshot
            self._last = time.monotonic()
            try:
                covered = self._action()
            except Exception as exc:
                self._failures += 1
                self._retry_at = self._last + min(self.RETRY_FIRST_S * 2 ** (self._failures - 1), self.RETRY_MAX_S)
                self.info["error"] = f"{type(exc).__name__}: {exc}"
                raise
            if covered is not None:
                counter = changes = covered
            self._failures = 0
            self._done_counter, self._done_changes = counter, changes
            self.info.update(runs=self.info["runs"] + 1, counter=counter, at=time.time(), error=None)

    def _pending(self, progress: Progress) -> bool:
        return progress.changes != self._done_changes

    def _next_at(self) -> float:
        """When pending changes become due by time alone."""
        return self._retry_at if self._failures else self._last + self._every_s

    def _due(self, progress: Progress) -> bool:
        if self._stopping:
            return True
        if progress.changes == self._done_changes:
            return False
        return time.monotonic() >= self._next_at() or (
            not self._failures and progress.counter - self._done_counter >= self._every_updates
        )

    def _loop(self) -> None:
        while True:
            pending = self._state.changes != self._done_changes
            timeout = max(self._next_at() - time.monotonic(), 0.01) if pending else self._every_s
            if not self._state.wait(self._due, timeout):
                continue
            if self._stopping:
                return
            self.run_once()
