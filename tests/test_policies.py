"""The training consumer's policies on their own, without Spark or Kafka: prequential scoring and its
"only a rising error is drift" rule, the drift boost, and the promotion gate."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.training import micro_batch_plan
from pipeline.bundle import ModelBundle
from pipeline.policies.drift_boost import DriftBoost
from pipeline.policies.prequential import Prequential, rose
from pipeline.policies.promotion import PromotionGate, RecentLabelled, passes
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS

SPEC = BUILTIN_SPECS["small"]


# ------------------------------------------------------------------------------------------ prequential


def errors(rng: np.random.Generator, rates_and_lengths) -> np.ndarray:
    """A 0/1 error stream: ``length`` events at each error ``rate`` in turn."""
    return np.concatenate([rng.random(length) < rate for rate, length in rates_and_lengths]).astype(int)


def score_in_batches(stream: np.ndarray, batch: int, p: Prequential) -> list:
    return [
        p.score(stream[i : i + batch] == 0, np.full(len(stream[i : i + batch]), 0.5, np.float32))
        for i in range(0, len(stream), batch)
    ]


def test_batch_and_window_figures():
    p = Prequential(window=3, drift_delta=0.002)
    first = p.score(np.array([True, False, True, True]), np.array([0.5, 1e-9, 1.0, 0.25], np.float32))
    assert first.accuracy == 0.75 and not first.drift and first.drift_at_event is None
    assert first.log_loss == pytest.approx(-np.mean(np.log([0.5, 1e-7, 1.0, 0.25])), rel=1e-5)  # clipped at 1e-7
    assert first.window_accuracy == pytest.approx(2 / 3)  # the last 3: wrong, right, right
    second = p.score(np.array([False]), np.array([0.1], np.float32))
    assert second.accuracy == 0.0 and second.window_accuracy == pytest.approx(2 / 3)  # right, right, wrong
    assert list(p.errors) == [0, 0, 1] and p.events == 5


class StubDetector:
    """A drift detector whose estimate and verdict the test sets for the next update."""

    def __init__(self, estimation: float):
        self.estimation, self.drift_detected, self.next = estimation, False, (estimation, False)

    def update(self, error: int) -> None:
        self.estimation, self.drift_detected = self.next


def test_only_a_change_to_a_higher_error_counts():
    detector = StubDetector(0.3)
    detector.next = (0.1, True)  # a change, to fewer errors: the model learned
    assert not rose(detector, 0)
    detector.next = (0.5, True)  # a change, to more errors: drift
    assert rose(detector, 1)
    detector.next = (0.6, False)  # more errors, no change found
    assert not rose(detector, 1)


def test_a_falling_error_is_not_drift_though_adwin_sees_a_change():
    stream = errors(np.random.default_rng(1), [(0.5, 2000), (0.05, 3000)])  # a model learning its concept
    from river.drift import ADWIN

    bare = ADWIN(delta=0.002)
    assert any(bare.update(e) or bare.drift_detected for e in stream.tolist())  # ADWIN flags the improvement
    assert not any(s.drift for s in score_in_batches(stream, 500, Prequential(window=1000, drift_delta=0.002)))


def test_a_rising_error_is_drift_at_the_first_rising_change_counted_over_all_events():
    stream = errors(np.random.default_rng(2), [(0.05, 3000), (0.6, 2000)])  # the concept changed at event 3000
    scores = score_in_batches(stream, 500, Prequential(window=1000, drift_delta=0.002))
    flagged = [(i, s.drift_at_event) for i, s in enumerate(scores) if s.drift]
    assert flagged and all(at >= 3000 for _, at in flagged) and flagged[0][1] - 3000 <= 300, flagged
    batch, at = flagged[0]
    assert batch * 500 <= at < (batch + 1) * 500  # an index in the stream, inside the batch that found it
    from river.drift import ADWIN  # the first rising change of that batch, not a later one

    twin = ADWIN(delta=0.002)
    rising = [i for i, e in enumerate(stream.tolist()) if rose(twin, e)]
    assert at == min(i for i in rising if i >= batch * 500)


# ------------------------------------------------------------------------------------------ drift boost


def test_no_boost_when_the_detecting_micro_batch_already_trained_past_the_drift():
    """A micro-batch as long as the boost: the workers recovered inside it, a boost afterwards only adds noise."""
    boost = DriftBoost(factor=3.0, events=5000)
    assert boost.drifted(at_event=14_000, events=20_000) == 6000
    assert boost.left <= 0 and not boost.active  # nothing left to boost
    assert boost.drifted(at_event=18_500, events=20_000) == 1500
    assert boost.left == 3500 and boost.active


def test_the_boost_counts_down_the_events_it_trained():
    boost = DriftBoost(factor=3.0, events=5000)
    boost.trained(1000)  # not boosted: nothing to count
    assert boost.left == 0
    boost.drifted(at_event=1000, events=1500)
    boost.trained(3000)
    assert boost.left == 1500 and boost.active
    boost.trained(2000)
    assert boost.left == -500 and not boost.active
    boost.trained(1000)
    assert boost.left == -500


def test_a_boosted_learning_rate_is_multiplied_then_capped():
    boost = DriftBoost(factor=3.0, events=5000)
    assert boost.learning_rate(0.01) == pytest.approx(0.03)
    assert boost.learning_rate(0.1, largest=0.2) == 0.2


@pytest.mark.parametrize("algorithm", ["aeasgd", "eamsgd"])
def test_a_drift_boost_keeps_the_elastic_step_valid(tmp_path, algorithm):
    """EASGD's elastic step is learning_rate * rho <= 1: a boosted learning rate is capped, not a crash."""
    settings = load_settings(home=tmp_path, model="small", algorithm=algorithm, drift_boost=3.0, rho=5.0)
    boost = DriftBoost(settings.drift_boost, settings.drift_boost_events)
    boosted = micro_batch_plan(settings, SPEC, 1, "q", boost).algorithm()
    assert boosted.alpha == pytest.approx(1.0) and micro_batch_plan(settings, SPEC, 1, "q").algorithm().alpha == (
        pytest.approx(0.5)
    )


def test_a_micro_batch_plan_boosts_and_sizes_synchronous_rounds(tmp_path):
    settings = load_settings(home=tmp_path, model="small", algorithm="adag", drift_boost=3.0)
    boosted = micro_batch_plan(settings, SPEC, 4, "q", DriftBoost(settings.drift_boost, 5000))
    assert boosted.spec.optimizer.learning_rate == pytest.approx(3 * SPEC.optimizer.learning_rate)
    assert boosted.seed == settings.seed + 4 and (boosted.query_id, boosted.batch_id) == ("q", 4)
    plain = micro_batch_plan(settings, SPEC, 4, "q")
    assert plain.spec.optimizer.learning_rate == SPEC.optimizer.learning_rate
    assert "global_batch_size" not in plain.algorithm_params
    sync = micro_batch_plan(load_settings(home=tmp_path, algorithm="sync", workers=3, batch_size=32), SPEC, 0, "q")
    assert sync.synchronous and sync.algorithm_params["global_batch_size"] == 96


# ------------------------------------------------------------------------------------------ promotion gate


def test_a_candidate_passes_when_it_trails_by_the_margin_at_most():
    assert passes(0.90, 0.90, margin=0.0) and passes(0.95, 0.90, margin=0.0)
    assert passes(0.89, 0.90, margin=0.01 + 1e-12) and not passes(0.88, 0.90, margin=0.01)


def test_recent_events_keep_whole_micro_batches_covering_the_window():
    recent = RecentLabelled(window=5)
    for start in range(0, 12, 3):  # micro-batches of 3 events: 0-2, 3-5, 6-8, 9-11
        recent.remember(np.arange(start, start + 3)[:, None], np.arange(start, start + 3))
    assert [y.tolist() for _, y in recent.parts] == [[6, 7, 8], [9, 10, 11]] and len(recent) == 6
    x, y = recent.latest()
    assert y.tolist() == [7, 8, 9, 10, 11] and x[:, 0].tolist() == y.tolist()


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.create_model(SPEC)
    return registry


@pytest.fixture
def sample():
    x = np.random.default_rng(0).normal(size=(3000, SPEC.n_features)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def trained(x, y) -> ModelBundle:
    good = ModelBundle(SPEC, seed=2)
    for _ in range(300):
        good.train_on_batch(x[:256], y[:256])
    return good


def test_gate_holds_back_a_worse_candidate_and_promotes_a_good_one(registry, sample):
    x, y = sample
    good = trained(x, y)
    registry.set_alias("small", "champion", registry.register("small", good.get_weights()))
    gate = PromotionGate(registry, "small", window=2000, margin=0.01, auto_promote=True)
    gate.remember(x[:1000], y[:1000])
    gate.remember(x[1000:], y[1000:])
    bundle = ModelBundle(SPEC)

    registry.set_alias("small", "candidate", registry.register("small", ModelBundle(SPEC, seed=9).get_weights()))
    verdict = gate.review(bundle)
    assert verdict["events"] == 2000 and verdict["candidate_accuracy"] < verdict["champion_accuracy"] - 0.01
    assert not verdict["promoted"] and registry.resolve("small", "champion") == 1
    assert gate.review(bundle) is None  # a candidate is reviewed once

    registry.set_alias("small", "candidate", registry.register("small", good.get_weights()))
    assert gate.review(bundle)["promoted"] and registry.resolve("small", "champion") == 3


def test_gate_reviews_nothing_without_events_or_a_new_candidate(registry, sample):
    x, y = sample
    version = registry.register("small", ModelBundle(SPEC, seed=1).get_weights())
    registry.set_alias("small", "champion", version)
    gate = PromotionGate(registry, "small", window=100, margin=0.0, auto_promote=True)
    bundle = ModelBundle(SPEC)
    assert gate.review(bundle) is None  # no candidate
    registry.set_alias("small", "candidate", version)
    gate.remember(x[:50], y[:50])
    assert gate.review(bundle) is None  # the candidate is the champion
    registry.set_alias("small", "candidate", registry.register("small", ModelBundle(SPEC, seed=2).get_weights()))
    assert (
        PromotionGate(registry, "small", window=100, margin=0.0, auto_promote=True).review(bundle) is None
    )  # no events


def test_without_a_champion_or_auto_promote(registry, sample):
    """No champion scores 0, so any candidate passes; without auto_promote a passing one waits."""
    x, y = sample
    registry.set_alias("small", "candidate", registry.register("small", trained(x, y).get_weights()))
    gate = PromotionGate(registry, "small", window=500, margin=0.0, auto_promote=False)
    gate.remember(x[:800], y[:800])
    verdict = gate.review(ModelBundle(SPEC))
    assert verdict["champion"] is None and verdict["champion_accuracy"] == 0.0 and verdict["events"] == 500
    assert verdict["passed"] and not verdict["promoted"] and "champion" not in registry.aliases("small")
