"""The web dashboard in a real browser (Debian's headless Chromium, driven
through chromedriver): with tokens on, a user enters a token, uploads a
dataset and starts a job from the form, and watches the job's page: the
loss curve gains one point per epoch over the event stream until the job
completes. Saves a screenshot (``VTP_SCREENSHOT`` names the file; the
README's is ``docs/dashboard.png``)."""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import CONFIG, unavailable

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EPOCHS = 5


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (crates/vtp-py/requirements-test.txt)")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        unavailable("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1280,1400", "--disable-gpu"):
        options.add_argument(argument)
    # The driver and the browser are the installed ones: nothing is fetched.
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_job_started_from_the_dashboard_draws_its_curve_epoch_by_epoch(
    backend: str,
    make_token: Callable[[str], str],
    shapes: Path,
    tmp_path: Path,
    browser: object,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(shapes.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(shapes.parent))

    # Tokens are on: the page asks for one.
    driver.get(f"{backend}/")
    notice = driver.find_element(By.ID, "notice")
    wait_for(lambda: notice.is_displayed() and "token" in notice.text, 10, "the token notice")
    driver.find_element(By.ID, "token").send_keys(make_token("dashboard-user"))
    driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#jobs"), 10, "the job list")

    # Upload and start from the form.
    driver.get(f"{backend}/#/new")
    wait_for(lambda: driver.find_elements(By.ID, "new-job"), 10, "the form")
    driver.find_element(By.ID, "f-file").send_keys(str(archive))
    name = driver.find_element(By.ID, "f-name")
    name.clear()
    name.send_keys("dashboard-shapes")
    Select(driver.find_element(By.ID, "f-model")).select_by_value("small_cnn")
    epochs = driver.find_element(By.ID, "f-epochs")
    epochs.clear()
    epochs.send_keys(str(EPOCHS))
    config = driver.find_element(By.ID, "f-config")
    config.clear()
    config.send_keys(json.dumps(CONFIG))
    driver.find_element(By.ID, "f-submit").click()
    wait_for(lambda: "#/jobs/" in driver.current_url, 60, "the job's page")
    job_id = driver.current_url.rsplit("/", 1)[-1]

    # The curve grows over the event stream until the job completes. The hash
    # changes before the job page has fetched the job and drawn itself.
    status = wait_for(lambda: driver.find_elements(By.ID, "job-status"), 30, "the job's status")[0]
    wait_for(lambda: status.text in ("completed", "failed", "cancelled"), 300, "the job to end")
    assert status.text == "completed", driver.find_element(By.ID, "job-error").text
    loss = driver.find_element(By.ID, "loss-chart")
    wait_for(lambda: loss.get_attribute("data-points") == str(EPOCHS), 10, "every epoch plotted")
    history = [int(n) for n in (loss.get_attribute("data-history") or "").split(",") if n]
    assert history == list(range(1, EPOCHS + 1)), f"one point per epoch, in order: {history}"
    rows = driver.find_elements(By.CSS_SELECTOR, "#epochs tbody tr")
    assert len(rows) == EPOCHS
    assert driver.find_elements(By.ID, "download"), "a completed job offers its checkpoint"
    assert '"image_size": 16' in driver.find_element(By.ID, "job-config").text
    # Per class, from the best checkpoint's sidecar: accuracy, and the
    # confusion matrix, whose diagonal holds the best epoch's hits.
    classes = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, "#per-class tbody tr"), 10, "per class"
    )
    assert len(classes) == 3, [row.text for row in classes]
    matrix = [
        [int(cell.text) for cell in row.find_elements(By.CSS_SELECTOR, "td")]
        for row in driver.find_elements(By.CSS_SELECTOR, "#confusion tbody tr")
    ]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix), matrix
    assert sum(matrix[i][i] for i in range(3)) > 0, matrix
    screenshot = Path(os.environ.get("VTP_SCREENSHOT", tmp_path / "dashboard.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))

    # The list shows it completed, with its best accuracy.
    driver.get(f"{backend}/#/")
    row = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]'), 10, "the row"
    )[0]
    wait_for(lambda: "acc " in row.find_element(By.CSS_SELECTOR, "td.best").text, 10, "the best")
    assert "completed" in row.text
