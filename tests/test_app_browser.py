"""End to end: headless Chromium drives ``python -m med3dvlm.app`` with a tiny VLM.

It refuses a non-NIfTI upload with a message, shows a phantom volume, moves the axial slider (the
slice image must change), asks a question and presses Describe (the answers must be the API's on
the same volume), and saves a screenshot under pytest's temporary folder.

Needs Debian's ``chromium`` + ``chromium-driver`` (``make browser``) and selenium (the ``dev``
extra). Without them the test is skipped, unless ``MED3DVLM_REQUIRE_BROWSER=1`` (set by ``.ci/run``)
makes that a failure. Run it with ``make test-app`` (or ``make test-slow``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QUESTION = "Which organ has a lesion?"
MAX_NEW_TOKENS = 16
STARTUP_TIMEOUT_S = 180  # model load + Gradio start on a busy 2-core machine
PAGE_TIMEOUT_S = 120
# Chromium quiet and offline: no GPU, no sandbox (containers run as root), no background requests.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1400,1800",
)


def browser_or_skip() -> tuple[str, str]:
    """Paths of Chromium and its driver; skips (or fails, under MED3DVLM_REQUIRE_BROWSER=1) without them."""
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        missing.append("gradio (pip, the app extra)")
    if missing:
        message = f"browser test needs {', '.join(missing)}: `make browser` and `make install` provide them"
        if os.environ.get("MED3DVLM_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with status {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the app did not answer at {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def app_url(tiny_models, tmp_path):
    browser_or_skip()
    port = free_port()
    log = tmp_path / "app.log"
    command = [
        sys.executable, "-m", "med3dvlm.app", f"model_dir={tiny_models.vlm_dir}", f"port={port}",
        f"max_new_tokens={MAX_NEW_TOKENS}", "max_upload_mb=1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_or_skip()
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager (which would download one) is never called
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_browse_ask_describe_in_headless_chromium(app_url, browser, tiny_models, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    import med3dvlm

    volume = tiny_models.volumes[0]
    model = med3dvlm.load_model(tiny_models.vlm_dir)
    expected_answer = model.ask(volume, QUESTION, max_new_tokens=MAX_NEW_TOKENS)
    expected_report = model.describe(volume, max_new_tokens=MAX_NEW_TOKENS)
    assert expected_answer and expected_answer != expected_report

    wait = WebDriverWait(browser, PAGE_TIMEOUT_S)

    def element(selector):
        return browser.find_element(By.CSS_SELECTOR, selector)

    def upload(path):
        wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        element("#upload input[type=file]").send_keys(str(path))

    browser.get(app_url)
    # a file that is not NIfTI: a message in the page, no traceback
    notes = tmp_path / "notes.txt"
    notes.write_text("not a volume")
    upload(notes)
    wait.until(lambda _: "notes.txt is neither NIfTI nor a zip" in element("#status").text)
    element("#upload button[aria-label=Clear]").click()

    # the phantom volume: three slices with sliders
    upload(volume)
    wait.until(lambda _: "16 x 32 x 32 voxels" in element("#status").text)
    for plane in ("axial", "coronal", "sagittal"):
        wait.until(lambda _, plane=plane: browser.find_elements(By.CSS_SELECTOR, f"#{plane}-image img"))
    slider = element("#axial-slider input[type=range]")
    assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("value")) == ("0", "15", "8")
    before = element("#axial-image img").get_attribute("src")

    for _ in range(3):
        slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda _: element("#axial-image img").get_attribute("src") != before)
    assert element("#axial-slider input[type=range]").get_attribute("value") == "11"
    after = element("#axial-image img").get_attribute("src")
    with urllib.request.urlopen(before) as first, urllib.request.urlopen(after) as second:
        assert first.read() != second.read()  # another slice, not the same picture under a new name

    # a question and its answer, then a report
    element("#question textarea").send_keys(QUESTION)
    element("#ask").click()

    def answer(_=None):
        return element("#answer textarea").get_attribute("value")

    wait.until(answer)
    assert answer().strip() == expected_answer
    element("#describe").click()
    wait.until(lambda _: answer().strip() == expected_report)

    screenshot = tmp_path / "app.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    assert "Traceback" not in browser.page_source
    print(f"screenshot: {screenshot}")
