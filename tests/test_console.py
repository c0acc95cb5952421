"""The operator's console in a real headless Chromium against a real gateway: sign in with the
token, see the functions, invoke echo (text) and sentiment-analysis (JSON) through the form,
upload a face to imgprocessing and see the green box drawn around it, read the log line the call
just made (the `author` fixture logs each word it gets), scale echo to 2 and back. Plus the
console origin's own rules, over plain HTTP: CSP, no function pages, tokens, Host/Origin, and the
API origin not trusting the console's. Screenshots land in the test's tmp dir on failure."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, FIXTURES, ROOT, RunningGateway, free_port, start_gateway
from tests.functions import test_mnist_page
from tests.functions.image_helpers import drawn_face, green_box
from tests.functions.test_mnist_page import CHROMEDRIVER, CHROMIUM

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()), reason="needs chromium + chromium-driver"
)
FUNCTIONS = ("echo", "sentiment-analysis", "imgprocessing")
LISTED = {*FUNCTIONS, "author"}  # author: a fixture whose handler logs through fn.log
browser = test_mnist_page.browser  # the same headless Chromium (Debian's, never one downloaded)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, str]]:
    folder = tmp_path_factory.mktemp("console")
    stack = folder / "stack.yaml"
    stack.write_text(
        "include:\n"
        + "".join(f"  - {ROOT}/functions/{name}/config.yaml\n" for name in FUNCTIONS)
        + f"functions:\n  author:\n    handler: {{dir: {FIXTURES}/functions/author/src, file: handler.py}}\n"
    )
    console = f"127.0.0.1:{free_port()}"
    gw = start_gateway(stack, folder / "gateway.log", "--console", console)
    try:
        gw.wait_ready(names=LISTED, timeout=120)
        yield gw, f"http://{console}"
    finally:
        gw.stop()


def fetch(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_console_origin_rules(platform: tuple[RunningGateway, str]) -> None:
    gw, console = platform
    status, headers, body = fetch(console + "/")
    assert status == 200 and b"OpenFx console" in body
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "blob:" in headers["Content-Security-Policy"] and "http" not in headers["Content-Security-Policy"]
    # no function pages on the console's origin: the mnist page or any other would share its token
    assert fetch(console + "/function/echo", "POST", b"hi")[0] == 404
    # a function's output comes back as an attachment that cannot run as a document here
    status, headers, body = fetch(console + "/console/invoke/echo", "POST", b"<script>x</script>", AUTH)
    assert status == 200 and body == b"<script>x</script>"
    assert headers["Content-Disposition"] == "attachment" and "sandbox" in headers["Content-Security-Policy"]
    # managing takes the token, as on the API's origin (invoking and reading stay open on loopback)
    assert fetch(console + "/system/function-log/echo")[0] == 401
    assert fetch(console + "/system/function-log/echo", headers={"Authorization": "Bearer wrong"})[0] == 401
    # Host and Origin rules of the API apply to the console's own origin
    assert fetch(console + "/console/overview", headers={**AUTH, "Host": "evil.example:80"})[0] == 421
    foreign = {**AUTH, "Origin": "http://evil.example"}
    assert fetch(console + "/console/invoke/echo", "POST", b"x", foreign)[0] == 403
    scale = json.dumps({"ServiceName": "echo", "Replicas": 1}).encode()
    assert (
        fetch(console + "/system/scale-function", "PUT", scale, {**AUTH, "Content-Type": "text/plain"})[0]
        == 415
    )
    # the API's origin does not trust the console's: the console never calls it
    status, _, _ = fetch(gw.http_url + "/system/functions", headers={**AUTH, "Origin": console})
    assert status == 403
    status, _, body = fetch(console + "/console/overview", headers=AUTH)
    rows = {row["name"]: row for row in json.loads(body)["functions"]}
    assert set(rows) == LISTED and rows["echo"]["p50_ms"] is not None


@contextlib.contextmanager
def screenshot_on_failure(driver, folder: Path) -> Iterator[None]:  # type: ignore[no-untyped-def]
    try:
        yield
    except BaseException:
        shot = folder / "console-failure.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        raise


def wait(driver, condition, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=what)


def by_id(driver, element_id: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def shown_image(driver):  # type: ignore[no-untyped-def]
    """The pixels of the result image as the page shows them (drawn on a canvas, read back as PNG),
    waited for until it has loaded."""
    import cv2
    import numpy as np

    data_url = wait(driver, lambda d: d.execute_script(SHOWN_PNG), "the processed image shown")
    png = base64.b64decode(data_url.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


SHOWN_PNG = (
    "const i = document.getElementById('result-image');"
    "if (i.hidden || !i.complete || !i.naturalWidth) return null;"
    "const c = document.createElement('canvas');"
    "c.width = i.naturalWidth; c.height = i.naturalHeight;"
    "c.getContext('2d').drawImage(i, 0, 0);"
    "return c.toDataURL('image/png');"
)


def invoke(driver, kind: str, text: str = "", file: Path | None = None) -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"input[name=kind][value={kind}]").click()
    if file is not None:
        by_id(driver, "input-file").send_keys(str(file))
    else:
        box = by_id(driver, "input-text")
        box.clear()
        box.send_keys(text)
    by_id(driver, "result-status").get_attribute("textContent")
    driver.execute_script("document.getElementById('result-status').textContent = ''")
    by_id(driver, "invoke").click()
    return wait(
        driver,
        lambda d: (s := by_id(d, "result-status").text) and not s.endswith("…") and s,
        f"a result for {kind} input",
    )


def open_function(driver, console: str, name: str) -> None:  # type: ignore[no-untyped-def]
    driver.get(f"{console}/#/fn/{name}")
    wait(driver, lambda d: by_id(d, "fn-name").text == name and by_id(d, "config").text, f"{name}'s page")


def test_console_in_chromium(browser, platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with screenshot_on_failure(browser, tmp_path):
        drive_console(browser, platform[1], tmp_path)


def drive_console(page, console: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page.get(console + "/")
    wait(page, lambda d: by_id(d, "login").is_displayed(), "the token form")
    # keyboard only: the field has focus, Enter submits
    page.switch_to.active_element.send_keys(ADMIN_TOKEN, Keys.ENTER)
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tr")) == 4, "four functions listed")
    assert "manage" in by_id(page, "who").text
    assert page.execute_script("return sessionStorage.getItem('openfx-token')") == ADMIN_TOKEN

    open_function(page, console, "echo")
    assert invoke(page, "text", "hello <b>console</b>").startswith("200")
    assert by_id(page, "result-text").text == "hello <b>console</b>"  # shown as text, not markup
    assert not page.find_elements(By.CSS_SELECTOR, "#result-text b")

    open_function(page, console, "sentiment-analysis")
    status = invoke(page, "json", json.dumps({"text": "I love this wonderful console"}))
    assert status.startswith("200"), status
    assert json.loads(by_id(page, "result-text").text)["polarity"] > 0

    open_function(page, console, "imgprocessing")
    import cv2

    picture = tmp_path / "face.jpg"  # 600x600, the face centred; the default operation boxes faces
    picture.write_bytes(cv2.imencode(".jpg", drawn_face(300), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    status = invoke(page, "file", file=picture)
    assert "image/jpeg" in status, status
    shown = shown_image(page)
    assert shown.shape[:2] == (600, 600)
    box = green_box(shown)  # an echo of the upload has no green in it
    assert box is not None, "no green box in the shown image"
    x1, y1, x2, y2 = box
    assert x1 < 230 < 370 < x2 and y1 < 240 < 390 < y2, box  # around the eyes-to-mouth region

    # the log pane shows the line the call just made (a fresh word: not an older line)
    open_function(page, console, "author")
    word = f"console-{uuid.uuid4().hex[:8]}"
    assert invoke(page, "text", word).startswith("200")
    assert by_id(page, "result-text").text == f"fine: {word}"

    def logged(d) -> bool:  # type: ignore[no-untyped-def]
        if f"author got '{word}'" in by_id(d, "log").text:
            return True
        if not by_id(d, "log-status").text.endswith("…"):  # re-read until the line has been written
            by_id(d, "log-refresh").click()
        return False

    wait(page, logged, "the call's log line in the log pane")
    open_function(page, console, "echo")

    for replicas in (2, 1):
        field = by_id(page, "replicas")
        field.clear()
        field.send_keys(str(replicas), Keys.ENTER)
        wait(page, lambda d, r=replicas: f"scaled echo to {r}" in by_id(d, "manage-status").text, "scaled")
        wait(
            page,
            lambda d, r=replicas: f"replicas {r}/{r} ready" in by_id(d, "fn-status").text,
            f"{replicas} ready",
        )

    # back on the list: echo's invocations and latency come from the gateway's histograms
    page.get(console + "/#/")
    wait(
        page,
        lambda d: d.execute_script(
            "const r = document.querySelector('#rows tr[data-name=echo]');"
            "return r && r.querySelector('.p50').textContent.endsWith('ms')"
        ),
        "echo's p50 shown",
    )
    # phone width: the page stays usable (no horizontal scroll of the page itself)
    page.set_window_size(390, 800)
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.set_window_size(1000, 900)


def test_console_off_loopback_needs_tokens() -> None:
    """The console is a listener like the others: without configured tokens it stays on loopback."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openfx.gateway",
            "--no-functions",
            "--grpc",
            f"127.0.0.1:{free_port()}",
            "--http",
            f"127.0.0.1:{free_port()}",
            "--console",
            f"0.0.0.0:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("OPENFX_")},
    )
    assert out.returncode == 1 and "refusing to serve" in out.stderr and "console 0.0.0.0" in out.stderr
