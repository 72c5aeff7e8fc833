"""The decoding explorer page in a real headless chromium, against a live server's HTTP front.

What a person running the decoding study sees: every preset column streams to `done` in one batch,
tokens carry their probability, a token's alternatives table is the model's top 5 (sorted, at most
1 in total, the greedy pick on top), the beam column lists its n best by score, every column shows
its output's log-probability from /v1/score, and the greedy column reads what a direct request gets.

`TOKENLOOM_EXPLORER_SCREENSHOT=docs/images/explorer.png python -m pytest tests/e2e/test_explorer.py -k chat`
runs it on the real default model instead (text that reads) and saves the docs' screenshot there.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
from conftest import own_server

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_ENV = "TOKENLOOM_EXPLORER_SCREENSHOT"
PRESETS = ["greedy", "beam 5", "temperature 0.5", "temperature 2.0", "top-k 50", "top-p 0.9"]
BEAM_N = 5  # the beam preset's `n`
TOP_N = 5
MAX_TOKENS = 24
PROMPT = "Tell me a short story about a dog who loves to walk in the park."
TOKEN = "explorer-test-token"  # the server requires it: the page's bearer-token field is exercised too
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 120.0  # every column streamed and scored, on 2 slow cores


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium and chromedriver are not installed (`make browser` installs Debian's with apt-get)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    options.binary_location = chromium
    # An explicit driver: Selenium Manager would try to download one.
    browser = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    # The docs' screenshot wants text that reads: the real default model; the test alone, a tiny one.
    model = "default" if os.environ.get(SCREENSHOT_ENV) else request.getfixturevalue("tiny_dirs")["llama"]
    with own_server(model, "explorer", tmp_path_factory, "--auth-token", TOKEN) as live:
        yield live


def post(url: str, body: dict) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), HEADERS), timeout=60) as response:
        return json.loads(response.read())


def direct_greedy_tokens(base: str, chat: bool) -> list[str]:
    """The greedy output's tokens as a client of the HTTP API gets them without the page."""
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/models", headers=HEADERS), timeout=10) as response:
        model = json.loads(response.read())["data"][0]["id"]
    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0}
    if chat:
        answer = post(base + "/v1/chat/completions",
                      {**body, "messages": [{"role": "user", "content": PROMPT}], "logprobs": True})
        return [t["token"] for t in answer["choices"][0]["logprobs"]["content"]]
    answer = post(base + "/v1/completions", {**body, "prompt": PROMPT, "logprobs": 0})
    return answer["choices"][0]["logprobs"]["tokens"]


def statuses(driver) -> list[str]:
    return [s.text for s in driver.find_elements(By.CSS_SELECTOR, ".column .status")]


def run_page(driver, server, mode: str, token: str = TOKEN, menu: tuple[str, ...] = ()):
    """Loads the page, fills it in and compares, until every column has ended (well or not). With
    `menu`, the page's own columns are removed first and these presets added from its menu."""
    driver.get(server.http_url + "/")
    if menu:
        for remove in driver.find_elements(By.CSS_SELECTOR, ".column .remove"):
            remove.click()
        for name in menu:
            Select(driver.find_element(By.ID, "preset")).select_by_visible_text(name)
            driver.find_element(By.ID, "add-column").click()
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    driver.find_element(By.CSS_SELECTOR, f'input[name="mode"][value="{mode}"]').click()
    max_tokens = driver.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "compare").click()
    # An error ends the wait too, so that it fails with its message rather than after the timeout.
    WebDriverWait(driver, TIMEOUT).until(lambda _: all(s == "done" or s.startswith("error") for s in statuses(driver)))
    return {c.get_attribute("data-setting"): c for c in driver.find_elements(By.CSS_SELECTOR, ".column")}


def wait_for_scores(driver):
    WebDriverWait(driver, TIMEOUT).until(
        lambda _: all(s.text for s in driver.find_elements(By.CSS_SELECTOR, ".column .sequence-logprob")))


def alternatives_of(driver, column, span, how: str) -> list[float]:
    """The probabilities in the column's alternatives table once `span` is hovered or clicked."""
    if how == "hover":
        ActionChains(driver).move_to_element(span).perform()
    else:
        span.click()
    assert "selected" in span.get_attribute("class").split()
    rows = column.find_elements(By.CSS_SELECTOR, "table.alternatives tr.alternative")
    return [float(r.get_attribute("data-prob")) for r in rows]


def check_sampled_column(driver, name: str, column):
    spans = column.find_elements(By.CSS_SELECTOR, "span.token")
    assert spans, f"{name}: no tokens"
    assert len(spans) <= MAX_TOKENS
    logprobs = [float(s.get_attribute("data-logprob")) for s in spans]
    assert all(math.isfinite(lp) and lp <= 0 for lp in logprobs), (name, logprobs)
    assert all(s.get_attribute("data-token-id") for s in spans), f"{name}: a token without its id"
    for span, lp, how in ((spans[0], logprobs[0], "hover"), (spans[-1], logprobs[-1], "click")):
        probs = alternatives_of(driver, column, span, how)
        assert len(probs) == TOP_N, (name, how, probs)
        assert probs == sorted(probs, reverse=True), (name, probs)
        assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6, (name, probs)
        # The top alternative is the likeliest token of all, the chosen one included.
        assert math.exp(lp) <= probs[0] * (1 + 1e-5), (name, math.exp(lp), probs)
        if name == "greedy":
            assert math.exp(lp) == pytest.approx(probs[0], rel=1e-5), "greedy did not pick the top alternative"
    if name == "greedy":
        # The score endpoint's whole-output log-probability is the sum of the streamed ones.
        total = float(column.find_element(By.CSS_SELECTOR, ".sequence-logprob").text)
        assert total == pytest.approx(sum(logprobs), abs=0.01 + 1e-3 * len(logprobs))


def check_beam_column(column):
    hypotheses = column.find_elements(By.CSS_SELECTOR, ".hypothesis")
    assert len(hypotheses) == BEAM_N
    scores = [float(h.find_element(By.CSS_SELECTOR, ".score").text) for h in hypotheses]
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True), scores
    best = column.find_element(By.CSS_SELECTOR, ".best-so-far").text
    assert best and best == hypotheses[0].find_element(By.CSS_SELECTOR, ".text").text
    assert not column.find_elements(By.CSS_SELECTOR, "span.token")


def save_screenshot(driver, path: Path):
    # The whole page: the window's height is the page's plus the window's own frame.
    height = driver.execute_script(
        "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight")
    driver.set_window_size(1600, max(1000, height))
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path)), f"no screenshot at {path}"


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_every_preset_streams_side_by_side_with_probabilities_alternatives_and_scores(driver, server, mode, tmp_path):
    columns = run_page(driver, server, mode)
    assert list(columns) == PRESETS
    assert statuses(driver) == ["done"] * len(PRESETS), f"{statuses(driver)}\n{server.log_tail()}"
    wait_for_scores(driver)
    for name, column in columns.items():
        total = float(column.find_element(By.CSS_SELECTOR, ".sequence-logprob").text)
        assert math.isfinite(total) and total < 0, (name, total)
        if name.startswith("beam"):
            check_beam_column(column)
        else:
            check_sampled_column(driver, name, column)
    greedy = columns["greedy"].find_elements(By.CSS_SELECTOR, "span.token")
    assert [s.get_attribute("textContent") for s in greedy] == direct_greedy_tokens(server.http_url, mode == "chat")

    greedy[min(2, len(greedy) - 1)].click()
    save_screenshot(driver, tmp_path / "explorer.png")
    docs_image = os.environ.get(SCREENSHOT_ENV)
    if docs_image and mode == "chat":
        save_screenshot(driver, ROOT / docs_image)


def test_without_the_servers_token_every_column_says_to_send_one(driver, server):
    run_page(driver, server, "chat", token="")
    for status in statuses(driver):
        assert status.startswith("error: this server requires a bearer token"), status


def test_constrained_presets_from_the_menu_keep_to_their_constraint(driver, server):
    """The menu's constrained presets (vLLM's guided_* fields): every token still shows its raw
    probability and alternatives, and the output is what the constraint allows."""
    columns = run_page(driver, server, "chat", menu=("regex: a date", "choice"))
    assert list(columns) == ["regex: a date", "choice"]
    assert statuses(driver) == ["done", "done"], f"{statuses(driver)}\n{server.log_tail()}"
    for name, column in columns.items():
        check_sampled_column(driver, name, column)
    text = {name: "".join(s.get_attribute("textContent") for s in column.find_elements(By.CSS_SELECTOR, "span.token"))
            for name, column in columns.items()}
    assert re.fullmatch(r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", text["regex: a date"]), text
    assert text["choice"] in ("yes", "no", "maybe"), text
