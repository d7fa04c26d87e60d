"""The web console in a real browser (Debian's headless Chromium through its chromedriver, `make chromium`)
against a running ``streamfit up``: every page loads without a console error, the Pipeline page's rates
move while the producer runs, a promotion made on the Models page reaches serving and the Learning page,
an event id of ``<script>`` markup stays text, and the Try-it form gets a prediction. A screenshot of each
page is saved (the path is printed). Without a broker or serving, the console stays up and names them."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest

from pipeline.broker import free_port
from pipeline.kafka import producer
from pipeline.registry import Registry
from pipeline.settings import load_settings
from tests.helpers import ROOT
from tests.up_process import UpProcess
from tests.waiting import wait_until

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
TOKEN = "console-test-token"
PAGES = {
    "pipeline": "svg text.rate",
    "learning": "#markers",
    "models": "#models-body table",
    "dead-letters": "#letters",
    "try": "#try-form",
}
SCRIPT_ID = "<script>window.__consoleInjected = 1</script><img src=x onerror=window.__consoleInjected=2>"

needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="`make chromium` installs Debian's chromium and driver"
)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """One ``streamfit up`` for the module: candidates wait for a manual promotion, admin on."""
    home = tmp_path_factory.mktemp("console") / "home"
    port = free_port("127.0.0.1")
    env = {
        "STREAMFIT_ADMIN_TOKEN": TOKEN,
        "STREAMFIT_CONSOLE_PORT": str(port),
        "STREAMFIT_PS_PUBLISH_EVERY_S": "3",
        "STREAMFIT_GATE_WINDOW": "500",
        "STREAMFIT_MAX_OFFSETS_PER_TRIGGER": "4000",
    }
    run = UpProcess(home, 150, rate=300, env=env, args=("--manual-promote", "--drift-at", "0"))
    try:
        wait_until(
            lambda: any(line.startswith("console on ") for line in run.output),
            150,
            interval_s=0.5,
            message=lambda: "no console line:\n" + "\n".join(run.output),
        )
        run.console = f"http://127.0.0.1:{port}"
        _send_script_event(home)
        yield run
    finally:
        run.kill()
        run.wait(30)


def _send_script_event(home: Path) -> None:
    """An event whose id is markup and whose features are too few: both consumers dead-letter it."""
    bootstrap = json.loads((home / "broker.json").read_text())["bootstrap"]
    sender = producer(bootstrap, 10.0)
    event = {"id": SCRIPT_ID, "ts": int(time.time() * 1000), "features": [1.0], "label": 1}
    sender.send("events", key=SCRIPT_ID.encode(), value=orjson.dumps(event)).get(timeout=20)
    sender.close()


@pytest.fixture(scope="module")
def screenshots() -> Path:
    where = ROOT / ".streamfit" / "artifacts" / "console"
    where.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots in {where}")
    return where


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = Path(f"/tmp/streamfit-chromium-{time.time_ns()}")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no Selenium Manager download
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(browser, up, page: str, ready: str):
    from selenium.webdriver.common.by import By

    browser.get(f"{up.console}/{page}")
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, ready),
        30,
        interval_s=0.2,
        message=f"{page}: {ready} never appeared",
    )


def _text(browser, selector: str) -> str:
    """The text of every element ``selector`` matches, read in one go (the pages redraw while they are read)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), (e) => e.textContent).join(' ')", selector
    )


def _enabled(browser, selector: str) -> bool:
    return browser.execute_script("const e = document.querySelector(arguments[0]); return !!e && !e.disabled", selector)


def _click(browser, selector: str) -> None:
    """A real click on ``selector``, found again if the page redrew it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except StaleElementReferenceException:
            return False

    wait_until(clicked, 10, interval_s=0.1)


@needs_chromium
@pytest.mark.slow
def test_pipeline_rates_change_while_the_producer_runs(up, browser):
    _open(browser, up, "pipeline", "#figure-events")
    seen = set()

    def moving() -> bool:
        seen.add((_text(browser, "#figure-events"), _text(browser, "#arrow-producer-events")))
        return len({events for events, _ in seen if events != "-"}) >= 3

    wait_until(moving, 20, interval_s=0.5, message=lambda: f"events and rates seen: {seen}")
    rates = {rate for _, rate in seen if rate not in ("-", "-/s")}
    assert len(rates) >= 2 and any(float(r.removesuffix("/s").replace(",", "")) > 0 for r in rates), seen
    assert re.search(r"lag [\d,]+ \([\d.]+ s\)", _text(browser, "#sub-predict")), _text(browser, "#sub-predict")


@needs_chromium
@pytest.mark.slow
def test_a_promotion_on_the_models_page_reaches_serving_and_the_learning_page(up, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    registry = Registry(up.home / "registry")

    def waiting_candidate() -> int | None:
        aliases = registry.aliases(up.model)
        return aliases.get("candidate") if aliases.get("candidate", 0) > aliases.get("champion", 0) else None

    candidate = wait_until(waiting_candidate, 60, interval_s=0.5, message="no candidate waiting for promotion")
    _open(browser, up, "models", f"#version-{up.model}-{candidate}")
    promote = f'button[data-action="promote"][data-version="{candidate}"]'
    assert not _enabled(browser, promote)  # no token entered yet
    assert "Enter the admin token" in _text(browser, "#admin-note")
    browser.find_element(By.ID, "token").send_keys(TOKEN, Keys.TAB)
    wait_until(lambda: _enabled(browser, promote), 10)
    _click(browser, promote)
    wait_until(
        lambda: f"promote done: champion v{candidate}" in _text(browser, "#admin-result"),
        60,
        message=lambda: _text(browser, "#admin-result"),
    )
    served = httpx.get(f"http://127.0.0.1:{up.serve_port}/v1/models/{up.model}", timeout=10).json()
    answer = httpx.post(
        f"http://127.0.0.1:{up.serve_port}/v1/models/{up.model}:predict",
        json={"instances": [[0.0] * registry.spec(up.model).n_features]},
        timeout=10,
    ).json()
    assert answer["model_version"] == candidate, (answer, served)

    _open(browser, up, "learning", "#markers")
    wait_until(
        lambda: f"champion → v{candidate}" in _text(browser, "#markers tr.marker"),
        20,
        message=lambda: _text(browser, "#markers"),
    )


@needs_chromium
@pytest.mark.slow
def test_an_event_id_of_script_markup_is_shown_as_text(up, browser, screenshots):
    from selenium.webdriver.common.by import By

    _open(browser, up, "dead-letters", "#letters")

    def shown() -> bool:
        browser.refresh()
        wait_until(lambda: browser.find_elements(By.ID, "letters-count"), 10)
        time.sleep(1)
        return SCRIPT_ID in _text(browser, "#letters code.raw")

    wait_until(shown, 60, interval_s=1, message=lambda: _text(browser, "#letters")[:2000])
    assert browser.execute_script("return window.__consoleInjected") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#letters script, #letters img")
    browser.find_element(By.ID, "reason").send_keys("features")
    assert SCRIPT_ID in _text(browser, "#letters code.raw")  # the filter keeps the feature-count rejections
    browser.save_screenshot(str(screenshots / "dead-letters-script-id.png"))


@needs_chromium
@pytest.mark.slow
def test_the_try_it_form_returns_a_prediction(up, browser, screenshots):

    _open(browser, up, "try", "#try-form")
    _click(browser, "#try-send")
    wait_until(
        lambda: "HTTP 200, answered by version" in _text(browser, "#try-status"),
        20,
        message=lambda: _text(browser, "#try-result"),
    )
    answer = json.loads(_text(browser, "#try-answer"))
    assert len(answer["predictions"]) == 1 and answer["model_version"] >= 1, answer
    assert f":{up.serve_port}/v1/models/{up.model}:predict" in _text(browser, "#try-curl")
    browser.save_screenshot(str(screenshots / "try-answer.png"))


def test_the_console_stays_up_and_names_what_it_cannot_reach(tmp_path):
    """No broker, no serving: every route answers, naming Kafka and serving."""
    from console.app import ConsoleServer, create_app, listening_socket

    dead = free_port("127.0.0.1")
    settings = load_settings(home=tmp_path, serve_port=dead, kafka_timeout_s=1)
    server = ConsoleServer(create_app(settings, lambda: f"127.0.0.1:{dead}"), listening_socket("127.0.0.1", 0)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            wait_until(lambda: client.get("/api/pipeline").json()["sources"].get("kafka"), 20, interval_s=0.5)
            assert client.get("/pipeline").status_code == 200
            assert client.get("/api/dead-letters").json()["sources"]["kafka"].startswith("Kafka: ")
            tried = client.post("/api/predict/small", json={"instances": [[1.0, 2.0]]}).json()
            assert tried["status"] is None and tried["sources"]["serving"].startswith(
                f"serving at http://127.0.0.1:{dead}"
            )
            refused = client.post("/api/admin/small/promote", headers={"Authorization": "Bearer x"})
            assert refused.status_code == 502 and "serving at" in refused.json()["error"]
            assert client.post("/api/predict/small", json={"instances": []}).status_code == 422
    finally:
        server.stop()


@needs_chromium
@pytest.mark.slow
def test_every_page_loads_without_console_errors(up, browser, screenshots):
    """After the other tests: the screenshots show a run that has trained, published and promoted."""
    browser.get_log("browser")  # drop what came before
    for page, ready in PAGES.items():
        _open(browser, up, page, ready)
        time.sleep(2.5)  # a live sample, a refresh: errors they cause count too
        browser.save_screenshot(str(screenshots / f"{page}.png"))
        severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, (page, severe)
        assert "Unreachable" not in _text(browser, "#problems"), (page, _text(browser, "#problems"))


@needs_chromium
@pytest.mark.slow
def test_no_page_is_wider_than_a_phone(up, browser, screenshots):
    """On a 390 px wide screen the page itself never scrolls sideways (wide tables scroll in their box)."""
    browser.set_window_size(390, 844)
    try:
        for page, ready in PAGES.items():
            _open(browser, up, page, ready)
            time.sleep(1)
            width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            browser.save_screenshot(str(screenshots / f"{page}-phone.png"))
            assert width[0] <= width[1], (page, width)
    finally:
        browser.set_window_size(1280, 900)


NOISE = re.compile(r"oneDNN|absl|ProcessingTimeExecutor|retracing|\bWARN\b|^[IWE]\d{4} \d\d:\d\d")
"""Lines that belong in the logs, not the terminal: TensorFlow's banners and C++ log lines, Spark's log4j warnings."""


@pytest.mark.slow
def test_the_up_terminal_shows_only_streamfits_lines(up):
    """Last in the module: Ctrl-C stops the run (the console with it) in order, and nothing it printed
    from start to stop is log noise."""
    up.process.send_signal(signal.SIGINT)
    assert up.wait(90) == 0, "\n".join(up.output)
    assert any(line.startswith("stopped; ") for line in up.output), up.output
    noise = [line for line in up.output if NOISE.search(line)]
    assert not noise, noise[:20]
    assert any(line.startswith("status ") for line in up.output), up.output
    assert (up.home / "logs" / "spark.log").exists()


@needs_chromium
@pytest.mark.slow
def test_the_models_page_shows_a_pruned_versions_sparsity(tmp_path, browser):
    """No broker, no serving: the Models page lists a pruned version's sparsity and compression ratio."""
    from console.app import ConsoleServer, create_app, listening_socket
    from pipeline.bundle import ModelBundle
    from pipeline.pruning import global_masks
    from pipeline.spec import BUILTIN_SPECS

    dead = free_port("127.0.0.1")
    settings = load_settings(home=tmp_path, serve_port=dead, kafka_timeout_s=1)
    registry = Registry(settings.registry_url)
    registry.create_model(BUILTIN_SPECS["small"])
    weights = ModelBundle(BUILTIN_SPECS["small"]).get_weights()
    version = registry.register("small", weights, masks=global_masks(weights, 0.9))
    meta = registry.meta("small", version)
    server = ConsoleServer(create_app(settings, lambda: f"127.0.0.1:{dead}"), listening_socket("127.0.0.1", 0)).start()
    try:
        _open(browser, SimpleNamespace(console=server.url), "models", f"#version-small-{version}")
        shown = _text(browser, f"#version-small-{version}")
    finally:
        server.stop()
    assert f"{meta['sparsity'] * 100:.1f} % ({meta['compression_ratio']:.1f}x)" in shown, shown
