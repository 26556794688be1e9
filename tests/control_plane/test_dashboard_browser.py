"""The dashboard in a real headless browser after a real run: two tritonserver nodes and a
control-plane process with an admin token, traffic through both APIs (one request the node
refuses), a model unloaded and loaded again; then Chromium signs in with the token, and
every plot must have rendered traces with data. Screenshots are kept in
``$TEST_ARTIFACTS_DIR`` (default ``var/test-artifacts/``) as ``dashboard-*.png``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/test.sh`` installs them);
driven through ``/usr/bin/chromedriver`` so that Selenium never fetches a driver. Without
them the test is skipped, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llava_node.launcher import PROJECT_ROOT, TritonNode
from tests.control_plane.conftest import llava_stream, wait_for
from tests.fast.test_dashboard import PLOTS
from tests.media import image_bytes
from tests.processes import ControlPlaneProcess, running_nodes

pytestmark = pytest.mark.slow

TOKEN = "browser-test-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
# Per plot: its traces, points with an x, and SVG marks drawn (bars, points, line paths).
RENDERED_JS = """
const out = {};
for (const id of arguments[0]) {
  const div = document.getElementById('plot-' + id);
  const data = (div && div.data) || [];
  out[id] = {
    traces: data.length,
    points: data.reduce((n, t) => n + ((t.x || []).filter((x) => x !== null).length), 0),
    marks: div ? div.querySelectorAll('.plot .point, .plot .js-line, .plot path.bar, .plot .bars path').length : 0,
  };
}
return out;
"""


def artifacts_dir() -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS_DIR") or PROJECT_ROOT / "var" / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium_binary() -> str:
    binary = next((b for b in CHROMIUM if os.path.exists(b)), None) or shutil.which("chromium")
    if binary is None or not os.path.exists(CHROMEDRIVER):
        message = "no chromium and chromium-driver (Debian packages; scripts/test.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through Debian's chromedriver (nothing downloaded)."""
    binary = chromium_binary()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def nodes(tiny_checkpoint: Path) -> Iterator[list[TritonNode]]:
    """Two nodes in explicit model control, as the run command starts them: node 1 with
    ``llava`` loaded, node 2 with nothing (the test loads it there: a cold start)."""
    loads = (("llava",), ())
    with running_nodes(
        tiny_checkpoint, 2, [{"model_control": "explicit", "load_models": m} for m in loads]
    ) as started:
        yield started


@pytest.fixture(scope="module")
def run(nodes: list[TritonNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    """A control plane with an admin token over both nodes, after real traffic."""
    cp = ControlPlaneProcess(
        tmp_path_factory.mktemp("cp-dashboard"), [n.http_url for n in nodes], admin_token=TOKEN
    )
    cp.start()
    try:
        wait_for(lambda: len(_healthy(cp)) == len(nodes), 60, "both workers healthy")
        _traffic(cp)
        yield cp
    finally:
        cp.stop()


def _healthy(cp: ControlPlaneProcess) -> list[dict[str, Any]]:
    r = httpx.get(f"{cp.url}/admin/workers", headers=BEARER, timeout=10)
    return [w for w in r.json()["workers"] if w["state"] == "healthy"]


def _traffic(cp: ControlPlaneProcess) -> None:
    # a model load with its cold-start time, on the node that has nothing loaded
    r = httpx.post(f"{cp.url}/admin/models/llava/load", json={"worker_id": 2}, headers=BEARER, timeout=300)
    assert r.status_code == 200, r.text
    image = base64.b64encode(image_bytes(color=(200, 40, 90))).decode()
    for i in range(4):
        status, frames = llava_stream(
            f"{cp.url}/worker_generate_stream",
            {
                "model": "llava",
                "prompt": f"USER: <image>\nDashboard {i}? ASSISTANT:",
                "images": [image],
                "max_new_tokens": 8,
                "temperature": 0,
            },
            timeout_s=120,
        )
        assert status == 200 and frames[-1]["error_code"] == 0, frames[-1]
        r = httpx.post(
            f"{cp.url}/v1/chat/completions",
            json={
                "model": "llava",
                "messages": [{"role": "user", "content": f"dashboard chat {i}"}],
                "max_tokens": 8,
                "temperature": 0,
                "stream": i % 2 == 1,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
    # one the node refuses: an <image> placeholder and no image (an error of kind "bad request")
    status, frames = llava_stream(
        f"{cp.url}/worker_generate_stream",
        {"model": "llava", "prompt": "USER: <image>\nno image here ASSISTANT:", "max_new_tokens": 4},
    )
    assert frames[-1]["error_code"] != 0


def _wait_loads(driver: Any, more_than: int, timeout_s: float = 30) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(
        lambda d: (
            int(d.execute_script("return Number(document.body.dataset.loads || 0)")) > more_than
            or d.execute_script("return window.dashboard && window.dashboard.lastError")
        )
    )
    error = driver.execute_script("return window.dashboard.lastError")
    assert not error, f"the dashboard could not load its data: {error}"
    return int(driver.execute_script("return Number(document.body.dataset.loads)"))


def _screenshot(driver: Any, name: str) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1500, max(1000, int(height) + 40))
    path = artifacts_dir() / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    return path


def test_the_dashboard_renders_every_plot_with_data_after_a_real_run(
    run: ControlPlaneProcess, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{run.url}/admin/dashboard")
    assert browser.find_elements(By.NAME, "token"), "the sign-in form"
    _screenshot(browser, "sign-in")
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    loads = _wait_loads(browser, 0)
    browser.get_log("browser")  # what came before the session (the sign-in page's own 401)

    rendered = browser.execute_script(RENDERED_JS, sorted(PLOTS))
    empty = {k: v for k, v in rendered.items() if not (v["traces"] and v["points"] and v["marks"])}
    shot = _screenshot(browser, "1h")
    assert not empty, f"plots without data: {empty} (screenshot {shot})"
    text = browser.find_element(By.ID, "table-workers").text
    assert all(n in text for n in ("healthy", "llava"))
    assert "bad request" in browser.find_element(By.ID, "table-errors").text

    # another range, then the page refreshes by itself
    browser.find_element(By.CSS_SELECTOR, "button[data-range='15m']").click()
    loads = _wait_loads(browser, loads)
    assert browser.execute_script("return window.lastData.range.bucket_s") == 15
    Select(browser.find_element(By.ID, "interval")).select_by_value("5")
    _wait_loads(browser, loads, timeout_s=20)
    _screenshot(browser, "15m")

    problems = [
        e["message"]
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" or "Content Security Policy" in e["message"]
    ]
    assert not problems, problems
