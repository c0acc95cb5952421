"""The mnist web page in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium), served by the function through the gateway's HTTP trigger: upload a rendered digit,
draw one with the pointer, read the predictions from the page."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningGateway
from tests.functions.conftest import call
from tests.functions.test_mnist import X_TEST, Y_TEST, digit_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# without the background-networking flags Chromium keeps dialling Google's hosts (no internet here)
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,900",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shown_digit(driver, previous: str = "") -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):  # type: ignore[no-untyped-def]
        text = d.find_element(By.ID, "digit").text.strip()
        error = d.find_element(By.ID, "error").text.strip()
        if error:
            raise AssertionError(f"the page shows an error: {error}")
        return text if text not in ("", "…", previous) else False

    return WebDriverWait(driver, 30).until(ready)


def test_upload_a_digit_image(browser, stack_gateway: RunningGateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    browser.get(f"{stack_gateway.http_url}/function/mnist")
    assert "Handwritten digit recognition" in browser.title
    for i in (0, 5):
        image = tmp_path / f"digit{i}.png"
        image.write_bytes(digit_image(X_TEST[i], 200))
        want = json.loads(call(stack_gateway, "mnist", image.read_bytes()))["digit"]
        assert want == Y_TEST[i]  # the rendered digit is one the model gets right
        field = browser.find_element(By.ID, "file")
        field.send_keys(str(image))
        assert shown_digit(browser) == str(want)
        bars = browser.find_elements(By.CSS_SELECTOR, "#probabilities .bar")
        assert len(bars) == 10
        browser.refresh()


def test_draw_a_digit(browser, stack_gateway: RunningGateway) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(f"{stack_gateway.http_url}/function/mnist")
    pad = browser.find_element(By.ID, "pad")
    # a zero: a closed loop of pointer moves (offsets from the pad's centre)
    actions = ActionChains(browser).move_to_element_with_offset(pad, 0, -90).click_and_hold()
    for x, y in ((-50, -70), (-65, 0), (-50, 70), (0, 90), (50, 70), (65, 0), (50, -70), (0, -90)):
        actions.move_to_element_with_offset(pad, x, y)
    actions.release().perform()
    browser.find_element(By.ID, "predict-drawing").click()
    digit = shown_digit(browser)
    # the page shows what the function answers for exactly the pixels that were drawn
    png = base64.b64decode(browser.execute_script("return pad.toDataURL('image/png')").split(",", 1)[1])
    assert digit == str(json.loads(call(stack_gateway, "mnist", png))["digit"])
    assert digit == "0"
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "digit").text == ""
