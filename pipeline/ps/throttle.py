"""A token bucket that holds a byte stream to a rate: the parameter server's link throttle.

On one machine loopback moves gigabytes a second, so what compression saves on a real network
(``ps_link_mbps``, e.g. 100 MB/s) only shows once the server's link is held to that rate. Every
connection of a server draws from the same two buckets (in and out), as over one network card.

>>> bucket = TokenBucket(1e6, burst_s=0.0)
>>> started = time.monotonic(); bucket.take(200_000); bucket.take(100_000)
>>> 0.29 < time.monotonic() - started < 1.0
True
"""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """``take(n)`` returns once ``n`` more bytes fit the rate ``bytes_per_s``; up to ``burst_s``
    seconds of unused rate may be spent at once. Thread-safe; a large take goes into debt that later
    takes wait out, so a frame bigger than the burst still passes."""

    def __init__(self, bytes_per_s: float, *, burst_s: float = 0.05):
        if not bytes_per_s > 0:
            raise ValueError(f"a link rate must be positive, not {bytes_per_s}")
        self.rate = bytes_per_s
        self._burst = bytes_per_s * burst_s
        self._tokens = self._burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            wait = -self._tokens / self.rate
        if wait > 0:
            time.sleep(wait)
