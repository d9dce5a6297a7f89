"""The playground page at / in a real headless Chromium (Debian's chromium and chromium-driver),
driven by Selenium against real `tokenmill serve` processes.

Without a Chromium the tests are skipped, unless TOKENMILL_REQUIRE_BROWSER=1 (CI sets it):
then they fail. Screenshots go to TOKENMILL_TEST_ARTIFACTS (default: test-artifacts/).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, metric

CHROMIUM = os.environ.get("TOKENMILL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TOKENMILL_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(
    os.environ.get("TOKENMILL_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)
# As a service on a closed network runs it: no first-run UI, no calls to Google's hosts.
_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
]  # fmt: skip
_TIMEOUT_S = 90  # a whole reply of the bundled model on 2 busy cores


def _have_browser() -> bool:
    return all(shutil.which(path) or Path(path).is_file() for path in (CHROMIUM, CHROMEDRIVER))


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not _have_browser():
        message = f"no Chromium at {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"  # fmt: skip
        if os.environ.get("TOKENMILL_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(driver: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The driver; after each test, a screenshot named after it, and no script errors."""
    yield driver
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"playground-{request.node.name}.png"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    keyless = "the server responded with a status of 401"  # the auth test's call without a key
    assert [e for e in errors if keyless not in e["message"]] == []


def _open(driver: Any, server: Server) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{server.url}/")
    _wait(driver, lambda: driver.find_element(By.ID, "model").text not in ("", "…"))


def _wait(driver: Any, condition: Callable[[], Any], timeout: float = _TIMEOUT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: condition())


def _set(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    if value:
        field.send_keys(value)


def _settings(driver: Any, **values: str) -> None:
    """Fill the settings panel: field id (with _ for -) -> text."""
    for name, value in values.items():
        _set(driver, name.replace("_", "-"), value)


def _structured(driver: Any, kind: str, spec: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "structured")).select_by_value(kind)
    driver.execute_script(  # send_keys would type a long spec a key at a time
        "document.getElementById('structured-spec').value = arguments[0];", spec
    )


def _send(driver: Any, text: str) -> Any:
    """Type `text`, press Send; the new assistant message element."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    replies = _wait(
        driver,
        lambda: (r := driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[before:] and r,
    )
    return replies[before]


def _reply_text(reply: Any) -> str:
    from selenium.webdriver.common.by import By

    # textContent: exactly what the page wrote, whitespace and all (.text normalises it)
    return str(reply.find_element(By.CSS_SELECTOR, ".text").get_property("textContent"))


def _finished(driver: Any, reply: Any) -> str:
    _wait(driver, lambda: reply.get_attribute("data-state") != "streaming")
    return str(reply.get_attribute("data-state"))


def _new_chat(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "clear").click()


def _api_chat(server: Server, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": messages, **body},
        headers=server.headers,
        timeout=_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_message_streams_into_the_page_with_its_logprob_heat_map(
    page: Any, server: Server
) -> None:
    from selenium.webdriver.common.by import By

    _open(page, server)
    assert page.find_element(By.ID, "model").text == server.served_names[0]  # type: ignore[index]
    assert page.find_element(By.ID, "stat-context").text == str(server.max_model_len)
    assert not page.find_element(By.ID, "api-key-row").is_displayed()  # no key on this server
    _new_chat(page)
    _settings(page, temperature="0", max_tokens="48", system="You are a poet.")
    page.find_element(By.ID, "logprobs").click()
    reply = _send(page, "Write a poem about the sea.")
    seen = set()  # the reply's lengths while it was still streaming
    while reply.get_attribute("data-state") == "streaming":
        seen.add(len(_reply_text(reply)))
        time.sleep(0.02)
    assert reply.get_attribute("data-state") == "done"
    assert len(seen - {0}) >= 2, f"text never grew while streaming: {seen}"

    shown = _reply_text(reply)
    messages = [
        {"role": "system", "content": "You are a poet."},
        {"role": "user", "content": "Write a poem about the sea."},
    ]
    expected = _api_chat(server, messages, temperature=0, max_tokens=48, top_p=1)
    assert shown == expected["choices"][0]["message"]["content"]  # the API's greedy reply
    tokens = reply.find_elements(By.CSS_SELECTOR, ".text .tok")
    assert tokens and "".join(t.get_property("textContent") for t in tokens) == shown
    assert all(0 <= float(t.get_attribute("data-p")) <= 1 for t in tokens)
    assert "p=" in str(tokens[0].get_attribute("title"))  # the hover: p and the alternatives
    tokens_line = f"{expected['usage']['completion_tokens']} tokens"
    assert tokens_line in reply.find_element(By.CSS_SELECTOR, ".meta").text


def test_stop_ends_a_long_generation_and_frees_the_server(page: Any, server: Server) -> None:
    from selenium.webdriver.common.by import By

    _open(page, server)
    _new_chat(page)
    _settings(page, temperature="0.8", max_tokens="400", seed="", extra='{"ignore_eos": true}')
    reply = _send(page, "Tell me a very long story.")
    _wait(page, lambda: len(_reply_text(reply)) > 20)
    assert metric(server, "vllm:num_requests_running") == 1
    page.find_element(By.ID, "stop").click()
    assert _finished(page, reply) == "stopped"
    assert "finish: stopped" in reply.find_element(By.CSS_SELECTOR, ".meta").text
    _wait(page, lambda: metric(server, "vllm:num_requests_running") == 0, timeout=30)
    _wait(page, lambda: page.find_element(By.ID, "stat-running").text == "0", timeout=30)
    stopped_at = len(_reply_text(reply))
    time.sleep(0.5)
    assert len(_reply_text(reply)) == stopped_at  # nothing more arrives
    assert page.find_element(By.ID, "send").is_enabled()

    # the stopped turn stays in the conversation: the next request carries it
    partial = _reply_text(reply)
    _settings(page, temperature="0", max_tokens="8")
    follow_up = _send(page, "Go on.")
    assert _finished(page, follow_up) == "done"
    messages = [
        {"role": "user", "content": "Tell me a very long story."},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "Go on."},
    ]
    expected = _api_chat(server, messages, temperature=0, max_tokens=8, top_p=1, ignore_eos=True)
    assert _reply_text(follow_up) == expected["choices"][0]["message"]["content"]


def test_a_json_schema_gives_valid_json(page: Any, server: Server) -> None:
    from selenium.webdriver.common.by import By

    _open(page, server)
    _new_chat(page)
    schema = {
        "type": "object",
        "properties": {
            "capital": {"enum": ["Paris", "Lyon", "Nice"]},
            "is_large": {"type": "boolean"},
        },
        "required": ["capital", "is_large"],
        "additionalProperties": False,
    }
    _settings(page, temperature="0", max_tokens="60")
    _structured(page, "json_schema", json.dumps(schema))
    reply = _send(page, "What is the capital of France? Answer in JSON.")
    assert _finished(page, reply) == "done"
    answer = json.loads(_reply_text(reply))
    assert set(answer) == {"capital", "is_large"}
    assert answer["capital"] in ("Paris", "Lyon", "Nice") and isinstance(answer["is_large"], bool)
    assert "finish: stop" in reply.find_element(By.CSS_SELECTOR, ".meta").text


def test_html_in_model_output_and_prompts_is_shown_as_text(page: Any, server: Server) -> None:
    from selenium.webdriver.common.by import By

    _open(page, server)
    _new_chat(page)
    markup = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"><b>bold</b>'
    regex = markup.replace(".", r"\.")  # the model must write exactly this
    _settings(page, temperature="0", max_tokens="80")
    _structured(page, "regex", regex)
    reply = _send(page, "<i>not italic</i><script>window.pwned=3</script>")
    assert _finished(page, reply) == "done"
    assert _reply_text(reply) == markup
    user = page.find_elements(By.CSS_SELECTOR, ".msg.user .text")[-1]
    assert user.get_property("textContent") == "<i>not italic</i><script>window.pwned=3</script>"
    log = page.find_element(By.ID, "log")
    for tag in ("script", "img", "b", "i"):
        assert log.find_elements(By.TAG_NAME, tag) == [], tag
    assert page.execute_script("return window.pwned") is None


def test_the_api_key_field_carries_the_key(page: Any, auth_server: Server) -> None:
    from selenium.webdriver.common.by import By

    _open(page, auth_server)  # the page itself needs no key
    assert page.find_element(By.ID, "api-key-row").is_displayed()
    _new_chat(page)
    _settings(page, temperature="0", max_tokens="8")
    refused = _send(page, "Hello")
    assert _finished(page, refused) == "error"
    assert "401" in refused.text and "API key" in refused.text
    _settings(page, api_key=str(auth_server.api_key))
    reply = _send(page, "Hello")
    assert _finished(page, reply) == "done"
    assert _reply_text(reply)
    assert "8 tokens" in reply.find_element(By.CSS_SELECTOR, ".meta").text
