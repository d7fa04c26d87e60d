"""The drift boost: after a drift the workers train with a larger learning rate for a while.

The old concept's weights must be unlearned, and a larger step does that faster. The boost lasts
until ``events`` labelled events after the drift point have trained. Those the detecting
micro-batch already trained count, so with micro-batches larger than that the workers have
recovered inside it and nothing is boosted: a boost afterwards would only add noise. A boosted
rate never passes the largest the algorithm accepts (EASGD's elastic step: learning_rate * rho <= 1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DriftBoost:
    """How many labelled events are still to train boosted (``left``), and by how much.

    >>> boost = DriftBoost(factor=3.0, events=5000)
    >>> boost.drifted(at_event=18_500, events=20_000)  # 1,500 trained since the drift point
    1500
    >>> boost.left, boost.learning_rate(0.1, largest=0.2)
    (3500, 0.2)
    """

    factor: float  # the learning-rate multiplier (1: no reaction)
    events: int  # labelled events after a drift point that train boosted
    left: int = 0

    @property
    def active(self) -> bool:
        """Whether the next micro-batch trains boosted."""
        return self.left > 0

    def learning_rate(self, base: float, largest: float = float("inf")) -> float:
        """The boosted rate for a ``base`` rate: ``base * factor``, at most ``largest``."""
        return min(base * self.factor, largest)

    def trained(self, rows: int) -> None:
        """``rows`` labelled events trained by a micro-batch planned now (boosted if it is active)."""
        if self.active:
            self.left -= rows

    def drifted(self, at_event: int, events: int) -> int:
        """A drift at labelled event ``at_event``, found when ``events`` had trained: the boost covers
        what remains of its ``events`` after the drift point (``left`` <= 0: nothing). Returns the
        labelled events trained since the drift point."""
        trained_since = events - at_event
        self.left = self.events - trained_since
        return trained_since
