"""Canary traffic: a configured share of ``:predict`` requests is answered by the ``candidate``.

Each request is drawn at random (a generator seeded once per process), so over ``n`` requests the
candidate answers about ``share * n`` of them, and the answer's ``model_version`` says which one did.
Until the candidate is loaded (the swap thread loads it as soon as it moves), or when it is the
champion itself, the champion answers.

>>> class Host:  # anything with acquire(model) and acquire_candidate(model)
...     def acquire(self, model): return "champion"
...     def acquire_candidate(self, model): return "candidate"
>>> canary = Canary(share=0.25, seed=1)
>>> sorted(set(canary.lease(Host(), "m") for _ in range(100)))
['candidate', 'champion']
"""

from __future__ import annotations

import random

from serving.swap import ModelHost, Served


class Canary:
    """Leases the candidate for a ``share`` of requests, the champion for the rest."""

    def __init__(self, share: float, seed: int | None = None):
        self.share = share
        self._random = random.Random(seed)

    def lease(self, host: ModelHost, model: str) -> Served:
        """A leased version of ``model`` on ``host`` for one request; the caller releases it."""
        if self.share and self._random.random() < self.share:
            candidate = host.acquire_candidate(model)
            if candidate is not None:
                return candidate
        return host.acquire(model)
