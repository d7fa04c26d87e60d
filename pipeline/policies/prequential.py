"""Prequential (test-then-train) scoring of the labelled stream, and drift detection on its errors.

Each labelled event is scored by the model just before the model trains on it, so the errors are
an honest running estimate with no held-out set (Gama, Sebastião, Rodrigues, "On evaluating stream
learning algorithms", Machine Learning 90, 2013). river's ADWIN watches the error stream. ADWIN
flags any change of its mean, and a learning model's error falls in steps as micro-batches train
it: those changes are improvements, so only a change to a higher error is drift.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BatchScore:
    """One micro-batch's prequential figures; ``drift_at_event`` is the index (counted over all
    labelled events scored so far) of the first event at which the error was found to have risen."""

    accuracy: float
    log_loss: float
    window_accuracy: float  # over the last ``window`` labelled events
    drift: bool
    drift_at_event: int | None


def rose(detector: Any, error: int) -> bool:
    """Feed one error (1 wrong, 0 right) to a river drift ``detector``; whether it flagged a change
    that raised its estimate of the error rate (a fall is the model learning, not drift)."""
    before = detector.estimation
    detector.update(error)
    return detector.drift_detected and detector.estimation > before


@dataclass
class Prequential:
    """Test-then-train bookkeeping: per-batch and sliding-window accuracy, and ADWIN on the errors.

    >>> p = Prequential(window=4, drift_delta=0.002)
    >>> p.score(np.array([True, False]), np.array([0.8, 0.4], np.float32)).window_accuracy
    0.5
    >>> p.score(np.array([True, True, True]), np.array([0.9, 0.9, 0.9], np.float32)).window_accuracy
    0.75
    >>> p.events
    5
    """

    window: int
    drift_delta: float
    errors: deque[int] = field(init=False, repr=False)  # the last ``window`` events' errors, in arrival order
    detector: Any = field(init=False, repr=False)  # river.drift.ADWIN
    events: int = 0  # labelled events scored so far

    def __post_init__(self) -> None:
        from river.drift import ADWIN

        self.errors = deque(maxlen=self.window)
        self.detector = ADWIN(delta=self.drift_delta)

    def score(self, correct: np.ndarray, label_probability: np.ndarray) -> BatchScore:
        """The figures of one batch from each labelled event's correctness and its label's probability
        (in arrival order); every event's error goes to the window and to ADWIN."""
        wrong = (~correct).astype(int)
        drift_at = None
        for i, error in enumerate(wrong.tolist()):
            if rose(self.detector, error) and drift_at is None:
                drift_at = self.events + i
        self.errors.extend(wrong.tolist())
        self.events += len(wrong)
        picked = np.clip(label_probability, 1e-7, 1.0)
        return BatchScore(
            accuracy=float(1 - wrong.mean()),
            log_loss=float(-np.mean(np.log(picked))),
            window_accuracy=float(1 - np.mean(self.errors)),
            drift=drift_at is not None,
            drift_at_event=drift_at,
        )
