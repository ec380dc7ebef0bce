"""The chat page (hybrid/apps/chat_page.html) in a real headless browser (Debian's chromium + chromedriver,
driven by selenium) against a real server (create_app + uvicorn in a thread) on the tiny checkpoint with
the default expert backend: the page is self-contained (nothing fetched from elsewhere), asks for the API
key on a 401 and retries, streams an answer in several chunks, folds the reasoning once the answer is
done, keeps conversations in localStorage across a reload, and its stop button aborts the request on
the server (the engine thread's `aborted` counter, read from /health, goes up). Saves a screenshot to
docs/chat_page.png. Skipped, with the reason, where chromium, chromedriver or selenium is missing
(CI installs them: apt-get install -y chromium chromium-driver; pip install "selenium>=4.10").
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "hybrid" / "apps" / "chat_page.html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
API_KEY = "sekrit"
WAIT_S = 240               # first answer: loading + numba compile on a slow, shared machine


def test_page_is_self_contained():
    html = PAGE.read_text()
    for needle in ("<script src", "<link ", "https://", "http://", "@import"):
        assert needle not in html, needle
    assert "/v1/chat/completions" in html and "AbortController" in html and "localStorage" in html


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir):
    uvicorn = pytest.importorskip("uvicorn")
    import hybrid
    from fastapi.responses import HTMLResponse

    from hybrid.apps.server import create_app
    llm = hybrid.LLM(tiny_dir, progress=False, max_context=2048, max_batch=4)     # the default backend
    app = create_app(llm, "tiny", api_key=API_KEY)
    if not any(getattr(r, "path", None) == "/" and "GET" in getattr(r, "methods", ()) for r in app.routes):
        app.get("/")(lambda: HTMLResponse(PAGE.read_text()))      # until the server serves the page itself
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def _wait(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _last_answer(driver):
    found = driver.find_elements("css selector", ".msg.assistant")
    return found[-1] if found else None


def _send(driver, text: str):
    box = driver.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()


def test_chat_page_streams_folds_and_stops(server, browser):
    d = browser
    d.get(server + "/")
    assert d.title == "hybrid chat"
    d.execute_script("localStorage.clear()")
    d.refresh()
    d.find_element("id", "maxtokens").send_keys("24")
    _send(d, "hello, who are you?")
    # the server has a key: the page asks for it, then retries the message
    key = _wait(lambda: d.find_element("id", "apikey") if d.find_element("id", "keyform").is_displayed() else None,
                60, "the API key form")
    key.send_keys(API_KEY)
    d.find_element("id", "savekey").click()
    answer = _wait(lambda: _last_answer(d), 60, "an answer bubble")
    state = _wait(lambda: (s := answer.get_attribute("data-state")) not in ("waiting", "streaming") and s, WAIT_S,
                  "the answer to finish")
    assert state in ("stop", "length"), state
    assert int(answer.get_attribute("data-chunks")) > 1                  # streamed, not one block
    assert "tiny" in d.find_element("id", "model").text                  # /v1/models read with the key
    folds = answer.find_elements("css selector", "details.reasoning")
    assert folds, "thinking on: the tiny model's answer is reasoning until a </think>"
    fold = folds[0]
    assert fold.get_attribute("open") is None                            # folded once the answer is done
    assert fold.find_element("css selector", ".reasoning-text").get_attribute("textContent").strip()
    fold.find_element("tag name", "summary").click()
    assert fold.get_attribute("open") is not None                        # unfolds on a click

    # stop: a long answer (ignore_eos, no max tokens), stopped after a few chunks
    d.find_element("id", "maxtokens").clear()
    d.execute_script("localStorage.setItem('hybrid.extra', JSON.stringify({ignore_eos: true}))")
    before = _health(server)["aborted"]
    _send(d, "now tell me a very long story")
    _wait(lambda: len(d.find_elements("css selector", ".msg.assistant")) == 2, 30, "the second answer bubble")
    second = _last_answer(d)
    _wait(lambda: int(second.get_attribute("data-chunks") or 0) >= 3, WAIT_S, "the long answer to stream")
    d.find_element("id", "stop").click()
    _wait(lambda: second.get_attribute("data-state") == "stopped", 30, "the page to stop")
    _wait(lambda: _health(server)["aborted"] > before, 30, "the server to abort the request")
    assert _health(server)["running"] == 0
    d.execute_script("localStorage.removeItem('hybrid.extra')")
    d.execute_script("document.querySelector('details.reasoning').open = true")    # show some text
    d.save_screenshot(str(ROOT / "docs" / "chat_page.png"))

    # conversations: kept in localStorage across a reload; "New chat" adds one
    d.find_element("id", "newchat").click()
    d.refresh()
    items = _wait(lambda: d.find_elements("css selector", "#conversations li"), 10, "the conversation list")
    assert len(items) == 2
    items[1].click()
    assert len(d.find_elements("css selector", ".msg.user")) == 2
    assert len(d.find_elements("css selector", ".msg.assistant")) == 2
