"""The playground page in a real headless browser (Debian's chromium + chromium-driver, selenium):
pick an adapter, type a prompt, watch the streamed answer arrive; the same answer the API gives."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from serve_helpers import ServerProcess, base_dir, make_adapter  # noqa: E402

BROWSER_S = 60


def _binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = ("the playground test needs Debian's chromium and chromium-driver: "
               "apt-get install -y chromium chromium-driver (make setup does this)")
    if os.environ.get("LORAKIT_NO_SKIPS") == "1" or os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path),
                              options=options)
    driver.set_page_load_timeout(BROWSER_S)
    driver.set_script_timeout(BROWSER_S)
    yield driver
    driver.quit()


def test_playground_streams_an_adapters_answer(tmp_path, browser):
    base = base_dir(tmp_path)
    make_adapter(base, tmp_path / "adapters" / "poet", seed=3, targets="all")
    server = ServerProcess(base, [tmp_path / "adapters"], "--name", "tiny", log=tmp_path / "server.log")
    try:
        browser.get(server.root + "/")
        wait = WebDriverWait(browser, BROWSER_S)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
        options = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
        assert options == ["tiny", "poet"]
        Select(browser.find_element(By.ID, "model")).select_by_value("poet")
        Select(browser.find_element(By.ID, "mode")).select_by_value("completion")
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("12")
        browser.find_element(By.ID, "prompt").send_keys("what is the cat ?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        shown = browser.find_element(By.ID, "output").text
        status = browser.find_element(By.ID, "status").text
        reply = server.request("POST", "/v1/completions", {"model": "poet", "prompt": "what is the cat ?",
                                                           "max_tokens": 12, "temperature": 0})[1]
        assert shown and shown == reply["choices"][0]["text"].strip()
        pieces = int(status.split(",")[1].split()[0])
        assert pieces > 1, status                              # it arrived as a stream, piece by piece
        # an unknown model shows the server's error message
        browser.execute_script("document.getElementById('model').innerHTML = "
                               "'<option value=\"ghost\">ghost</option>'")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: "ghost" in d.find_element(By.ID, "status").text)
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    finally:
        server.stop()
