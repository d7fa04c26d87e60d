"""TF Serving's version and label routes, ``:classify`` and the columnar answer, bounded loaded versions,
canary and shadow traffic: the real app over HTTP with a real registry (moves reach it by polling the
registry, so no broker is needed), each answer checked against the registered model's own output."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from pipeline.bundle import ModelBundle
from pipeline.policies.promotion import PromotionGate
from pipeline.registry import Registry
from pipeline.settings import load_settings
from serving.app import create_app
from serving.shadow import distribution_difference
from tests.helpers import scrape
from tests.test_serving import SPEC, TOKEN, LiveServer, _varied, _weights

MODEL = "/v1/models/small"
ROWS = np.random.default_rng(11).normal(size=(5, SPEC.n_features)).astype(np.float32)


def _expected(registry: Registry, version: int, rows: np.ndarray = ROWS) -> np.ndarray:
    """What ``version`` itself computes for ``rows``."""
    bundle = ModelBundle(SPEC, seed=0)
    bundle.set_weights(registry.weights("small", version)[1])
    return bundle.predict_proba(rows)


def _serve(tmp_path, versions: int, **settings) -> tuple[LiveServer, Registry]:
    """The app on ``small`` with ``versions`` registered (v1 champion, v2 candidate), polling the registry."""
    settings = load_settings(home=tmp_path, model="small", registry_poll_s=0.2, admin_token=TOKEN, **settings)
    registry = Registry(settings.registry_url)
    registry.create_model(SPEC)
    for k in range(versions):
        registry.register("small", _weights(k + 1))
    registry.set_alias("small", "champion", 1)
    registry.set_alias("small", "candidate", 2)
    return LiveServer(create_app(settings)), registry


def _until(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def four_versions(tmp_path_factory):
    server, registry = _serve(tmp_path_factory.mktemp("versions"), versions=4, max_loaded_versions=3)
    yield server, registry
    server.stop()


def test_version_and_label_routes_answer_with_that_version(four_versions):
    server, registry = four_versions
    with httpx.Client(base_url=server.url) as client:
        for path, version in (("/versions/2", 2), ("/labels/candidate", 2), ("/labels/champion", 1), ("", 1)):
            answer = client.post(MODEL + path + ":predict", json={"instances": ROWS.tolist()})
            assert answer.status_code == 200, (path, answer.text)
            assert answer.json()["model_version"] == version, path
            np.testing.assert_allclose(answer.json()["predictions"], _expected(registry, version), rtol=1e-5, atol=1e-6)
        columns = {name: ROWS[:, j].tolist() for j, name in enumerate(SPEC.feature_names)}
        answer = client.post(MODEL + "/versions/3:predict", json={"inputs": columns})
        assert answer.status_code == 200 and set(answer.json()) == {"outputs", "model_version"}, answer.text
        np.testing.assert_allclose(answer.json()["outputs"], _expected(registry, 3), rtol=1e-5, atol=1e-6)
        for path, status, words in (
            ("/versions/99:predict", 404, "model 'small' has no version 99"),
            ("/labels/nope:predict", 404, "model 'small' has no 'nope' alias"),
            ("/labels/Bad!:predict", 400, "label"),
            ("/versions/two:predict", 400, "version"),
            ("/versions/0:predict", 400, "version"),
        ):
            answer = client.post(MODEL + path, json={"instances": ROWS.tolist()})
            assert answer.status_code == status and words in answer.json()["error"], (path, answer.text)
        unknown = httpx.post(server.url + "/v1/models/nope/versions/1:predict", json={"instances": ROWS.tolist()})
        assert unknown.status_code == 404 and "model 'nope' is not served here" in unknown.json()["error"]
        metrics = client.get("/metrics").text
    assert 'streamfit_model_requests_total{model="small",version="2"} 2.0' in metrics, metrics
    assert 'streamfit_model_request_errors_total{model="small",version="1"} 0.0' in metrics


def test_classify_answers_in_tf_servings_shape(four_versions):
    server, registry = four_versions
    names = SPEC.feature_names
    context = {names[0]: float(ROWS[0, 0])}  # shared by every example
    examples = [{name: float(value) for name, value in zip(names[1:], row[1:])} for row in ROWS]
    with httpx.Client(base_url=server.url) as client:
        for path, version in (("", 1), ("/versions/3", 3), ("/labels/candidate", 2)):
            answer = client.post(MODEL + path + ":classify", json={"context": context, "examples": examples})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == version
            rows = ROWS.copy()
            rows[:, 0] = ROWS[0, 0]
            expected = _expected(registry, version, rows)
            result = answer.json()["result"]
            assert [[label for label, _ in row] for row in result] == [["0", "1"]] * len(ROWS)
            np.testing.assert_allclose([[p for _, p in row] for row in result], expected, rtol=1e-5, atol=1e-6)
        bad = client.post(MODEL + ":classify", json={"examples": [{names[0]: 1.0}]})
        assert bad.status_code == 400 and "examples[0]: missing feature(s)" in bad.json()["error"], bad.text
        meta = client.get(MODEL + "/metadata").json()
    signatures = meta["metadata"]["signature_def"]["signature_def"]
    predict = signatures["serving_default"]
    assert predict["method_name"] == "tensorflow/serving/predict"
    assert predict["inputs"]["features"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in predict["inputs"]["features"]["tensor_shape"]["dim"]] == ["-1", "10"]
    assert [d["size"] for d in predict["outputs"]["probabilities"]["tensor_shape"]["dim"]] == ["-1", "2"]
    assert signatures["classification"]["method_name"] == "tensorflow/serving/classify"
    assert meta["metadata"]["features"] == names and meta["model_spec"]["version"] == "1"  # streamfit's fields beside
    for path, version in (("/versions/3", "3"), ("/labels/candidate", "2")):
        other = httpx.get(server.url + MODEL + path + "/metadata").json()
        assert other["model_spec"]["version"] == version and "signature_def" in other["metadata"], other
    assert httpx.get(server.url + MODEL + "/versions/99/metadata").status_code == 404


def test_a_pinned_older_version_keeps_answering_across_ten_promotions_in_bounded_memory(four_versions):
    server, registry = four_versions
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"instances": ROWS.tolist()}
    first = _expected(registry, 1)
    with httpx.Client(base_url=server.url) as client:
        loads = scrape(server.port)['streamfit_model_version_loads_total{model="small"}']
        for k in range(10):
            newer = registry.register("small", _varied(_weights(1), 100 + k), parent=1)
            promoted = client.post("/admin/models/small/promote", json={"version": newer}, headers=auth)
            assert promoted.status_code == 200 and promoted.json()["serving"] == newer, promoted.text
            assert client.post("/v1/models/small:predict", json=body).json()["model_version"] == newer
            pinned = client.post("/v1/models/small/versions/1:predict", json=body)
            assert pinned.status_code == 200 and pinned.json()["model_version"] == 1, pinned.text
            np.testing.assert_allclose(pinned.json()["predictions"], first, rtol=1e-5, atol=1e-6)
        figures = scrape(server.port)
        assert figures['streamfit_model_version_loads_total{model="small"}'] - loads <= 1, "v1 was loaded again"
        for version in (2, 3, 4, 1, 2):  # more versions than max_loaded_versions (3): the oldest make room
            assert client.post(f"/v1/models/small/versions/{version}:predict", json=body).status_code == 200
        bundles = scrape(server.port)['streamfit_model_bundles{model="small"}']
        status = client.get(MODEL).json()["model_version_status"]
    assert bundles <= 3 + 1, f"{bundles} model instances for max_loaded_versions 3 (+1 spare)"
    available = {s["version"] for s in status if s["state"] == "AVAILABLE"}
    assert available == {str(newer), "1", "2"}, status  # the champion and the two most recently used


def _shadowed(server: LiveServer, version: int, rows: np.ndarray) -> None:
    """Send ``rows`` one per request and wait until the candidate ``version`` has scored them all in shadow."""
    key = f'streamfit_shadow_rows_total{{model="small",version="{version}"}}'
    before = scrape(server.port).get(key, 0)
    with httpx.Client(base_url=server.url) as client:
        for row in rows:
            assert client.post(MODEL + ":predict", json={"instances": [row.tolist()]}).status_code == 200
    _until(lambda: scrape(server.port).get(key, 0) >= before + len(rows), f"v{version} shadowed every row")


def test_canary_share_lands_in_a_binomial_bound_and_shadow_measures_the_candidate(tmp_path):
    """20 % canary and shadow on: of 1,000 requests the candidate answers 200 +- 4 sigma (50.6), every
    answer names its version, per-version counters add up, and the candidate scored every row the
    champion answered, with the agreement and distribution difference of the two models' own outputs."""
    server, registry = _serve(tmp_path, versions=2, canary_share=0.2, shadow=True)
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(1000, SPEC.n_features)).astype(np.float32)
    key = 'streamfit_model_requests_total{model="small",version="%d"}'
    try:
        with httpx.Client(base_url=server.url) as client:
            _until(
                lambda: scrape(server.port).get('streamfit_model_version_loads_total{model="small"}') == 1,
                "the candidate loaded",
            )
            before = scrape(server.port)
            versions = []
            for row in rows:
                answer = client.post("/v1/models/small:predict", json={"instances": [row.tolist()]})
                assert answer.status_code == 200, answer.text
                versions.append(answer.json()["model_version"])
        versions = np.array(versions)
        assert set(versions) == {1, 2}
        candidate = int((versions == 2).sum())
        assert abs(candidate - 200) <= 4 * np.sqrt(1000 * 0.2 * 0.8), f"the candidate answered {candidate} of 1,000"
        after = scrape(server.port)
        for version in (1, 2):
            assert after[key % version] - before.get(key % version, 0) == (versions == version).sum()
        champion_rows = rows[versions == 1]
        shadowed = 'streamfit_shadow_rows_total{model="small",version="2"}'
        _until(lambda: scrape(server.port).get(shadowed, 0) >= len(champion_rows), "shadow scoring caught up")
        figures = scrape(server.port)
        assert figures[shadowed] == len(champion_rows)
        assert figures.get('streamfit_shadow_dropped_rows_total{model="small"}', 0) == 0
        champion, challenger = _expected(registry, 1, champion_rows), _expected(registry, 2, champion_rows)
        agreement = np.mean(champion.argmax(axis=1) == challenger.argmax(axis=1))
        assert 0 < agreement < 1, "pick versions that disagree on some rows, or agreement proves nothing"
        assert figures['streamfit_shadow_agreement_ratio{model="small",version="2"}'] == pytest.approx(agreement)
        assert figures['streamfit_shadow_distribution_difference_ratio{model="small",version="2"}'] == pytest.approx(
            distribution_difference(champion.mean(axis=0), challenger.mean(axis=0)), abs=1e-5
        )
    finally:
        server.stop()


def test_the_promotion_gate_can_require_the_candidates_live_shadow_agreement(tmp_path):
    """With min_agreement, the gate waits for serving to shadow min_rows rows of a candidate, holds back one
    that disagrees with the champion however its prequential accuracy compares (margin 1), and promotes one
    that agrees."""
    server, registry = _serve(tmp_path, versions=2, shadow=True)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, SPEC.n_features)).astype(np.float32)
    gate = PromotionGate(
        registry,
        "small",
        window=300,
        margin=1.0,
        auto_promote=True,
        min_agreement=0.99,
        min_rows=100,
        serving_url=server.url,
    )
    gate.remember(x, rng.integers(0, 2, 300))
    bundle = ModelBundle(SPEC)
    loads = 'streamfit_model_version_loads_total{model="small"}'
    try:
        assert gate.review(bundle) is None, "reviewed before serving shadowed anything"
        _until(lambda: scrape(server.port).get(loads) == 1, "the candidate loaded")
        _shadowed(server, 2, x[:120])
        verdict = gate.review(bundle)
        expected = np.mean(
            _expected(registry, 1, x[:120]).argmax(axis=1) == _expected(registry, 2, x[:120]).argmax(axis=1)
        )
        assert verdict["live_rows"] == 120 and verdict["live_agreement"] == pytest.approx(expected)
        assert expected < 0.99 and not verdict["passed"] and registry.resolve("small", "champion") == 1
        same = registry.register("small", registry.weights("small", 1)[1])
        registry.set_alias("small", "candidate", same)
        _until(lambda: scrape(server.port).get(loads) == 2, "the new candidate loaded")
        _shadowed(server, same, x[:100])
        verdict = gate.review(bundle)
        assert verdict["live_agreement"] == 1.0 and verdict["promoted"], verdict
        assert registry.resolve("small", "champion") == same
    finally:
        server.stop()
