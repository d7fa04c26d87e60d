"""Polling with a deadline, for tests that wait on another thread or process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.1,
    message: str | Callable[[], str] = "condition not reached in time",
) -> T:
    """Call ``predicate`` every ``interval_s`` until it returns something true, and return that.

    Fails the test (``AssertionError``) with ``message`` when ``timeout_s`` passed first; ``message``
    may be a callable, called then, to describe the state at the timeout. ``predicate`` runs at least
    once, and once more at the deadline; an assertion inside it fails the test at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        expired = time.monotonic() >= deadline
        value = predicate()
        if value:
            return value
        if expired:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval_s)
