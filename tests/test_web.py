"""The web chat and the swarm map in a real headless browser (Debian's chromium through selenium), served by
`corolla demo --serve` (its own private swarm of SmolLM2 + the API). Screenshots go to
test-output/<test name>/."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from conftest import OUTPUT_DIR
from corolla.models.checkpoint import load_config

QUESTION = "What is the capital of France?"
CHROMIUM = ("chromium", "chromium-browser")


class Demo:
    """`corolla demo --serve` as a child process; its output is collected by a reader thread."""

    def __init__(self, args: list[str]):
        self.popen = subprocess.Popen([sys.executable, "-m", "corolla.cli", "demo", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                      start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if line.startswith(prefix)), None)
            if found is not None:
                return found
            if self.popen.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise RuntimeError(f"the demo never printed {prefix!r}; its output:\n{self.output()}")

    def interrupt(self, timeout: float = 90) -> int | None:
        """Ctrl-C, as a person would; then SIGKILL to whatever is left of its group."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(10)
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None


@pytest.fixture(scope="module")
def demo_url(smollm2):
    demo = Demo(["--serve", "--max-new-tokens", "8", "--workdir", str(OUTPUT_DIR / "web-demo")])
    try:
        url = demo.wait_for("API: ", timeout=300).split()[1].removesuffix("/v1")
        demo.wait_for("Serving the API", timeout=120)
        yield url
    finally:
        code = demo.interrupt()
    assert code in (0, 130) and "Done." in demo.output(), demo.output()


def _find(names) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _find(CHROMIUM), _find(("chromedriver",))
    if chromium is None or driver_path is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed and `make test` could not install "
                    "them (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Callable[[], object], timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


RECORD_ANSWER_LENGTHS = """
window.answerLengths = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.message.assistant .content');
  if (answers.length) window.answerLengths.push(answers[answers.length - 1].textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'));",
                          field, value)


def last_answer(driver) -> str:
    answers = driver.find_elements("css selector", ".message.assistant .content")
    return answers[-1].text if answers else ""


def test_chat_streams_and_swarm_map_covers_every_block(demo_url, browser, smollm2, request):
    out = OUTPUT_DIR / request.node.name
    out.mkdir(parents=True, exist_ok=True)
    driver = browser

    # ---- chat page: a streamed greedy answer, equal to the API's own answer -----------------------------------
    driver.get(demo_url + "/")
    wait_until(lambda: driver.find_element("tag name", "body").get_attribute("data-ready") == "true", 30,
               "the chat page to load the model list")
    driver.find_element("css selector", "#settings summary").click()
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "32")
    driver.execute_script(RECORD_ANSWER_LENGTHS)
    driver.find_element("id", "prompt").send_keys(QUESTION)
    driver.find_element("id", "send").click()
    wait_until(lambda: "tokens/s" in driver.find_element("id", "status").text, 120, "the answer to finish")
    answer = last_answer(driver)
    lengths = [n for n in driver.execute_script("return window.answerLengths") if n]
    driver.save_screenshot(str(out / "chat.png"))
    assert len(set(lengths)) >= 2, f"the answer appeared at once, not streamed (lengths seen: {lengths})"
    model = httpx.get(f"{demo_url}/v1/models", timeout=30).json()["data"][0]["id"]
    api = httpx.post(f"{demo_url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 32,
    }).json()
    assert answer == api["choices"][0]["message"]["content"].strip()
    assert "Paris" in answer

    # ---- the stop button ends a long answer early -------------------------------------------------------------
    set_field(driver, "max-tokens", "400")
    driver.find_element("id", "prompt").send_keys("Write a long story about a dragon who learns to sail.")
    driver.find_element("id", "send").click()
    wait_until(lambda: len(last_answer(driver)) > 0, 120, "the story to start streaming")
    driver.find_element("id", "stop").click()
    wait_until(lambda: driver.find_element("id", "status").text == "stopped", 30, "the stop button to take effect")
    assert driver.find_element("id", "send").is_enabled() and not driver.find_element("id", "stop").is_enabled()
    stopped_at = last_answer(driver)
    time.sleep(1.0)
    assert last_answer(driver) == stopped_at, "text kept arriving after Stop"
    driver.save_screenshot(str(out / "chat-stopped.png"))

    # ---- swarm page: every block covered by an online server, refreshed live -----------------------------------
    num_blocks = load_config(smollm2).num_hidden_layers
    driver.get(demo_url + "/swarm")
    summary = wait_until(lambda: driver.find_element("id", "summary").get_attribute("data-covered") and
                         driver.find_element("id", "summary"), 60, "the swarm map")
    assert summary.get_attribute("data-blocks") == str(num_blocks)
    assert summary.get_attribute("data-covered") == str(num_blocks), summary.text
    covered = driver.find_elements("css selector", ".cell.coverage.covered")
    assert len(covered) == num_blocks and not driver.find_elements("css selector", ".cell.coverage.missing")
    state = httpx.get(f"{demo_url}/api/v1/state", timeout=30).json()
    rows = driver.find_elements("css selector", ".server-row")
    assert {row.get_attribute("data-peer") for row in rows} == {s["peer_id"] for s in state["servers"]}
    assert len(driver.find_elements("css selector", ".cell.held.online")) == num_blocks  # spans do not overlap
    table = driver.find_elements("css selector", "#servers tbody tr")
    assert len(table) == len(state["servers"]) and all("online" in row.text for row in table)
    updates = int(driver.find_element("tag name", "body").get_attribute("data-updates"))
    wait_until(lambda: int(driver.find_element("tag name", "body").get_attribute("data-updates")) > updates, 30,
               "the swarm map to refresh by itself")
    driver.save_screenshot(str(out / "swarm.png"))
    (out / "state.json").write_text(json.dumps(state, indent=2))
