"""Rate control: a token bucket that paces a loop to a target events/s.

>>> bucket = TokenBucket(rate=1000.0, burst=10)
>>> start = time.monotonic()
>>> for _ in range(110): bucket.take()
>>> 0.08 < time.monotonic() - start < 0.5
True
"""

from __future__ import annotations

import time


class TokenBucket:
    """Allows ``rate`` takes per second on average, with bursts up to ``burst``; rate 0 means no limit."""

    def __init__(self, rate: float, burst: int | None = None):
        if rate < 0:
            raise ValueError(f"rate must be >= 0 events/s, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, int(rate / 100))
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    def take(self, n: int = 1) -> None:
        """Block until ``n`` tokens are available, then spend them."""
        if not self.rate:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            time.sleep((n - self.tokens) / self.rate)
