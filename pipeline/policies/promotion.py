"""The promotion gate: when a new ``candidate`` version becomes ``champion``.

The parameter server publishes candidates as it trains; serving follows the champion. A candidate
replaces it only when its accuracy on the most recent labelled events is no worse than the
champion's by more than ``margin``: recent events, because under drift only they show the concept
served now; a margin, because two good models differ by noise. With ``auto_promote`` off a passing
candidate waits for ``streamfit models promote``. Each candidate is reviewed once.

Optionally (``min_agreement``) the gate also asks serving how the candidate did on live traffic: with
shadow on, serving counts the rows the candidate scored beside the champion and how often both chose
the same class. A candidate is then reviewed once serving has shadowed ``min_rows`` rows for it, and
passes only if it also agrees with the champion on at least ``min_agreement`` of them: prequential
accuracy needs labels, which live traffic may get late or never.

Optionally (``description_length``) a candidate must also not take more bits to describe than the
champion: its active (unpruned) parameters at :data:`BITS_PER_PARAMETER` each plus its summed log loss
in bits on the gate's window, the two-part code of Hinton and van Camp's minimum description length.
A pruned candidate that predicts as well then wins; a larger one must earn its size in log loss.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, NamedTuple

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

BITS_PER_PARAMETER = 32
"""What a float32 weight costs in the description length."""


def passes(candidate_accuracy: float, champion_accuracy: float, margin: float) -> bool:
    """Whether a candidate may replace the champion: it trails it by ``margin`` at most.

    >>> passes(0.90, 0.91, margin=0.01), passes(0.89, 0.91, margin=0.01)
    (True, False)
    """
    return candidate_accuracy >= champion_accuracy - margin


def description_bits(probabilities: np.ndarray, y: np.ndarray, active_parameters: int) -> float:
    """The model's bits (``BITS_PER_PARAMETER`` per active parameter) plus the labels' bits given its
    ``probabilities`` (summed log loss, base 2).

    >>> description_bits(np.array([[0.5, 0.5], [0.25, 0.75]]), np.array([0, 0]), active_parameters=1)
    35.0
    """
    chosen = np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0)
    return float(BITS_PER_PARAMETER * active_parameters - np.log2(chosen).sum())


class LiveFigures(NamedTuple):
    """What serving measured of a candidate on live traffic (shadow mode)."""

    rows: int  # rows the champion answered that the candidate also scored
    agreement: float  # the share of them where both chose the same class


def shadow_figures(serving_url: str, model: str, version: int, timeout_s: float = 5.0) -> LiveFigures | None:
    """``version``'s shadow figures from serving's ``/metrics``; None when serving cannot be reached or has none."""
    try:
        text = httpx.get(f"{serving_url.rstrip('/')}/metrics", timeout=timeout_s).text
    except httpx.HTTPError as exc:
        log.warning("gate: cannot read live figures from %s: %s", serving_url, exc)
        return None
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.labels.get("version") == str(version):
                counts[sample.name] = sample.value
    rows = int(counts.get("streamfit_shadow_rows_total", 0))
    return LiveFigures(rows, counts.get("streamfit_shadow_agreeing_rows_total", 0) / rows) if rows else None


@dataclass
class RecentLabelled:
    """The last labelled micro-batches, as many as it takes to hold ``window`` events.

    >>> recent = RecentLabelled(window=3)
    >>> for part in ([1, 2], [3, 4], [5]):
    ...     recent.remember(np.array(part)[:, None], np.array(part))
    >>> recent.latest()[1].tolist()
    [3, 4, 5]
    """

    window: int
    parts: deque[tuple[np.ndarray, np.ndarray]] = field(default_factory=deque)  # (x, y) of a micro-batch

    def __len__(self) -> int:
        return sum(len(y) for _, y in self.parts)

    def remember(self, x: np.ndarray, y: np.ndarray) -> None:
        self.parts.append((x, y))
        while len(self) - len(self.parts[0][1]) >= self.window:  # the oldest part is not needed
            self.parts.popleft()

    def latest(self) -> tuple[np.ndarray, np.ndarray]:
        """The most recent ``window`` events (fewer when not that many arrived yet)."""
        x, y = (np.concatenate(column) for column in zip(*self.parts))
        return x[-self.window :], y[-self.window :]


@dataclass
class PromotionGate:
    """Reviews a new ``candidate`` of ``model`` in ``registry`` against the champion on the most
    recent ``window`` labelled events, and promotes it when it :func:`passes` (with ``auto_promote``).

    With ``min_agreement`` set, ``live(model, version)`` gives the candidate's :class:`LiveFigures`
    (default: :func:`shadow_figures` of serving at ``serving_url``); see the module's docstring."""

    registry: Any  # a pipeline.registry.Registry
    model: str
    _: KW_ONLY
    window: int
    margin: float
    auto_promote: bool
    min_agreement: float | None = None
    min_rows: int = 1000
    serving_url: str = "http://127.0.0.1:8000"
    description_length: bool = False
    live: Callable[[str, int], LiveFigures | None] | None = None
    recent: RecentLabelled = field(init=False)
    reviewed: int | None = None  # the last candidate version reviewed

    def __post_init__(self) -> None:
        self.recent = RecentLabelled(self.window)
        if self.live is None:
            self.live = lambda model, version: shadow_figures(self.serving_url, model, version)

    def remember(self, x: np.ndarray, y: np.ndarray) -> None:
        """Keep a micro-batch's labelled events to score candidates on."""
        self.recent.remember(x, y)

    def review(self, bundle) -> dict | None:
        """Score a candidate not reviewed yet against the champion (with ``bundle``, a model of the
        spec); promote it if it passes. ``None`` when there is nothing to review."""
        aliases = self.registry.aliases(self.model)
        candidate, champion = aliases.get("candidate"), aliases.get("champion")
        if candidate is None or candidate == self.reviewed or candidate == champion or not self.recent.parts:
            return None
        live = None
        if self.min_agreement is not None:
            assert self.live is not None  # set in __post_init__
            live = self.live(self.model, candidate)
            if live is None or live.rows < self.min_rows:
                log.debug("gate: candidate v%s waits for %d shadowed rows (%s)", candidate, self.min_rows, live)
                return None  # reviewed on a later call, once serving has shadowed enough rows
        self.reviewed = candidate
        x, y = self.recent.latest()
        scores, bits = {}, {}
        for name, version in (("candidate", candidate), ("champion", champion)):
            if version is None:
                scores[name], bits[name] = 0.0, float("inf")
                continue
            weights = self.registry.weights(self.model, version)[1]
            bundle.set_weights(weights)
            probabilities = bundle.predict_proba(x)
            scores[name] = float(np.mean(probabilities.argmax(axis=1) == y))
            if self.description_length:
                active = self.registry.meta(self.model, version).get(
                    "active_parameters", sum(value.size for value in weights.values())
                )
                bits[name] = description_bits(probabilities, y, active)
        passed = passes(scores["candidate"], scores["champion"], self.margin)
        if self.description_length:
            passed = passed and bits["candidate"] <= bits["champion"]
        if live is not None and self.min_agreement is not None:
            passed = passed and live.agreement >= self.min_agreement
        promoted = passed and self.auto_promote
        if promoted:
            self.registry.promote(self.model, candidate)
        log.info(
            "gate: candidate v%s %.4f vs champion v%s %.4f on %d events%s: %s",
            candidate,
            scores["candidate"],
            champion,
            scores["champion"],
            len(y),
            f", live agreement {live.agreement:.4f} on {live.rows} rows" if live else "",
            "promoted" if promoted else "passes, waits for `models promote`" if passed else "held back",
        )
        return {
            "candidate": candidate,
            "champion": champion,
            "candidate_accuracy": scores["candidate"],
            "champion_accuracy": scores["champion"],
            "events": int(len(y)),
            "live_rows": live.rows if live else None,
            "live_agreement": live.agreement if live else None,
            "passed": passed,
            "promoted": promoted,
            **(
                {"candidate_bits": bits["candidate"], "champion_bits": bits["champion"]}
                if self.description_length
                else {}
            ),
        }
