"""The serving app over real HTTP (uvicorn on a free port) with a real registry and the real broker:
predictions equal the model's own, hot swaps under load lose no request, a move announced on
model-updates is served within a second, admin needs its token, bad requests get 4xx naming the
problem, and a schemathesis run over the OpenAPI schema finds no 5xx."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings as hypothesis_settings

from pipeline.broker import free_port
from pipeline.bundle import ModelBundle
from pipeline.kafka import ensure_topics
from pipeline.model_updates import announcing_registry
from pipeline.registry import Registry
from pipeline.settings import load_settings
from pipeline.spec import BUILTIN_SPECS
from serving.app import create_app
from tests.helpers import ROOT, STREAMFIT

SPEC = BUILTIN_SPECS["small"]
TOKEN = "test-admin-token"


class LiveServer:
    """``app`` under uvicorn in a thread, on a free port, until ``stop``."""

    def __init__(self, app):
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the app on {self.url} was not ready within 120 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def _weights(seed: int) -> dict[str, np.ndarray]:
    return ModelBundle(SPEC, seed=seed).get_weights()


def _varied(weights: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Distinct weights for version ``k`` without building a model (scaled kernels)."""
    return {name: (w * (1 + 0.01 * k)).astype(w.dtype) if "kernel" in name else w for name, w in weights.items()}


@pytest.fixture(scope="module")
def live(kafka, tmp_path_factory):
    """The app following a fresh model-updates topic, serving ``small`` v1; announcing registry and settings."""
    home = tmp_path_factory.mktemp("serving")
    updates = f"model-updates-{home.name}"
    ensure_topics(kafka, {updates: 1})
    settings = load_settings(
        home=home,
        model="small",
        kafka_bootstrap=kafka,
        topic_model_updates=updates,
        admin_token=TOKEN,
        registry_poll_s=30,
        max_request_bytes=64 * 1024,
    )
    registry, announcer = announcing_registry(settings)
    registry.create_model(SPEC)
    registry.set_alias("small", "champion", registry.register("small", _weights(1)))
    server = LiveServer(create_app(settings))
    yield server, registry, settings
    server.stop()
    announcer.close()


def _predict(client: httpx.Client, body: dict, model: str = "small") -> httpx.Response:
    return client.post(f"/v1/models/{model}:predict", json=body)


def test_predictions_equal_the_models_own_in_every_request_form(live):
    server, registry, _ = live
    version, weights = registry.weights("small")
    direct = ModelBundle(SPEC, seed=0)
    direct.set_weights(weights)
    rows = np.random.default_rng(5).normal(size=(7, SPEC.n_features)).astype(np.float32)
    expected = direct.predict_proba(rows)
    names = SPEC.feature_names
    forms = {
        "instances as lists": {"instances": rows.tolist()},
        "instances as objects": {"instances": [dict(zip(names, map(float, row))) for row in rows]},
        "inputs as rows": {"inputs": rows.tolist()},
        "inputs as columns": {"inputs": {name: rows[:, j].tolist() for j, name in enumerate(names)}},
    }
    with httpx.Client(base_url=server.url) as client:
        for form, body in forms.items():
            answer = _predict(client, body)
            assert answer.status_code == 200, (form, answer.text)
            assert answer.json()["model_version"] == version
            shape = "predictions" if "instances" in body else "outputs"  # TF Serving: inputs get outputs
            assert set(answer.json()) == {shape, "model_version"}, form
            np.testing.assert_allclose(answer.json()[shape], expected, rtol=1e-5, atol=1e-6, err_msg=form)
        # curl's -d sends application/x-www-form-urlencoded: the body is still read as JSON
        curl_like = client.post(
            "/v1/models/small:predict",
            content=f'{{"instances": {rows[:1].tolist()}}}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert curl_like.status_code == 200, curl_like.text
        np.testing.assert_allclose(curl_like.json()["predictions"], expected[:1], rtol=1e-5, atol=1e-6)


BAD_REQUESTS = [  # (body as bytes, status, words the error must contain)
    (b"", 400, "empty body"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"instances": [[1, 2]]}', 400, "instances[0]: expected 10 features (f0 .. f9), got 2"),
    (b'{"instances": [{"f0": 1}]}', 400, "missing feature(s) 'f1'"),
    (
        b'{"instances": [{"f0": 1, "f1": 1, "f2": 1, "f3": 1, "f4": 1, "f5": 1, "f6": 1, "f7": 1, "f8": 1, "f9": 1, '
        b'"zz": 2}]}',
        400,
        "unknown feature(s) 'zz'",
    ),
    (b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, NaN]]}', 400, "instances[0][9]"),
    (b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 1e999]]}', 400, "finite number"),
    (b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 1e39]]}', 400, "float32 range"),
    (
        b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, ' + b"9" * 400 + b"]]}",
        400,
        "instances[0][9]: Input should be a valid number, got 9999",
    ),
    (
        b'{"instances": [{"f0": 0, "f1": 0, "f2": 0, "f3": -1e39, "f4": 0, '
        b'"f5": 0, "f6": 0, "f7": 0, "f8": 0, "f9": 0}]}',
        400,
        "instances[0].f3 is -1e+39, outside the float32 range",
    ),
    (
        b'{"inputs": {"f0": [0, 3.5e38], "f1": [0, 0], "f2": [0, 0], "f3": [0, 0], "f4": [0, 0], "f5": [0, 0], '
        b'"f6": [0, 0], "f7": [0, 0], "f8": [0, 0], "f9": [0, 0]}}',
        400,
        "inputs.f0[1] is 3.5e+38, outside the float32 range",
    ),
    (
        b'{"instances": [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], '
        b"[3e38, 3e38, 3e38, 3e38, 3e38, 3e38, 3e38, 3e38, 3e38, 3e38]]}",
        400,
        "instances[1]: the model's probabilities are not finite",
    ),  # finite float32 input, overflow inside the model
    (b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, "x"]]}', 400, "instances[0][9]: Input should be a valid number"),
    (b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, true]]}', 400, "instances[0][9]"),
    (b'{"instances": []}', 400, "instances"),
    (b'{"inputs": {"f0": [1, 2]}}', 400, "missing feature(s)"),
    (b'{"instances": [[0,0,0,0,0,0,0,0,0,0]], "inputs": [[0,0,0,0,0,0,0,0,0,0]]}', 400, "exactly one of"),
    (b'{"rows": [[0]]}', 400, "rows"),
    (b'{"instances": [' + b",".join([b"[" + b",".join([b"0.5"] * 10) + b"]"] * 2000) + b"]}", 413, "65536-byte limit"),
]


@pytest.mark.parametrize("body, status, words", BAD_REQUESTS, ids=[w for _, _, w in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_problem(live, body, status, words):
    server = live[0]
    answer = httpx.post(
        server.url + "/v1/models/small:predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]


def test_unknown_model_and_route_are_404_with_json_errors(live):
    server = live[0]
    answer = httpx.post(server.url + "/v1/models/nope:predict", json={"instances": [[0.0] * 10]})
    assert answer.status_code == 404 and "model 'nope' is not served here; served: small" in answer.json()["error"]
    assert httpx.get(server.url + "/v1/models/nope").status_code == 404
    assert httpx.get(server.url + "/v1/models/nope/metadata").status_code == 404


def test_status_metadata_health_and_metrics(live):
    server, registry, _ = live
    with httpx.Client(base_url=server.url) as client:
        champion = registry.resolve("small", "champion")
        status = client.get("/v1/models/small").json()
        assert {
            "version": str(champion),
            "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""},
        } in status["model_version_status"]
        meta = client.get("/v1/models/small/metadata").json()
        assert meta["model_spec"]["version"] == str(champion)
        assert meta["metadata"]["features"] == SPEC.feature_names and meta["metadata"]["n_features"] == 10
        assert meta["metadata"]["parameters"] == ModelBundle(SPEC).n_parameters
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["ready"] is True
        _predict(client, {"instances": [[0.0] * 10]})
        metrics = client.get("/metrics").text
    assert re.search(
        r'streamfit_http_requests_total\{method="POST",route="/v1/models/\{model\}:predict",'
        r'status="200"\} [1-9]',
        metrics,
    )
    assert re.search(r'streamfit_model_version\{model="small"\} ' + str(champion), metrics)
    for series in (
        "streamfit_http_request_duration_seconds_bucket",
        "streamfit_batch_rows_bucket",
        "streamfit_model_swaps_total",
        "streamfit_model_swap_duration_seconds_bucket",
        "streamfit_model_updates_connected 1.0",
    ):
        assert series in metrics, series


def test_admin_needs_the_bearer_token(live):
    server = live[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}):
        for method, path in (("POST", "rollback"), ("POST", "promote"), ("POST", "reload"), ("DELETE", "pin")):
            answer = httpx.request(method, f"{server.url}/admin/models/small/{path}", headers=headers)
            assert answer.status_code == 401, (headers, path, answer.text)
            assert "Bearer" in answer.json()["error"]


def test_a_flood_past_the_queue_bound_gets_503_with_retry_after_and_the_server_recovers(tmp_path):
    """120 concurrent requests against a queue of 8 rows whose passes wait 300 ms for companions:
    the excess is refused at once with 503 + Retry-After (no other 5xx, no unbounded queue), and
    the server answers normally afterwards."""
    settings = load_settings(home=tmp_path, model="small", max_batch_size=64, max_batch_wait_ms=300, max_queued_rows=8)
    registry = Registry(settings.registry_url)
    registry.create_model(SPEC)
    registry.set_alias("small", "champion", registry.register("small", _weights(4)))
    server = LiveServer(create_app(settings))
    body = {"instances": [[0.5] * 10]}

    async def flood(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/models/small:predict", json=body) for _ in range(n)))

    try:
        started = time.monotonic()
        answers = asyncio.run(flood(120))
        assert time.monotonic() - started < 30
        statuses = Counter(answer.status_code for answer in answers)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[503] > 0 and statuses[200] >= 8, statuses
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] == "1"
                assert "overloaded" in answer.json()["error"] and "max_queued_rows" in answer.json()["error"]
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(3):
                answer = _predict(client, body)
                assert answer.status_code == 200 and answer.json()["model_version"] == 1, answer.text
            metrics = client.get("/metrics").text
        assert f'streamfit_requests_overloaded_total{{model="small"}} {statuses[503]}.0' in metrics
        assert "streamfit_batch_queue_rows 0.0" in metrics
    finally:
        server.stop()


def _series(url: str) -> set[str]:
    text = httpx.get(url + "/metrics").text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("streamfit_http_")}


def test_unknown_methods_and_paths_create_no_new_metric_series(live):
    server = live[0]
    rng = np.random.default_rng(7)

    def strangers(n: int) -> None:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(n):
                word = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 6))
                for method in ("PURGE", "FOO" + word, "get", "POST"):
                    client.request(method, f"/{word.lower()}/{rng.integers(1 << 30)}")
                client.request("PURGE", "/v1/models/small")
                client.request(word, "/healthz")

    strangers(3)
    _series(server.url)  # the first scrape's own series appear after it answers
    before = _series(server.url)
    assert any('method="other"' in series for series in before), before
    strangers(30)
    after = _series(server.url)
    assert after == before, after - before
    assert not any("PURGE" in series or "FOO" in series for series in after)


def _load(url: str, stop: threading.Event, log: list, body: dict) -> None:
    """One client sending requests back to back; logs (status, version, time answered)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            answer = _predict(client, body)
            log.append((answer.status_code, answer.json().get("model_version"), time.monotonic()))


def test_twenty_swaps_under_load_lose_no_request_and_are_served_within_a_second(live):
    server, registry, _ = live
    base = registry.weights("small")[1]
    body = {"instances": [[0.25] * 10]}
    stop, logs = threading.Event(), [[] for _ in range(4)]
    clients = [threading.Thread(target=_load, args=(server.url, stop, log, body)) for log in logs]
    for client in clients:
        client.start()
    delays, versions = [], []
    try:
        with httpx.Client(base_url=server.url) as probe:
            for k in range(20):
                version = registry.register("small", _varied(base, k + 2), parent=versions[-1] if versions else None)
                moved = time.monotonic()
                registry.set_alias("small", "champion", version)  # announced on model-updates
                while _predict(probe, body).json()["model_version"] != version:
                    assert time.monotonic() - moved < 10, f"v{version} not served 10 s after it became champion"
                    time.sleep(0.005)
                delays.append(time.monotonic() - moved)
                versions.append(version)
                time.sleep(0.05)
            last_swap = time.monotonic()
            time.sleep(0.3)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=30)
    assert np.percentile(delays, 99) <= 1.0, f"publish-to-serve delays {np.round(delays, 3).tolist()}"
    for log in logs:
        assert len(log) > 20, "a load client barely ran"
        assert all(status == 200 for status, _, _ in log), {status for status, _, _ in log}
        seen = [version for _, version, _ in log]
        assert seen == sorted(seen), "a client saw the served version go backwards"
        assert all(version == versions[-1] for _, version, at in log if at > last_swap + 0.05)
    assert len({v for log in logs for _, v, _ in log}) > 5, "the load clients hardly saw the swaps"
    metrics = httpx.get(server.url + "/metrics").text
    bundles = float(re.search(r'streamfit_model_bundles\{model="small"\} (\S+)', metrics).group(1))
    assert bundles <= 3, f"{bundles} model instances held after 20 swaps: memory grows with swaps"


def test_rollback_pin_and_reload_through_the_admin_api(live):
    server, registry, _ = live
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url + "/admin/models/small", headers=auth) as admin:
        before = registry.resolve("small", "champion")
        newer = registry.register("small", _varied(registry.weights("small")[1], 50), parent=before)
        promoted = admin.post("/promote", json={"version": newer})
        assert promoted.status_code == 200 and promoted.json()["serving"] == newer, promoted.text
        rolled = admin.post("/rollback")
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["serving"] == before == registry.resolve("small", "champion")
        assert (
            _predict(httpx.Client(base_url=server.url), {"instances": [[0.0] * 10]}).json()["model_version"] == before
        )
        pinned = admin.put("/pin", json={"version": newer})
        assert pinned.json() == {"model": "small", "serving": newer, "champion": before, "pinned": newer}
        assert admin.put("/pin", json={"version": 999}).status_code == 404
        unpinned = admin.delete("/pin")
        assert unpinned.json()["serving"] == before and unpinned.json()["pinned"] is None
        assert admin.post("/reload").json()["serving"] == before
        assert admin.post("/promote", json={"version": 999}).status_code == 404


def test_moves_reach_the_server_by_polling_the_registry_when_kafka_is_absent(tmp_path):
    settings = load_settings(home=tmp_path, model="small", registry_poll_s=0.2)  # no Kafka configured at all
    registry = Registry(settings.registry_url)
    registry.create_model(SPEC)
    registry.set_alias("small", "champion", registry.register("small", _weights(2)))
    server = LiveServer(create_app(settings))
    try:
        newer = registry.register("small", _weights(3), parent=1)
        moved = time.monotonic()
        registry.set_alias("small", "champion", newer)
        with httpx.Client(base_url=server.url) as client:
            while _predict(client, {"instances": [[0.0] * 10]}).json()["model_version"] != newer:
                assert time.monotonic() - moved < 5, "the registry poll did not pick up the new champion"
                time.sleep(0.02)
            assert "streamfit_model_updates_connected 0.0" in client.get("/metrics").text
    finally:
        server.stop()


def test_no_request_built_from_the_openapi_schema_gets_a_5xx(live):
    """schemathesis draws requests for every operation of ``/openapi.json`` and sends them over HTTP.

    The model is the served one (an unknown name only ever meets the 404 tested above) and admin
    requests carry the token, so the drawn bodies reach the model and the admin actions. (Driven
    through hypothesis directly: schemathesis' pytest plugin does not run under pytest 9.)
    """
    server = live[0]
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def no_5xx(case):
            if "model" in (case.path_parameters or {}):
                case.path_parameters["model"] = "small"
            answer = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code < 500, f"{case.method} {case.formatted_path} {case.body!r}: {answer.text}"
            statuses.setdefault(operation.label, set()).add(answer.status_code)  # noqa: B023 - called in this iteration

        no_5xx()
    assert 200 in statuses["POST /v1/models/{model}:predict"], statuses  # the drawn bodies did reach the model
    assert 200 in statuses["POST /admin/models/{model}/reload"], statuses


def test_a_value_the_models_standardisation_overflows_is_a_400_naming_the_feature(tmp_path):
    """f3's std is 1e-30, so 1e10 is finite in float32 but infinite once standardised."""
    settings = load_settings(home=tmp_path, model="small", registry_poll_s=30)  # no Kafka needed
    registry = Registry(settings.registry_url)
    registry.create_model(SPEC)
    weights = _weights(1)
    weights["standardise/std"][3] = 1e-30
    registry.set_alias("small", "champion", registry.register("small", weights))
    server = LiveServer(create_app(settings))
    try:
        with httpx.Client(base_url=server.url) as client:
            rows = [[0.5] * 10, [0.5, 0.5, 0.5, 1e10, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]
            answer = _predict(client, {"instances": rows})
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"].startswith(
                "instances[1]: feature f3 = 1e+10 is inf after the model's standardisation (x - 0) / 1e-30"
            ), answer.text
            columns = {f"f{j}": [row[j] for row in rows] for j in range(10)}
            answer = _predict(client, {"inputs": columns})
            assert answer.status_code == 400 and "inputs (row 1 of the columns): feature f3" in answer.text
            assert _predict(client, {"instances": rows[:1]}).status_code == 200
    finally:
        server.stop()


def test_the_readme_serve_and_curl_lines_work_as_written(tmp_path, cli_env):
    """``streamfit models create`` + ``streamfit serve`` + the README's curl line, as a new user runs them."""
    readme = (ROOT / "README.md").read_text()
    curl = next(
        line
        for line in readme.splitlines()
        if line.startswith("curl ") and "127.0.0.1:8000/v1/models/" in line and ":predict" in line
    )
    port = free_port("127.0.0.1")
    args = shlex.split(curl.replace(":8000", f":{port}"))
    url = next(a for a in args if a.startswith("http"))
    body = args[args.index("-d") + 1]
    model = re.search(r"/v1/models/([^:/]+):predict", url).group(1)
    subprocess.run([*STREAMFIT, "models", "create", model], env=cli_env, check=True, capture_output=True)
    serve = subprocess.Popen(
        [*STREAMFIT, "serve", "--port", str(port)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                assert serve.poll() is None, serve.stdout.read()
            assert time.monotonic() < deadline, "streamfit serve was not ready within 120 s"
            time.sleep(0.2)
        answer = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == 1 and len(answer.json()["predictions"][0]) == 2
    finally:
        serve.terminate()
        output = serve.communicate(timeout=30)[0]
    assert serve.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal after a clean stop
    assert "Application shutdown complete" in output, output
    assert f"POST http://127.0.0.1:{port}/v1/models/{model}:predict" in output
